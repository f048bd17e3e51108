"""`broker consent`: an operator files, lists, shows, revokes and renews consents on file.
Runs the real command (through the `broker` group) against a real home with teams applied,
on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from broker.cli.consent import consent
from broker.cli.main import cli
from broker.config import load
from broker.db.models import AuditEvent, Consent, Delivery, Record
from broker.records import states
from broker.runtime import Runtime
from tests.test_consents import TODAY, copy, make_home, releasing_record

JSON_FIELDS = {
    "id", "child", "disclosers", "recipients", "categories", "purpose", "valid_from",
    "valid_until", "mode", "status", "signed_by", "form", "form_sha256", "created_at",
    "created_by", "revoked_at", "revoked_by", "renews", "renewed_by",
}


@pytest.fixture
def home(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    return make_home(tmp_path, db_url, monkeypatch)


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["consent", *args[:1], "--home", str(home), *args[1:]],
                              prog_name="broker")


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def as_json(result: Result) -> dict | list:
    return json.loads(ok(result).stdout)


def failed(result: Result, code: int = 1) -> str:
    """The error text (stderr); no traceback, the expected exit code, nothing on stdout."""
    assert result.exit_code == code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return result.stderr


OT = ("--child", "alex", "--from", "kim@speech.example", "--to", "tag:ot",
      "--category", "ot_progress", "--purpose", "classroom supports",
      "--signed-by", "pat@home.example")


def add(home: Path, *extra: str) -> dict:
    info = as_json(run(home, "add", *OT, "--json", *extra))
    assert isinstance(info, dict)
    return info


def test_add_then_list_and_show(home: Path) -> None:
    result = ok(run(home, "add", *OT, "--to", "park@school.example", "--mode", "auto"))
    assert re.search(r"consent #\d+ filed for alex: kim@speech.example -> tag:ot, "
                     r"park@school.example: ot_progress \(classroom supports\)", result.stdout)
    assert "no signed form on file" in result.stdout

    [row] = as_json(run(home, "list", "--json"))
    assert set(row) == JSON_FIELDS
    assert row["child"] == "alex" and row["status"] == "active" and row["mode"] == "auto"
    assert row["recipients"] == ["tag:ot", "park@school.example"]
    assert row["valid_from"] == TODAY.isoformat()
    assert dt.date.fromisoformat(row["valid_until"]) > TODAY + dt.timedelta(days=360)
    assert row["form"] is False and row["renews"] is None and row["revoked_at"] is None

    table = ok(run(home, "list")).stdout
    for text in ("Consents", "kim@speech.example", "tag:ot", "ot_progress",
                 "classroom supports", "auto", "active", TODAY.isoformat()):
        assert text in table

    shown = as_json(run(home, "show", str(row["id"]), "--json"))
    assert isinstance(shown, dict)
    assert {k: v for k, v in shown.items() if k != "deliveries"} == row
    assert shown["deliveries"] == {"queued": 0, "sent": 0, "failed": 0, "cancelled": 0}
    human = ok(run(home, "show", str(row["id"]))).stdout
    for text in (f"Consent #{row['id']}", "signed by", "pat@home.example", "renewed by",
                 "copies under it"):
        assert text in human


def test_list_filters_by_child_and_status(home: Path) -> None:
    alex = add(home)
    sam = as_json(run(home, "add", "--child", "sam", "--from", "lee@clinic.example",
                      "--to", "tag:teacher", "--category", "evaluation", "--purpose", "IEP",
                      "--signed-by", "dana@home.example", "--until",
                      (TODAY + dt.timedelta(days=90)).isoformat(), "--json"))
    later = add(home, "--valid-from", (TODAY + dt.timedelta(days=10)).isoformat())
    expired = add(home, "--purpose", "last year")
    with Runtime.open(load(home)).db.session() as s:
        row = s.get(Consent, expired["id"])
        assert row is not None
        row.valid_from = TODAY - dt.timedelta(days=400)
        row.valid_until = TODAY - dt.timedelta(days=35)
    ok(run(home, "revoke", str(alex["id"])))

    def ids(*args: str) -> dict[int, str]:
        return {r["id"]: r["status"] for r in as_json(run(home, "list", *args, "--json"))}

    assert isinstance(sam, dict)
    assert ids() == {sam["id"]: "active", later["id"]: "not yet valid"}
    assert ids("--child", "sam") == {sam["id"]: "active"}
    assert ids("--all") == {alex["id"]: "revoked", sam["id"]: "active",
                            later["id"]: "not yet valid", expired["id"]: "expired"}
    table = ok(run(home, "list", "--all")).stdout
    assert "revoked" in table and "expired" in table and "not yet valid" in table
    assert "no consents in force" in ok(run(home, "list", "--child", "jo")).stdout
    assert "no child 'nobody'" in failed(run(home, "list", "--child", "nobody"))


def test_validation_errors_are_one_line_each(home: Path) -> None:
    err = failed(run(home, "add", "--child", "alex", "--from", "kim@speech.example",
                     "--to", "everyone", "--to", "tag:nurse", "--to", "stranger@example.net",
                     "--category", "mental_health", "--category", "psychotherapy_notes",
                     "--purpose", "x", "--mode", "auto"))
    lines = err.strip().splitlines()
    assert all(line.startswith("Error: ") for line in lines), lines
    for part in ("never covers everyone", "tag 'nurse'",
                 "stranger@example.net is not a member of alex's team",
                 "psychotherapy_notes: never released under a standing consent",
                 "is sensitive", "guardians must sign"):
        assert sum(part in line for line in lines) == 1, (part, lines)
    with Runtime.open(load(home)).db.session() as s:
        assert s.scalars(select(Consent)).all() == []


def test_illinois_needs_until_and_a_13_year_old_co_signs(home: Path) -> None:
    base = ("--child", "sam", "--from", "lee@clinic.example", "--to", "park@school.example",
            "--category", "mental_health", "--purpose", "school counselling",
            "--signed-by", "dana@home.example")
    err = failed(run(home, "add", *base))
    assert "requires a calendar expiry date (--until)" in err
    assert "the student must sign too (--signed-by sam@kids.example)" in err
    until = (TODAY + dt.timedelta(days=180)).isoformat()
    err = failed(run(home, "add", *base, "--until", until))
    assert "Illinois requires the child's own consent for mental_health" in err
    assert "--until" not in err
    info = as_json(run(home, "add", *base, "--until", until, "--signed-by", "sam@kids.example",
                       "--json"))
    assert isinstance(info, dict)
    assert info["signed_by"] == ["dana@home.example", "sam@kids.example"]
    assert info["valid_until"] == until


def test_usage_errors_exit_2(home: Path) -> None:
    err = failed(run(home, "add", *OT, "--until", "next week"), code=2)
    assert "is not a date; use YYYY-MM-DD" in err
    assert "--mode" in failed(run(home, "add", *OT, "--mode", "sometimes"), code=2)
    assert "--child" in failed(run(home, "add", "--from", "kim@speech.example"), code=2)
    failed(run(home, "show", "abc"), code=2)


def test_unknown_ids_and_missing_home(home: Path, tmp_path: Path) -> None:
    assert "no consent #99" in failed(run(home, "show", "99"))
    assert "no consent #99" in failed(run(home, "revoke", "99"))
    assert "no consent #99" in failed(run(home, "renew", "99"))
    err = failed(run(tmp_path / "nowhere", "list"))
    assert "broker.toml not found" in err


def test_form_is_stored_encrypted_and_given_back(home: Path, tmp_path: Path) -> None:
    marker = b"SIGNED-BY-DANA-" + os.urandom(8).hex().encode()
    src = tmp_path / "outside"
    src.mkdir()
    form = src / "release.pdf"
    pdf = b"%PDF-1.7\n1 0 obj << /Title (" + marker + b") >> endobj\n%%EOF\n"
    form.write_bytes(pdf)
    info = add(home, "--form", str(form))
    assert info["form"] is True
    assert info["form_sha256"] == hashlib.sha256(pdf).hexdigest()
    assert "signed form stored" in ok(run(home, "add", *OT, "--form", str(form),
                                          "--purpose", "again")).stdout
    # Nowhere in the clear: the home (content store, keys, config) and the SQLite database
    # with its WAL (under tmp_path, outside the form's own folder).
    scanned = [p for p in tmp_path.rglob("*") if p.is_file() and src not in p.parents]
    assert any(p.name.startswith("broker.db") for p in scanned) or "postgresql" in str(
        load(home).database_url)
    for path in scanned:
        assert marker not in path.read_bytes(), path

    out = src / "copy.pdf"
    result = ok(run(home, "show", str(info["id"]), "--form-out", str(out)))
    assert f"written to {out}" in result.stdout
    assert out.read_bytes() == pdf
    assert out.stat().st_mode & 0o777 == 0o600
    out2 = src / "copy2.pdf"
    shown = as_json(run(home, "show", str(info["id"]), "--form-out", str(out2), "--json"))
    assert isinstance(shown, dict) and shown["form"] is True
    assert out2.read_bytes() == pdf

    plain = add(home, "--purpose", "no form")
    assert "has no signed form" in failed(run(home, "show", str(plain["id"]), "--form-out",
                                              str(src / "none.pdf")))
    text = src / "letter.txt"
    text.write_text("I agree")
    assert "must be a PDF" in failed(run(home, "add", *OT, "--form", str(text)))
    assert "cannot read the form" in failed(run(home, "add", *OT, "--form",
                                                str(src / "missing.pdf")))


def test_revoke_stops_queued_copies(home: Path) -> None:
    info = add(home, "--mode", "auto", "--to", "tag:teacher")
    rt = Runtime.open(load(home))
    try:
        partly = releasing_record(rt)
        sent = copy(rt, partly, "ortiz@school.example", info["id"], "sent")
        queued = copy(rt, partly, "park@school.example", info["id"])
        waiting = releasing_record(rt)
        w1 = copy(rt, waiting, "ortiz@school.example", info["id"])
        w2 = copy(rt, waiting, "park@school.example", info["id"])

        result = ok(run(home, "revoke", str(info["id"]), "--reason", "withdrawn by phone"))
        assert (f"consent #{info['id']} (alex) revoked: 3 queued copies stopped; 1 already "
                "delivered copy cannot be recalled") in result.stdout
        assert f"record {waiting} stopped" in result.stdout
        with rt.db.session() as s:
            got = {d.id: d.state for d in s.scalars(select(Delivery))}
            assert got[sent] == "sent"
            assert got[queued] == got[w1] == got[w2] == "cancelled"
            record = s.get(Record, waiting)
            assert record is not None and record.state == states.STOPPED
            [event] = s.scalars(select(AuditEvent)
                                .where(AuditEvent.action == "consent_revoked")).all()
            desc = json.loads(event.description)
            assert (event.actor, event.actor_role) == ("operator", "operator")
            assert desc["already_delivered"] == 1 and desc["cancelled"] == 3
            assert desc["reason"] == "withdrawn by phone"
    finally:
        rt.close()

    shown = as_json(run(home, "show", str(info["id"]), "--json"))
    assert isinstance(shown, dict)
    assert shown["status"] == "revoked" and shown["revoked_by"] == "operator"
    assert shown["deliveries"] == {"queued": 0, "sent": 1, "failed": 0, "cancelled": 3}
    assert "already revoked" in failed(run(home, "revoke", str(info["id"])))

    other = add(home, "--purpose", "other")
    out = as_json(run(home, "revoke", str(other["id"]), "--json"))
    assert out == {"consent": other["id"], "child": "alex", "status": "revoked",
                   "cancelled": [], "already_delivered": 0, "stopped_records": [],
                   "also_revoked": []}


def test_renew(home: Path) -> None:
    until = TODAY + dt.timedelta(days=30)
    old = add(home, "--until", until.isoformat())
    result = ok(run(home, "renew", str(old["id"])))
    match = re.search(r"consent #(\d+) renews #(\d+) for alex: valid (\S+) to (\S+)",
                      result.stdout)
    assert match, result.stdout
    new_id = int(match.group(1))
    assert int(match.group(2)) == old["id"]
    assert match.group(3) == (until + dt.timedelta(days=1)).isoformat()

    old_shown = as_json(run(home, "show", str(old["id"]), "--json"))
    new_shown = as_json(run(home, "show", str(new_id), "--json"))
    assert isinstance(old_shown, dict) and isinstance(new_shown, dict)
    assert old_shown["renewed_by"] == new_id and old_shown["status"] == "active"
    assert old_shown["valid_until"] == until.isoformat()
    assert new_shown["renews"] == old["id"] and new_shown["status"] == "not yet valid"
    assert f"#{old['id']}" in ok(run(home, "show", str(new_id))).stdout
    assert f"renewed by #{new_id}" in ok(run(home, "list")).stdout
    assert "already renewed" in failed(run(home, "renew", str(old["id"])))

    # Revoking the old one also revokes its renewal: withdrawn means withdrawn.
    out = ok(run(home, "revoke", str(old["id"]))).stdout
    assert f"consent #{new_id} (its renewal) revoked with it" in out
    assert as_json(run(home, "show", str(new_id), "--json"))["status"] == "revoked"

    revoked = add(home, "--purpose", "to revoke")
    ok(run(home, "revoke", str(revoked["id"])))
    assert "was revoked" in failed(run(home, "renew", str(revoked["id"])))

    il = as_json(run(home, "add", "--child", "sam", "--from", "lee@clinic.example",
                     "--to", "tag:teacher", "--category", "evaluation", "--purpose", "IEP",
                     "--signed-by", "dana@home.example", "--until",
                     (TODAY + dt.timedelta(days=5)).isoformat(), "--json"))
    assert isinstance(il, dict)
    assert "--until" in failed(run(home, "renew", str(il["id"])))
    renewed = as_json(run(home, "renew", str(il["id"]), "--until",
                          (TODAY + dt.timedelta(days=300)).isoformat(), "--json"))
    assert isinstance(renewed, dict)
    assert set(renewed) == JSON_FIELDS and renewed["renews"] == il["id"]


def test_every_command_and_option_has_help() -> None:
    assert consent.help
    for name, command in consent.commands.items():
        assert command.help, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, (name, param.name)
    result = CliRunner().invoke(cli, ["consent", "--help"])
    assert result.exit_code == 0
    for name in ("add", "list", "show", "revoke", "renew"):
        assert name in result.output
