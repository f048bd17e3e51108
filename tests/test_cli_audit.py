"""`broker audit`: the parent sees who received what, can filter and export it, and can
prove the log was not altered. Runs the real command against a real home on SQLite and
PostgreSQL."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from broker.audit.log import record_event
from broker.cli.audit import audit
from broker.config import render_config
from broker.db.engine import Database
from broker.db.models import Child


@pytest.fixture
def home(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A broker home whose database is the test's (BROKER_DATABASE_URL wins over the file)."""
    path = tmp_path / "home"
    path.mkdir()
    (path / "broker.toml").write_text(
        render_config(domain="records.example", listen="127.0.0.1:2525", relay="127.0.0.1:2526"),
        encoding="utf-8",
    )
    monkeypatch.setenv("BROKER_DATABASE_URL", db_url)
    monkeypatch.delenv("BROKER_HOME", raising=False)
    return path


def at(day: int, hour: int = 10, minute: int = 0, second: int = 0, month: int = 3) -> dt.datetime:
    return dt.datetime(2025, month, day, hour, minute, second, tzinfo=dt.UTC)


def delivered(
    db: Database,
    *,
    child: str,
    record: int,
    email: str,
    name: str,
    subject: str,
    when: dt.datetime,
    attachments: tuple[str, ...] = (),
) -> None:
    with db.session() as s:
        record_event(
            s,
            action="delivered",
            actor="broker",
            actor_role="system",
            child=child,
            record_id=record,
            recipients=[email],
            description={
                "recipient_name": name,
                "subject": subject,
                "sha256": "cd" * 32,
                "released_by": "dana@home.example",
                "record": record,
                "attachments": list(attachments),
            },
            at=when,
        )


def held(db: Database, *, child: str, record: int, when: dt.datetime) -> None:
    with db.session() as s:
        record_event(
            s,
            action="held",
            actor="lee@clinic.example",
            actor_role="provider",
            child=child,
            record_id=record,
            recipients=["dana@home.example"],
            description={"from": "received", "to": "held"},
            at=when,
        )


@pytest.fixture
def log(db: Database) -> Database:
    """Seven events: two children, five released copies, one at each edge of March 31."""
    with db.session() as s:
        s.add_all([Child(slug="sam", name="Sam"), Child(slug="alex", name="Alex")])
    held(db, child="sam", record=1, when=at(1, 9))  # seq 1
    delivered(
        db, child="sam", record=1, email="park@school.example", name="Ms Park",
        subject="OT report March", when=at(2), attachments=("ot-report.pdf", "goals.docx"),
    )  # seq 2
    delivered(
        db, child="sam", record=1, email="lee@clinic.example", name="Dr Lee",
        subject="OT report March", when=at(2, 10, 1),
    )  # seq 3
    held(db, child="alex", record=2, when=at(5))  # seq 4
    delivered(
        db, child="alex", record=2, email="coach@school.example", name="Coach Rivera",
        subject="Alex speech update", when=at(6),
    )  # seq 5
    delivered(
        db, child="sam", record=3, email="park@school.example", name="Ms Park",
        subject="Late March note", when=at(31, 23, 59, 59),
    )  # seq 6
    delivered(
        db, child="sam", record=4, email="park@school.example", name="Ms Park",
        subject="April note", when=at(1, 0, 0, 0, month=4),
    )  # seq 7
    return db


def run(home: Path, *args: str) -> Result:
    """`broker audit ...`; the group is invoked directly so this file tests only it."""
    return CliRunner().invoke(audit, ["--home", str(home), *args], prog_name="broker audit")


def seqs_json(result: Result) -> list[int]:
    assert result.exit_code == 0, result.output
    return [row["seq"] for row in json.loads(result.stdout)]


def test_default_table_lists_each_released_copy(home: Path, log: Database) -> None:
    result = run(home)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Ms Park <park@school.example>" in out
    assert "Dr Lee <lee@clinic.example>" in out
    assert "Coach Rivera <coach@school.example>" in out
    assert "OT report March" in out
    assert "ot-report.pdf, goals.docx" in out
    assert "dana@home.example" in out
    assert "2025-03-02 10:00 UTC" in out
    # Disclosures only: the "held" events are not copies anyone received.
    assert "held" not in out


