"""`broker audit`'s listing read without SQLAlchemy (broker.audit.fastread) gives exactly
what broker.audit.queries gives: the same rows for every filter, limit and count, and the
same bytes from the command (JSON, CSV, the table, the "showing the latest" note, the
unknown-child error). Where it cannot read a database (not at the newest migration, an
unknown URL) the command takes the SQLAlchemy path. And a new `broker audit --child`
process imports neither SQLAlchemy nor rich nor psycopg. SQLite and PostgreSQL.

The history is test_audit_report's (sealed delivery summaries, a legacy event carrying
its own subject, failed and cancelled copies), plus a second child with a longer log.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from broker.audit import fastread, listing, queries
from broker.audit.log import record_event
from broker.cli import audit as audit_cli
from broker.cli.context import Broker
from broker.db.models import Child
from tests import test_audit_report
from tests.test_audit_report import HOSTILE, write_history

REPO = Path(__file__).resolve().parents[1]
START = dt.datetime(2025, 3, 1, 6, 0, tzinfo=dt.UTC)

# The same fixtures as the report's tests: a home on the test's database with its own key
# file, and the broker opened on it as the CLI opens it.
home = test_audit_report.home
broker = test_audit_report.broker


@pytest.fixture
def world(broker: Broker) -> Broker:
    """Sam's history from test_audit_report, one summary left unsealed as written before
    sealing existed, and Alex: 60 events, every third a legacy "delivered" one, with
    names, quotes and control characters."""
    write_history(broker)
    with broker.db.session() as s:
        first = s.execute(text("SELECT min(id) FROM deliveries")).scalar_one()
        s.execute(
            text("UPDATE deliveries SET summary = :summary WHERE id = :id"),
            {"id": first, "summary": json.dumps({"subject": "Plain old summary",
                                                 "attachments": ["old.pdf"]})},
        )
        s.add(Child(slug="alex", name="Alex"))
    for i in range(60):
        with broker.db.session() as s:
            delivered = i % 3 == 0
            record_event(
                s, action="delivered" if delivered else "held",
                actor="broker" if delivered else "lee@clinic.example",
                # One empty role: an empty text is not NULL (libpq hands back b"" for both).
                actor_role="system" if delivered else "" if i == 1 else "provider",
                child="alex",
                record_id=100 + i // 4, recipients=[f"zoë{i}@school.example"],
                description={
                    "recipient_name": 'Zoë "Z" Müller' if i % 2 else "",
                    "subject": f"Update {i}\x1b[31m, red; with: separators",
                    "sha256": f"{i:064x}", "released_by": "dana@home.example",
                    "attachments": [f"a{i}.pdf", "b.docx"] if i % 5 == 0 else [],
                } if delivered else {"from": "received", "to": "held", "n": i},
                at=START + dt.timedelta(hours=7 * i),
            )
    return broker


# -- the same rows -------------------------------------------------------------------------

FILTERS: list[tuple[str | None, dt.date | None, dt.date | None, int | None]] = [
    (None, None, None, None),
    ("sam", None, None, None),
    ("alex", None, None, None),
    ("sam", dt.date(2025, 3, 1), dt.date(2025, 3, 31), None),
    (None, dt.date(2025, 3, 8), None, None),
    (None, None, dt.date(2025, 3, 9), None),
    ("alex", dt.date(2025, 3, 5), dt.date(2025, 3, 12), None),
    (None, None, None, 1),
    ("alex", None, None, 105),
    ("sam", dt.date(2030, 1, 1), None, None),
]
LIMITS = [None, 1, 3, 50]


def _fields(items: list[Any]) -> list[dict[str, Any]]:
    """Everything a row holds, export format and the rest."""
    return [{**vars(i), "as_dict": i.as_dict()} for i in items]


def test_same_rows_and_counts_as_queries(world: Broker) -> None:
    vault = fastread_vault(world)
    checked = 0
    with world.db.read_session() as s, fastread.open_reader(world.settings.database_url) as r:
        assert fastread.child_slugs(r) == queries.child_slugs(s) == ["alex", "sam"]
        for filters in FILTERS:
            for limit in LIMITS:
                slow = queries.disclosures(s, *filters, limit=limit)
                fast = fastread.disclosures(r, vault, *filters, limit=limit)
                assert _fields(fast) == _fields(slow), (filters, limit)
                slow_events = queries.events(s, *filters, limit=limit)
                assert _fields(fastread.events(r, *filters, limit=limit)) == _fields(
                    slow_events), (filters, limit)
                checked += len(slow) + len(slow_events)
            for only in (True, False):
                assert fastread.count_matching(r, *filters, disclosures_only=only) == (
                    queries.count_matching(s, *filters, disclosures_only=only)), filters
    assert checked > 500  # the filters select something


def test_psycopg_reads_the_same_where_libpq_cannot_be_loaded(
    world: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = world.settings.database_url
    if not url.startswith("postgresql"):
        pytest.skip("the psycopg reader is for PostgreSQL")
    monkeypatch.setattr(fastread, "_load_libpq", lambda: None)
    vault = fastread_vault(world)
    with world.db.read_session() as s, fastread.open_reader(url) as r:
        assert isinstance(r, fastread.PsycopgReader)
        for filters in FILTERS:
            for limit in (None, 3):
                assert _fields(fastread.disclosures(r, vault, *filters, limit=limit)) == (
                    _fields(queries.disclosures(s, *filters, limit=limit))), filters
                assert _fields(fastread.events(r, *filters, limit=limit)) == (
                    _fields(queries.events(s, *filters, limit=limit))), filters
            assert fastread.count_matching(r, *filters, disclosures_only=True) == (
                queries.count_matching(s, *filters, disclosures_only=True))


def test_libpq_is_what_reads_postgresql(world: Broker) -> None:
    url = world.settings.database_url
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    with fastread.open_reader(url) as r:
        assert isinstance(r, fastread.LibpqReader)


def fastread_vault(broker: Broker) -> Any:
    from broker.crypto.vault import registered

    return registered(broker.settings.database_url)


def test_what_was_sent_comes_from_the_sealed_summary(world: Broker) -> None:
    """Not a tautology of the comparison: the summaries are really sealed and opened."""
    with world.db.engine.connect() as conn:
        stored = [v for (v,) in conn.execute(text("SELECT summary FROM deliveries ORDER BY id"))]
    assert sum(v.startswith("QlJLU") for v in stored) >= 3 and "Plain old summary" in stored[0]
    with fastread.open_reader(world.settings.database_url) as r:
        rows = fastread.disclosures(r, fastread_vault(world), "sam")
    subjects = [d.subject for d in rows]
    assert subjects == ["Old field-trip form", "Plain old summary", HOSTILE, "April note"]
    assert rows[1].attachments == ("old.pdf",) and rows[2].delivery_id is not None
    # Without the key a sealed summary is not served wrongly: the command falls back.
    with fastread.open_reader(world.settings.database_url) as r, pytest.raises(
        fastread.Unavailable
    ):
        fastread.disclosures(r, None, "sam")


# -- the same output -----------------------------------------------------------------------


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(audit_cli.audit, ["--home", str(home), *args],
                              prog_name="broker audit")


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[[], None]]:
    """Switches: `slow()` makes the command skip the fast path; `fast_only()` makes the
    SQLAlchemy path fail, so a passing command proves it was served fast."""

    def slow() -> None:
        monkeypatch.setattr(audit_cli, "show_fast", lambda *a, **k: False)

    def fast_only() -> None:
        def no(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("the SQLAlchemy path was taken")

        monkeypatch.setattr(audit_cli, "show", no)

    return {"slow": slow, "fast_only": fast_only}


COMMANDS = [
    (), ("--child", "sam"), ("--child", "alex"), ("--child", "alex", "--limit", "3"),
    ("--all",), ("--all", "--child", "alex"), ("--all", "--limit", "0"),
    ("--json",), ("--csv",), ("--child", "sam", "--json"), ("--all", "--json"),
    ("--all", "--csv", "--child", "alex"), ("--json", "--limit", "2"),
    ("--csv", "--all", "--limit", "5", "--since", "2025-03-03"),
    ("--record", "1"), ("--record", "105", "--all"),
    ("--since", "2025-03-08", "--until", "2025-03-21", "--child", "sam"),
    ("--since", "2030-01-01"), ("--since", "2030-01-01", "--all", "--json"),
    ("--child", "sma"), ("--child", "sma", "--all", "--json"),
]


def test_command_output_is_identical_on_both_paths(
    home: Path, world: Broker, monkeypatch: pytest.MonkeyPatch,
    paths: dict[str, Callable[[], None]],
) -> None:
    monkeypatch.setattr(listing, "TABLE_LIMIT", 7)  # the note, on SQLite and PostgreSQL
    with monkeypatch.context() as m:
        m.setattr(audit_cli, "show", _never)
        fast = {args: run(home, *args) for args in COMMANDS}
    paths["slow"]()
    slow = {args: run(home, *args) for args in COMMANDS}
    for args in COMMANDS:
        f, s = fast[args], slow[args]
        assert (f.exit_code, f.stdout, f.stderr) == (s.exit_code, s.stdout, s.stderr), args
    # And they say what they should.
    assert "showing the latest 7 of 20 disclosures" in fast[("--child", "alex")].stdout
    assert "showing the latest 2 of" in fast[("--json", "--limit", "2")].stderr
    assert json.loads(fast[("--json", "--limit", "2")].stdout)
    unknown = fast[("--child", "sma")]
    assert unknown.exit_code == 2 and "no child 'sma' (known: alex, sam)" in unknown.output


def _never(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the SQLAlchemy path was taken")


def test_plain_table_keeps_the_columns_and_every_line(home: Path, world: Broker) -> None:
    out = run(home, "--child", "sam").stdout
    lines = out.splitlines()
    assert lines[0] == "Disclosures"
    assert lines[1].split() == ["date", "child", "record", "recipient", "what", "was",
                                "sent", "released", "by"]
    assert set(lines[2]) == {"-", " "}
    assert "2025-03-02 10:01 UTC  sam" in out and "Ms Park <park@school.example>" in out
    assert "+ old.pdf" in out and HOSTILE in out
    # Every row's cells start where their header does.
    column = lines[1].index("recipient")
    assert all(line[column:].startswith(("Ms Park", "Coach Reyes")) for line in lines[3:]
               if "UTC" in line)
    events = run(home, "--all", "--child", "alex", "--limit", "4").stdout
    assert events.splitlines()[0] == "Audit events"
    assert "\x1b" not in events  # a control character in a subject is shown, not obeyed
    assert "showing the latest 4 of 60 events" in events


def test_a_terminal_still_gets_the_rich_table(
    home: Path, world: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listing, "_stdout_is_terminal", lambda: True)
    out = run(home, "--child", "sam").stdout
    assert "━" in out or "─" in out  # rich's box drawing
    assert "Disclosures" in out and "Plain old summary" in out and "April note" in out


# -- where it steps aside --------------------------------------------------------------------


def test_falls_back_when_the_schema_is_not_at_the_newest_migration(
    home: Path, world: Broker, paths: dict[str, Callable[[], None]],
) -> None:
    with world.db.session() as s:
        (version,) = s.execute(text("SELECT version_num FROM alembic_version")).one()
        assert version == fastread.head_revision()
        s.execute(text("UPDATE alembic_version SET version_num = '0007'"))
    with pytest.raises(fastread.Unavailable), fastread.open_reader(
        world.settings.database_url
    ):
        pass
    paths["fast_only"]()
    result = run(home, "--child", "sam")
    assert result.exit_code == 1 and "SQLAlchemy path was taken" in repr(result.exception)


def test_unknown_urls_are_not_read_here() -> None:
    for url in ("mysql://u@h/db", "postgres://u@h/db", "postgresql+psycopg2://u@h/db",
                "sqlite://", "sqlite:///:memory:",
                "sqlite:///nowhere/broker.db", "sqlite:///x.db?mode=ro"):
        with pytest.raises(fastread.Unavailable):
            fastread.connect(url)


def test_head_revision_is_the_newest_migration_file() -> None:
    newest = max(p.name for p in fastread.VERSIONS.glob("0*.py"))
    assert fastread.head_revision() == newest.split("_")[0]


# -- a new process imports none of the heavy libraries ---------------------------------------


def test_a_new_process_imports_no_sqlalchemy(home: Path, world: Broker) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "broker.cli.main", "audit", "--home",
         str(home), "--child", "sam"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "April note" in done.stdout
    imported = {line.split("|")[-1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "click" in imported  # the listing is read: -X importtime worked
    assert not imported & {"sqlalchemy", "rich", "psycopg", "alembic"}, sorted(imported)
    # Nor what only other commands need (about 10 ms of a 100 ms budget): logging, key
    # creation and derivation, the vault's streamed opening.
    modules = {line.split("|")[-1].strip() for line in done.stderr.splitlines()
               if line.startswith("import time:")}
    assert not modules & {"logging", "secrets", "cryptography.hazmat.primitives.kdf.hkdf",
                          "cryptography.hazmat.primitives.hashes"}, sorted(modules)


# -- the command's entry point: the listing without click ------------------------------------


def _command(home: Path, module: str, *args: str,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -X importtime -m MODULE audit ARGS` in a new process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "audit", *args],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def _imported(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip().split(".")[0]
            for line in stderr.splitlines() if line.startswith("import time:")}


def _output(stderr: str) -> str:
    """stderr less -X importtime's lines, the program named as `python -m broker`."""
    return _same_name("".join(line for line in stderr.splitlines(keepends=True)
                              if not line.startswith("import time:")))


