"""Operator stories: `broker init` makes a home; `broker apply` creates and updates a
team idempotently, auditing each change; `broker team show` prints it back."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from broker.cli.main import cli
from broker.config import load
from broker.db.engine import Database
from broker.db.models import AuditEvent, Person
from tests.harness import TEAM


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_init_writes_settings_and_database(runner: CliRunner, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = runner.invoke(cli, ["init", "--home", str(home), "--domain", "records.example",
                                 "--listen", "127.0.0.1:2525", "--relay", "127.0.0.1:2526"])
    assert result.exit_code == 0, result.output
    settings = tomllib.loads((home / "broker.toml").read_text())
    assert settings["domain"] == "records.example"
    assert settings["smtp"]["listen"] == "127.0.0.1:2525"
    assert settings["smtp"]["max_message_size"] == 25 * 1024 * 1024
    assert settings["relay"] == {"host": "127.0.0.1", "port": 2526, "tls": "none",
                                 "verify": True, "ca_file": "", "username": "", "password": "",
                                 "password_file": "", "allow_plaintext_auth": False,
                                 "timeout": 30.0}
    # The hold lifetime comes from the rules unless the operator overrides it here.
    assert "lifetime_days" not in settings["hold"]
    assert load(home).hold_days is None
    assert settings["receipts"]["forwarded"] is False
    assert settings["replies"]["authentication"] == "dkim"  # the default init writes
    assert (home / "broker.db").exists()
    assert (home / "broker.toml").stat().st_mode & 0o077 == 0
    # A second init never overwrites an existing home.
    again = runner.invoke(cli, ["init", "--home", str(home), "--domain", "x.example"])
    assert again.exit_code != 0
    assert "already exists" in again.output


def test_init_rejects_bad_listen_address(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["init", "--home", str(tmp_path / "h"), "--domain", "r.example",
                                 "--listen", "nowhere"])
    assert result.exit_code != 0
    assert "HOST:PORT" in result.output


def test_commands_without_home_say_how_to_fix_it(runner: CliRunner, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_HOME", raising=False)
    result = runner.invoke(cli, ["team", "show", "sam"])
    assert result.exit_code != 0
    assert "--home" in result.output and "BROKER_HOME" in result.output


def test_apply_is_idempotent_and_audited(runner: CliRunner, tmp_path: Path,
                                         db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("BROKER_DATABASE_URL", db_url)
    assert runner.invoke(cli, ["init", "--home", str(home), "--domain", "records.example"]
                         ).exit_code == 0
    monkeypatch.setenv("BROKER_HOME", str(home))  # BROKER_HOME replaces --home
    team_file = tmp_path / "team.toml"
    team_file.write_text(TEAM)

    first = runner.invoke(cli, ["apply", str(team_file)])
    assert first.exit_code == 0, first.output
    assert "child sam created" in first.output
    assert "provider lee@clinic.example added" in first.output
    second = runner.invoke(cli, ["apply", str(team_file)])
    assert second.exit_code == 0
    assert "no changes" in second.output

    db = Database(db_url)
    with db.session() as s:
        events_after_two_runs = len(s.scalars(select(AuditEvent)).all())
    # Change a tag and drop Mr Ortiz: two audited changes, Ortiz kept but inactive.
    changed = TEAM.replace('tags = ["teacher", "case-manager"]', 'tags = ["teacher"]')
    changed = changed[: changed.index('[[members]]\nname = "Mr Ortiz"')]
    team_file.write_text(changed)
    third = runner.invoke(cli, ["apply", str(team_file)])
    assert third.exit_code == 0, third.output
    assert "school park@school.example updated: tags" in third.output
    assert "school ortiz@school.example deactivated" in third.output
    with db.session() as s:
        actions = s.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()
        ortiz = s.scalar(select(Person).where(Person.email == "ortiz@school.example"))
        assert ortiz is not None and ortiz.active is False
    db.dispose()
    assert actions[:1] == ["child_created"]
    assert actions.count("person_added") == 4
    assert actions[events_after_two_runs:] == ["person_updated", "person_removed"]

    shown = runner.invoke(cli, ["team", "show", "sam", "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["child"]["address"] == "sam@records.example"
    assert data["child"]["birthdate"] == "2014-03-02"
    assert data["guardians"] == [{"name": "Dana Rivera", "email": "dana@home.example",
                                  "active": True}]
    park = next(m for m in data["members"] if m["email"] == "park@school.example")
    assert park["tags"] == ["teacher"]
    table = runner.invoke(cli, ["team", "show", "sam"])
    assert "Dr. Lee" in table.output and "lee@clinic.example" in table.output


@pytest.mark.parametrize("bad, message", [
    ('[child]\nslug = "Sam!"\nname = "x"\n', "slug"),
    ('[child]\nslug = "sam"\nname = "Sam"\n', "guardians"),
    ('[child]\nslug = "sam"\nname = "Sam"\n[[guardians]]\nname = "D"\nemail = "not-an-address"\n',
     "not a plain e-mail address"),
    ('[child]\nslug = "sam"\nname = "Sam"\n[[guardians]]\nname = "D"\nemail = "d@h.example"\n'
     '[[members]]\nname = "L"\nemail = "l@c.example"\nrole = "teacher"\n', "role"),
    ("this is = not [toml", "team.toml"),
])
def test_apply_explains_a_bad_team_file(runner: CliRunner, tmp_path: Path, bad: str,
                                        message: str) -> None:
    home = tmp_path / "home"
    assert runner.invoke(cli, ["init", "--home", str(home), "--domain", "r.example"]
                         ).exit_code == 0
    team_file = tmp_path / "team.toml"
    team_file.write_text(bad)
    result = runner.invoke(cli, ["apply", "--home", str(home), str(team_file)])
    assert result.exit_code != 0
    assert message in result.output