def test_json_filters_by_child_dates_and_record(home: Path, log: Database) -> None:
    assert seqs_json(run(home, "--json")) == [2, 3, 5, 6, 7]
    assert seqs_json(run(home, "--child", "sam", "--json")) == [2, 3, 6, 7]
    assert seqs_json(run(home, "--child", "alex", "--json")) == [5]
    # Both ends inclusive on the UTC day: 23:59:59 on the 31st is in, April 1st is out.
    assert seqs_json(
        run(home, "--child", "sam", "--since", "2025-03-02", "--until", "2025-03-31", "--json")
    ) == [2, 3, 6]
    assert seqs_json(run(home, "--since", "2025-03-03", "--json")) == [5, 6, 7]
    assert seqs_json(run(home, "--until", "2025-03-01", "--json")) == []
    assert seqs_json(run(home, "--record", "1", "--json")) == [2, 3]


def test_json_rows_carry_what_was_sent(home: Path, log: Database) -> None:
    result = run(home, "--record", "1", "--json")
    first = json.loads(result.output)[0]
    assert first == {
        "seq": 2,
        "at": "2025-03-02T10:00:00+00:00",
        "child": "sam",
        "record": 1,
        "recipient": "park@school.example",
        "recipient_name": "Ms Park",
        "subject": "OT report March",
        "attachments": ["ot-report.pdf", "goals.docx"],
        "sha256": "cd" * 32,
        "released_by": "dana@home.example",
    }


def test_csv_has_header_and_one_row_per_copy(home: Path, log: Database) -> None:
    result = run(home, "--child", "sam", "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert result.output.splitlines()[0].startswith("seq,at,child,record,recipient,")
    assert [r["seq"] for r in rows] == ["2", "3", "6", "7"]
    assert rows[0]["recipient"] == "park@school.example"
    assert rows[0]["attachments"] == "ot-report.pdf; goals.docx"
    assert rows[1]["attachments"] == ""


def test_csv_with_no_match_is_just_the_header(home: Path, log: Database) -> None:
    result = run(home, "--since", "2030-01-01", "--csv")
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 1


def test_all_shows_every_event(home: Path, log: Database) -> None:
    result = run(home, "--all", "--child", "sam")
    assert result.exit_code == 0, result.output
    assert "held" in result.output and "delivered" in result.output
    assert "lee@clinic.example (provider)" in result.output
    assert "coach@school.example" not in result.output

    rows = json.loads(run(home, "--all", "--json").output)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[0]["action"] == "held"
    assert rows[0]["description"] == {"from": "received", "to": "held"}
    assert [r["seq"] for r in json.loads(run(home, "--all", "--record", "2", "--json").output)] == [
        4,
        5,
    ]


def test_all_csv_has_event_columns(home: Path, log: Database) -> None:
    result = run(home, "--all", "--csv", "--until", "2025-03-01")
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["action"] for r in rows] == ["held"]
    assert rows[0]["recipients"] == "dana@home.example"
    assert json.loads(rows[0]["description"]) == {"from": "received", "to": "held"}


@pytest.mark.parametrize("bad", ["2025-13-01", "yesterday", "31/03/2025"])
def test_bad_dates_are_refused_clearly(home: Path, log: Database, bad: str) -> None:
    result = run(home, "--since", bad)
    assert result.exit_code == 2
    assert "YYYY-MM-DD" in result.output
    assert bad in result.output


def test_inverted_range_unknown_child_and_two_formats_are_errors(
    home: Path, log: Database
) -> None:
    result = run(home, "--since", "2025-04-01", "--until", "2025-03-01")
    assert result.exit_code == 2
    assert "after" in result.output
    result = run(home, "--child", "sma")
    assert result.exit_code == 2
    assert "no child 'sma'" in result.output and "alex, sam" in result.output
    result = run(home, "--json", "--csv")
    assert result.exit_code == 2
    assert "--json" in result.output and "--csv" in result.output


def test_empty_result_says_so(home: Path, log: Database) -> None:
    result = run(home, "--since", "2030-01-01")
    assert result.exit_code == 0
    assert "no disclosures match" in result.output
    assert json.loads(run(home, "--since", "2030-01-01", "--json").output) == []