def _same_name(text: str) -> str:
    return text.replace("python -m broker.cli.main", "python -m broker")


# (arguments after `audit` less --home, whether the entry point answers without click)
ENTRY_COMMANDS = [
    (("--child", "sam"), True), (("--child=alex", "--limit", "3"), True),
    (("--all", "--child", "alex", "--json"), True), (("--csv", "--record", "105"), True),
    (("--since", "2025-03-08", "--until=2025-03-21"), True), ((), True),
    # ...and what it leaves to click, which must answer exactly as it always has:
    (("--child", "sma"), False),                   # unknown child: click's error, exit 2
    (("--json", "--csv"), False),                  # a usage error
    (("--since", "2025-13-01"), False),            # not a date
    (("--record", "0"), False),                    # out of range
    (("--child", "sam", "--child", "alex"), False),  # repeated: click takes the last
    (("--help",), False), (("verify",), False),
]


def test_the_command_lists_without_click_and_prints_what_click_prints(
    home: Path, world: Broker
) -> None:
    for args, fast in ENTRY_COMMANDS:
        entry = _command(home, "broker", "--home", str(home), *args)
        click_only = _command(home, "broker.cli.main", "--home", str(home), *args)
        assert (entry.returncode, entry.stdout, _output(entry.stderr)) == (
            click_only.returncode, _same_name(click_only.stdout),
            _output(click_only.stderr)), args
        assert ("click" not in _imported(entry.stderr)) == fast, args
        assert not _imported(entry.stderr) & {"sqlalchemy", "rich", "psycopg"} or not fast
    # The home from the environment, as click's --home takes it.
    by_env = _command(home, "broker", "--child", "sam", env={"BROKER_HOME": str(home)})
    assert by_env.returncode == 0 and "April note" in by_env.stdout
    assert "click" not in _imported(by_env.stderr)
    # And what they print is the listing.
    sam = _command(home, "broker", "--home", str(home), "--child", "sam")
    assert sam.stdout.startswith("Disclosures\n") and "Plain old summary" in sam.stdout


