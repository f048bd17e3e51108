"""`broker records`: the operator and parent see what is held and why, one record's
deliveries and audit trail, and (only when asked) its content. Runs the real command
against a real home on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.audit.log import record_event
from broker.cli.records import records
from broker.config import load, render_config
from broker.content.codec import document_to_bytes
from broker.content.store import ContentStore
from broker.crypto.vault import load_vault
from broker.db.engine import Database
from broker.db.models import Child, Delivery, Record
from broker.mail.document import Attachment, Document, Paragraph
from broker.runtime import open_vault


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
    open_vault(load(path))  # the content key; sealed columns need it registered
    return path


def at(day: int, hour: int = 10) -> dt.datetime:
    return dt.datetime(2025, 3, day, hour, 0, tzinfo=dt.UTC)


DOC = Document(
    subject="OT progress report",
    sender="lee@clinic.example",
    sender_name="Dr Lee",
    date="Mon, 03 Mar 2025 10:00:00 +0000",
    paragraphs=(
        Paragraph("1", "Sam worked on fine motor goals."),
        Paragraph("2", "Family conflict was discussed at length."),
    ),
    attachments=(
        Attachment(
            label="A1",
            filename="ot-report.pdf",
            content_type="application/pdf",
            size=4,
            data=b"%PDF",
            paragraphs=(Paragraph("A1.1", "Handwriting improved."),),
        ),
    ),
)


def add_record(
    db: Database,
    *,
    child: str,
    state: str,
    subject: str,
    received: dt.datetime,
    **fields: object,
) -> int:
    with db.session() as s:
        kid = s.query(Child).filter_by(slug=child).one()
        record = Record(
            child_id=kid.id,
            state=state,
            sender_email="lee@clinic.example",
            subject=subject,
            raw_ref="ab" * 32,
            raw_sha256="ab" * 32,
            received_at=received,
            expires_at=received + dt.timedelta(days=14),
            **fields,
        )
        s.add(record)
        s.flush()
        record_event(
            s,
            action=state,
            actor="lee@clinic.example",
            actor_role="provider",
            child=child,
            record_id=record.id,
            recipients=["dana@home.example"],
            description={"from": "received", "to": state},
            at=received,
        )
        return record.id


@pytest.fixture
def ids(home: Path, db: Database) -> dict[str, int]:
    """Four records: sam held (with content and deliveries), sam quarantined, alex awaiting
    review, sam released."""
    with db.session() as s:
        s.add_all([Child(slug="sam", name="Sam"), Child(slug="alex", name="Alex")])
    doc_ref = ContentStore(home / "content", load_vault(home)).put(document_to_bytes(DOC))
    out = {
        "held": add_record(
            db, child="sam", state="held", subject="OT progress report", received=at(3),
            doc_ref=doc_ref, hold_reasons=json.dumps(["therapy record", "new recipient"]),
        ),
        "quarantined": add_record(
            db, child="sam", state="quarantined", subject="Hello?", received=at(4),
            quarantine_reason="unknown sender stranger@example.net",
        ),
        "alex": add_record(
            db, child="alex", state="awaiting_review", subject="Speech update", received=at(5)
        ),
        "released": add_record(
            db, child="sam", state="released", subject="IEP notes", received=at(6)
        ),
    }
    with db.session() as s:
        s.add_all(
            [
                Delivery(
                    kind="review", child_id=None, record_id=out["held"],
                    recipient="dana@home.example", message_id="<r1@records.example>",
                    content_ref="cd" * 32, sha256="cd" * 32, state="sent", attempts=1,
                    sent_at=at(3, 11),
                ),
                Delivery(
                    kind="release", record_id=out["held"], recipient="park@school.example",
                    message_id="<r2@records.example>", content_ref="ef" * 32, sha256="ef" * 32,
                    state="failed", attempts=3, last_error="550 mailbox unavailable",
                ),
                Delivery(
                    kind="release", record_id=out["released"], recipient="x@school.example",
                    message_id="<r3@records.example>", content_ref="ef" * 32, sha256="ef" * 32,
                    state="sent", attempts=1, sent_at=at(6, 12),
                ),
            ]
        )
    return out


def run(home: Path, *args: str) -> Result:
    """`broker records ...`; the group is invoked directly so this file tests only it."""
    return CliRunner().invoke(records, ["--home", str(home), *args], prog_name="broker records")


def listed(result: Result) -> list[int]:
    assert result.exit_code == 0, result.output
    return [row["id"] for row in json.loads(result.output)]


def test_list_table_shows_every_record(home: Path, ids: dict[str, int]) -> None:
    result = run(home)
    assert result.exit_code == 0, result.output
    for state in ("held", "quarantined", "awaiting_review", "released"):
        assert state in result.output
    assert "OT progress report" in result.output
    assert "lee@clinic.example" in result.output
    assert "2025-03-03 10:00 UTC" in result.output  # received
    assert "2025-03-17 10:00 UTC" in result.output  # expires, for the open hold
    assert "2025-03-20 10:00 UTC" not in result.output  # not for the released one


def test_list_filters_by_child_and_state(home: Path, ids: dict[str, int]) -> None:
    assert listed(run(home, "--json")) == sorted(ids.values())
    assert listed(run(home, "--child", "alex", "--json")) == [ids["alex"]]
    assert listed(run(home, "--child", "sam", "--json")) == [
        ids["held"], ids["quarantined"], ids["released"]
    ]
    assert listed(run(home, "--state", "held", "--json")) == [ids["held"]]
    assert listed(run(home, "--state", "HELD", "--state", "released", "--json")) == [
        ids["held"], ids["released"]
    ]
    assert listed(run(home, "--child", "alex", "--state", "held", "--json")) == []
    assert "no records match" in run(home, "--state", "denied").output


def test_list_json_fields(home: Path, ids: dict[str, int]) -> None:
    rows = json.loads(run(home, "--state", "held", "--json").output)
    row = rows[0]
    assert row["child"] == "sam"
    assert row["state"] == "held"
    assert row["sender"] == "lee@clinic.example"
    assert row["subject"] == "OT progress report"
    assert row["received_at"] == "2025-03-03T10:00:00+00:00"
    assert row["expires_at"] == "2025-03-17T10:00:00+00:00"
    assert row["hold_reasons"] == ["therapy record", "new recipient"]


def test_invalid_state_lists_the_valid_ones(home: Path, ids: dict[str, int]) -> None:
    result = run(home, "--state", "pending")
    assert result.exit_code == 2
    assert "pending" in result.output
    for state in ("held", "awaiting_review", "released", "quarantined", "expired"):
        assert state in result.output


def test_unknown_child_is_an_error(home: Path, ids: dict[str, int]) -> None:
    result = run(home, "--child", "sma")
    assert result.exit_code == 2
    assert "no child 'sma'" in result.output


def test_show_record_fields_deliveries_and_events(home: Path, ids: dict[str, int]) -> None:
    result = run(home, "show", str(ids["held"]))
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"Record {ids['held']}" in out
    assert "OT progress report" in out
    assert "- therapy record" in out and "- new recipient" in out
    assert "park@school.example" in out and "failed" in out
    assert "550 mailbox unavailable" in out
    assert "dana@home.example" in out
    assert "held" in out  # its audit event
    # Content is private: not shown unless asked for.
    assert "Family conflict" not in out
    # Another record's delivery is not shown here.
    assert "x@school.example" not in out


def test_show_quarantined_record_gives_the_reason(home: Path, ids: dict[str, int]) -> None:
    result = run(home, "show", str(ids["quarantined"]))
    assert result.exit_code == 0, result.output
    assert "unknown sender stranger@example.net" in result.output
    assert "no deliveries" in result.output


def test_show_json(home: Path, ids: dict[str, int]) -> None:
    result = run(home, "show", str(ids["held"]), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["record"]["id"] == ids["held"]
    assert data["record"]["hold_reasons"] == ["therapy record", "new recipient"]
    assert [(d["kind"], d["recipient"], d["state"], d["attempts"]) for d in data["deliveries"]] == [
        ("review", "dana@home.example", "sent", 1),
        ("release", "park@school.example", "failed", 3),
    ]
    assert data["deliveries"][0]["sent_at"] == "2025-03-03T11:00:00+00:00"
    assert data["deliveries"][1]["last_error"] == "550 mailbox unavailable"
    assert [(e["action"], e["record"]) for e in data["events"]] == [("held", ids["held"])]
    assert "content" not in data


def test_show_content_prints_numbered_paragraphs(home: Path, ids: dict[str, int]) -> None:
    result = run(home, "show", str(ids["held"]), "--content")
    assert result.exit_code == 0, result.output
    assert "[1] Sam worked on fine motor goals." in result.output
    assert "[2] Family conflict was discussed at length." in result.output
    assert "A1 ot-report.pdf" in result.output
    assert "[A1.1] Handwriting improved." in result.output

    data = json.loads(run(home, "show", str(ids["held"]), "--content", "--json").output)
    assert data["content"]["paragraphs"][1] == {
        "id": "2", "text": "Family conflict was discussed at length."
    }
    assert data["content"]["attachments"][0]["filename"] == "ot-report.pdf"
    assert "data" not in data["content"]["attachments"][0]


def test_show_content_without_document(home: Path, ids: dict[str, int]) -> None:
    result = run(home, "show", str(ids["quarantined"]), "--content")
    assert result.exit_code == 0, result.output
    assert "no parsed document" in result.output
    data = json.loads(run(home, "show", str(ids["quarantined"]), "--content", "--json").output)
    assert data["content"] is None


def test_show_unknown_id_fails(home: Path, ids: dict[str, int]) -> None:
    result = run(home, "show", "999")
    assert result.exit_code == 1
    assert "no record 999" in result.output


def test_home_after_the_subcommand_works(home: Path, ids: dict[str, int]) -> None:
    result = CliRunner().invoke(records, ["show", str(ids["alex"]), "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert "Speech update" in result.output