def test_verify_ok(home: Path, log: Database) -> None:
    result = run(home, "verify")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "audit log OK: 7 events"
    # --home also works after the subcommand.
    result = CliRunner().invoke(audit, ["verify", "--home", str(home)])
    assert result.exit_code == 0, result.output


def test_verify_empty_log(home: Path, db: Database) -> None:
    result = run(home, "verify")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "audit log OK: 0 events"


def test_verify_names_the_tampered_seq(home: Path, log: Database) -> None:
    with log.session() as s:
        s.execute(
            text("UPDATE audit_events SET recipients = :r WHERE seq = 3"),
            {"r": '["someone@elsewhere.example"]'},
        )
    result = run(home, "verify")
    assert result.exit_code == 1
    assert result.output.strip().startswith("audit log BROKEN at seq 3: ")
    assert "hash does not match" in result.output


def test_verify_finds_a_deleted_last_event(home: Path, log: Database) -> None:
    with log.session() as s:
        s.execute(text("DELETE FROM audit_events WHERE seq = 7"))
    result = run(home, "verify")
    assert result.exit_code == 1
    assert "audit log BROKEN at seq 7" in result.output


def test_filters_before_verify_are_refused(home: Path, log: Database) -> None:
    result = run(home, "--child", "sam", "verify")
    assert result.exit_code == 2
    assert "whole log" in result.output


def test_missing_home_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_HOME", raising=False)
    result = CliRunner().invoke(audit, ["--home", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert "broker.toml" in result.output


def test_table_shows_the_latest_and_says_how_many_more(
    home: Path, log: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Years of history would be thousands of rows: the table keeps the latest."""
    from broker.audit import listing

    monkeypatch.setattr(listing, "TABLE_LIMIT", 2)
    result = run(home, "--child", "sam")
    assert result.exit_code == 0, result.output
    assert "Late March note" in result.output and "April note" in result.output
    assert "OT report March" not in result.output
    assert "showing the latest 2 of 4 disclosures" in result.output
    assert "--limit 0" in result.output
    # All of them, and then no note.
    result = run(home, "--child", "sam", "--limit", "0")
    assert "OT report March" in result.output and "showing the latest" not in result.output
    # Exactly as many as there are: nothing left out, no note.
    assert "showing the latest" not in run(home, "--child", "alex").output


def test_limit_keeps_the_latest_in_chain_order(home: Path, log: Database) -> None:
    assert seqs_json(run(home, "--limit", "2", "--json")) == [6, 7]
    assert seqs_json(run(home, "--child", "sam", "--limit", "3", "--json")) == [3, 6, 7]
    assert seqs_json(run(home, "--all", "--limit", "3", "--json")) == [5, 6, 7]
    assert seqs_json(run(home, "--record", "1", "--limit", "1", "--json")) == [3]
    assert seqs_json(
        run(home, "--until", "2025-03-31", "--limit", "2", "--json")
    ) == [5, 6]
    # Exports are everything by default; a limited export stays valid JSON and CSV, the
    # note goes to stderr.
    assert seqs_json(run(home, "--json")) == [2, 3, 5, 6, 7]
    result = run(home, "--limit", "2", "--json")
    assert json.loads(result.stdout) and "showing the latest 2 of 5" in result.stderr
    result = run(home, "--all", "--limit", "1", "--csv")
    assert len(result.stdout.splitlines()) == 2
    assert "showing the latest 1 of 7 events" in result.stderr


def test_limit_is_a_listing_option(home: Path, log: Database) -> None:
    assert run(home, "--limit", "-1").exit_code == 2
    result = run(home, "--limit", "5", "verify")
    assert result.exit_code == 2 and "whole log" in result.output


def test_verify_on_several_cpus(
    home: Path, log: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`broker audit verify` splits a long log over processes; same answer."""
    from broker.audit import log as audit_log

    monkeypatch.setattr(audit_log, "PARALLEL_MIN", 4)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    result = run(home, "verify")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "audit log OK: 7 events"
    with log.session() as s:
        s.execute(text("UPDATE audit_events SET actor = 'x@y.example' WHERE seq = 2"))
    result = run(home, "verify")
    assert result.exit_code == 1
    assert result.output.strip().startswith("audit log BROKEN at seq 2: ")