def test_the_entry_point_takes_only_what_click_would_read_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker.cli.entry import parse_listing

    monkeypatch.delenv("BROKER_HOME", raising=False)
    got = parse_listing(["audit", "--home=/h", "--child", "sam", "--since", " 2025-03-01",
                         "--until", "2025-03-31", "--record", "7", "--limit", "0", "--all",
                         "--json"])
    assert got == {"home": "/h", "child": "sam", "since": dt.date(2025, 3, 1),
                   "until": dt.date(2025, 3, 31), "record": 7, "limit": 0,
                   "show_all": True, "as_json": True, "as_csv": False}
    assert parse_listing(["audit"]) == {
        "home": None, "child": None, "since": None, "until": None, "record": None,
        "limit": None, "show_all": False, "as_json": False, "as_csv": False}
    monkeypatch.setenv("BROKER_HOME", "/from-env")
    assert parse_listing(["audit", "--csv"])["home"] == "/from-env"  # type: ignore[index]
    assert parse_listing(["audit", "--home", "/h"])["home"] == "/h"  # type: ignore[index]
    for argv in (
        [], ["records"], ["--version"], ["audit", "verify"], ["audit", "report"],
        ["audit", "--help"], ["audit", "-h"], ["audit", "--"], ["audit", "--child"],
        ["audit", "--child", "--all"], ["audit", "--child", ""], ["audit", "--child="],
        ["audit", "--all=yes"], ["audit", "--json", "--json"], ["audit", "--json", "--csv"],
        ["audit", "--record", "0"], ["audit", "--record", "x"], ["audit", "--limit", "-1"],
        ["audit", "--since", "2025-02-30"], ["audit", "--since", "2025-03-02", "--until",
                                             "2025-03-01"],
        ["audit", "--chlid", "sam"], ["audit", "sam"],
    ):
        assert parse_listing(argv) is None, argv
