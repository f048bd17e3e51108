"""`broker audit report`: the accounting of disclosures a parent hands to a hearing officer.

The data is written directly (team, consents, records, outbox rows with their sealed
summaries, audit events with the fields the release code records), so these tests check
the report itself: every copy is there with the right recipient, basis, approvers and how
they were authenticated, redactions, notice and status; the period filters; each format
says the same thing; and a tampered log shows as broken. One story runs a real release
through SMTP to show that what the running broker writes renders too. SQLite and
PostgreSQL.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from broker.audit import report_render
from broker.audit.log import record_event
from broker.audit.report import (
    PARENT_DIRECTED_BASIS,
    ChainResult,
    Report,
    build_report,
    load_report,
)
from broker.cli import audit as audit_cli
from broker.cli.audit import audit
from broker.cli.context import Broker, open_broker
from broker.config import render_config
from broker.db.models import Child, Consent, Delivery, Person, Record

GUARDIAN = "dana@home.example"
LEE = "lee@clinic.example"
PARK = "park@school.example"
ORTIZ = "ortiz@school.example"
COACH = "coach@school.example"
NOTICE = "42 CFR part 2 prohibits unauthorized use or disclosure of these records."
HOSTILE = "<script>alert('x')</script> behaviour plan"


def at(day: int, hour: int = 10, minute: int = 0, month: int = 3) -> dt.datetime:
    return dt.datetime(2025, month, day, hour, minute, tzinfo=dt.UTC)


# -- a home with a history ------------------------------------------------------------------


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
    monkeypatch.delenv("BROKER_CONTENT_KEY", raising=False)  # the home's own key file
    return path


@pytest.fixture
def broker(home: Path) -> Iterator[Broker]:
    """The home opened as the CLI opens it (which registers its content key)."""
    b = open_broker(str(home))
    yield b
    b.db.dispose()


class History:
    """Writes rows and events the way the release code does, with explicit times."""

    def __init__(self, broker: Broker) -> None:
        self.db = broker.db
        with self.db.session() as s:
            child = Child(slug="sam", name="Sam Rivera")
            s.add(child)
            s.flush()
            self.child_id = child.id
            people = [
                Person(child_id=child.id, role="guardian", name="Dana Rivera", email=GUARDIAN),
                Person(child_id=child.id, role="provider", name="Dr. Lee", email=LEE,
                       tags='["therapy"]'),
                Person(child_id=child.id, role="school", name="Ms Park", email=PARK,
                       tags='["teacher"]'),
                Person(child_id=child.id, role="school", name="Mr Ortiz", email=ORTIZ,
                       tags='["ot"]'),
                Person(child_id=child.id, role="school", name="Coach Reyes", email=COACH),
            ]
            s.add_all(people)
            s.flush()
            self.people = {p.email: p.id for p in people}
            for cid, purpose, mode in ((3, "classroom supports in Sam's IEP", "review"),
                                       (4, "OT goals for the school OT", "auto")):
                s.add(Consent(
                    id=cid, child_id=child.id, disclosers=json.dumps([LEE]),
                    recipients=json.dumps(["tag:teacher", ORTIZ]),
                    categories=json.dumps(["therapy_progress"]), purpose=purpose,
                    valid_from=dt.date(2025, 1, 1), valid_until=dt.date(2025, 12, 31),
                    signed_by=json.dumps([GUARDIAN]), mode=mode,
                ))

    def record(self, *, subject: str, received: dt.datetime,
               categories: tuple[str, ...] = ("therapy_progress",)) -> int:
        with self.db.session() as s:
            rec = Record(
                child_id=self.child_id, state="releasing", sender_email=LEE,
                sender_id=self.people[LEE], subject=subject, raw_ref="raw", raw_sha256="0" * 64,
                policy=json.dumps({"categories": list(categories)}), received_at=received,
            )
            s.add(rec)
            s.flush()
            return rec.id

    def approved(self, record: int, when: dt.datetime, recipients: dict[str, str], *,
                 approvers: list[dict] | None = None, automatic: bool = False,
                 actor: str = GUARDIAN, **extra: object) -> None:
        with self.db.session() as s:
            record_event(
                s, action="approved", actor=actor,
                actor_role="broker" if automatic else "guardian", child="sam",
                record_id=record, recipients=list(recipients), at=when,
                description={
                    "from": "awaiting_review", "to": "approved", "version": 1,
                    "basis": recipients, "approvers": approvers or [],
                    "automatic": automatic, "auth": "" if automatic else "dkim",
                    "paragraphs_removed": [], "phrases_removed": 0, "attachments_dropped": [],
                    "note": False, "notices": [], "categories": ["therapy_progress"],
                    "always_redacted": {}, **extra,
                },
            )

    def copy(self, record: int, recipient: str, *, basis: str, queued: dt.datetime,
             summary: dict, state: str = "queued") -> int:
        consent_id = int(basis.split(":")[1]) if basis.startswith("consent:") else None
        person = self.people[recipient]
        with self.db.session() as s:
            name = s.get(Person, person).name  # type: ignore[union-attr]
            d = Delivery(
                dedupe_key=f"release:{record}:{recipient}", kind="release",
                child_id=self.child_id, record_id=record, person_id=person,
                recipient=recipient, message_id=f"<release.{record}.{person}@records.example>",
                content_ref=f"ref-{record}-{person}", sha256=f"{record:02x}{person:02x}" * 16,
                summary=json.dumps({
                    "recipient_name": name, "openpgp": "", "basis": basis,
                    "consent_id": consent_id, **summary,
                }),
                consent_id=consent_id, state=state, created_at=queued, next_attempt_at=queued,
            )
            s.add(d)
            s.flush()
            return d.id

    def delivered(self, delivery: int, when: dt.datetime) -> None:
        """What OutboxSender._sent does: state sent, and an event without the content."""
        with self.db.session() as s:
            d = s.get(Delivery, delivery)
            assert d is not None
            d.state, d.sent_at = "sent", when
            summary = json.loads(d.summary)
            record_event(
                s, action="delivered", actor="broker", actor_role="broker", child="sam",
                record_id=d.record_id, recipients=[d.recipient], at=when,
                description={"record": d.record_id, "delivery": d.id,
                             "message_id": d.message_id, "sha256": d.sha256,
                             **{k: v for k, v in summary.items()
                                if k not in ("subject", "attachments", "attachments_detail")}},
            )

    def failed(self, delivery: int, when: dt.datetime, error: str) -> None:
        with self.db.session() as s:
            d = s.get(Delivery, delivery)
            assert d is not None
            d.state, d.last_error, d.attempts = "failed", error, 3
            record_event(
                s, action="delivery_failed", actor="broker", actor_role="broker", child="sam",
                record_id=d.record_id, recipients=[d.recipient], at=when,
                description={"record": d.record_id, "delivery": d.id, "error": error},
            )

    def revoke(self, consent: int, delivery: int, when: dt.datetime) -> None:
        """What consent revocation does to a copy still queued under the consent."""
        with self.db.session() as s:
            c = s.get(Consent, consent)
            d = s.get(Delivery, delivery)
            assert c is not None and d is not None
            c.status, c.revoked_at, c.revoked_by = "revoked", when, GUARDIAN
            d.state = "cancelled"
            record_event(s, action="consent_revoked", actor=GUARDIAN, actor_role="guardian",
                         child="sam", at=when,
                         description={"consent": consent, "cancelled": 1,
                                      "already_delivered": 0, "not_recalled": [],
                                      "reason": "Sam moved to a new school"})
            record_event(s, action="delivery_cancelled", actor=GUARDIAN, actor_role="guardian",
                         child="sam", record_id=d.record_id, recipients=[d.recipient], at=when,
                         description={"delivery": d.id, "consent": consent,
                                      "reason": "consent revoked"})

    def legacy_delivered(self, when: dt.datetime) -> None:
        """An event from before deliveries were named: the subject is in the event."""
        with self.db.session() as s:
            record_event(
                s, action="delivered", actor="broker", actor_role="system", child="sam",
                record_id=None, recipients=[COACH], at=when,
                description={"recipient_name": "Coach Reyes", "subject": "Old field-trip form",
                             "sha256": "cd" * 32, "released_by": GUARDIAN,
                             "attachments": ["form.pdf"]},
            )


def _approver(auth: str, when: dt.datetime) -> dict:
    return {"email": GUARDIAN, "name": "Dana Rivera", "role": "guardian", "auth": auth,
            "at": when.isoformat()}


def _summary(subject: str, received: dt.datetime, approvers: list[dict], *,
             purpose: str, attachments: list[dict] | None = None,
             notices: list[str] | None = None, redactions: dict | None = None,
             categories: list[str] | None = None) -> dict:
    attachments = attachments or []
    return {
        "subject": subject, "attachments": [a["filename"] for a in attachments],
        "attachments_detail": attachments, "released_by": GUARDIAN,
        "released_by_name": "Dana Rivera", "purpose": purpose,
        "categories": categories or ["therapy_progress"], "sender": LEE,
        "sender_name": "Dr. Lee", "sender_role": "provider",
        "received_at": received.isoformat(), "notices": notices or [],
        "approvers": approvers, "redactions": redactions or {},
    }


@pytest.fixture
def history(broker: Broker) -> History:
    return write_history(broker)


def write_history(broker: Broker) -> History:
    """Sam's disclosures:

    - Feb 20: a legacy "delivered" event (no delivery row) to Coach Reyes;
    - record 1 (Mar 2, DKIM approval): Ms Park under consent #3, sent; Mr Ortiz
      parent-directed, failed; redactions, an always-redacted SSN and the 42 CFR notice;
    - record 2 (Mar 8): automatic under consent #4 to Mr Ortiz, cancelled on Mar 9 when
      the consent was revoked;
    - record 3 (Mar 20, OpenPGP approval): Ms Park, parent-directed, hostile subject, sent;
    - record 4 (Apr 2): Ms Park, parent-directed, sent.
    """
    h = History(broker)
    h.legacy_delivered(at(20, month=2))

    r1 = h.record(subject="OT report March", received=at(1, 9),
                  categories=("substance_use", "therapy_progress"))
    app1 = [_approver("dkim", at(2, 10))]
    redactions = {"paragraphs_removed": [2, 5], "phrases_removed": 1,
                  "attachments_dropped": ["B"], "always_redacted": {"us_ssn": 1}}
    h.approved(r1, at(2, 10), {PARK: "consent:3", ORTIZ: "parent-directed"},
               approvers=app1, **redactions, notices=[NOTICE],
               categories=["substance_use", "therapy_progress"])
    pdf_att = {"filename": "ot-report.pdf", "content_type": "application/pdf", "size": 48213,
               "sha256": "ab" * 32, "pages": 3}
    common = {"attachments": [pdf_att], "notices": [NOTICE], "redactions": redactions,
              "categories": ["substance_use", "therapy_progress"]}
    d_park = h.copy(r1, PARK, basis="consent:3", queued=at(2, 10),
                    summary=_summary("OT report March", at(1, 9), app1,
                                     purpose="classroom supports in Sam's IEP", **common))
    d_ortiz = h.copy(r1, ORTIZ, basis="parent-directed", queued=at(2, 10),
                     summary=_summary("OT report March", at(1, 9), app1,
                                      purpose="parent-directed disclosure", **common))
    h.delivered(d_park, at(2, 10, 1))
    h.failed(d_ortiz, at(2, 10, 5), "550 5.1.1 <ortiz@school.example>: mailbox unavailable")

    r2 = h.record(subject="OT goals update", received=at(8, 9))
    h.approved(r2, at(8, 9, 1), {ORTIZ: "consent:4"}, automatic=True, actor="broker")
    d_auto = h.copy(r2, ORTIZ, basis="consent:4", queued=at(8, 9, 1),
                    summary=_summary("OT goals update", at(8, 9), [],
                                     purpose="OT goals for the school OT"))
    h.revoke(4, d_auto, at(9, 8))

    r3 = h.record(subject=HOSTILE, received=at(20, 9))
    app3 = [_approver("pgp", at(20, 15))]
    h.approved(r3, at(20, 15), {PARK: "parent-directed"}, approvers=app3)
    d3 = h.copy(r3, PARK, basis="parent-directed", queued=at(20, 15),
                summary=_summary(HOSTILE, at(20, 9), app3, purpose="parent-directed disclosure"))
    h.delivered(d3, at(21, 8))

    r4 = h.record(subject="April note", received=at(1, 9, month=4))
    app4 = [_approver("token", at(2, 9, month=4))]
    h.approved(r4, at(2, 9, month=4), {PARK: "parent-directed"}, approvers=app4)
    d4 = h.copy(r4, PARK, basis="parent-directed", queued=at(2, 9, month=4),
                summary=_summary("April note", at(1, 9, month=4), app4,
                                 purpose="parent-directed disclosure"))
    h.delivered(d4, at(2, 9, 30, month=4))
    return h


def march(broker: Broker) -> Report:
    with broker.db.read_session() as s:
        return load_report(s, "sam", dt.date(2025, 3, 1), dt.date(2025, 3, 31),
                           now=at(15, 12, month=5))


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(audit, ["--home", str(home), "report", *args],
                              prog_name="broker audit")


def pdf_text(data: bytes) -> str:
    doc = pdfium.PdfDocument(data)
    try:
        return "\n".join(doc[i].get_textpage().get_text_range() for i in range(len(doc)))
    finally:
        doc.close()


# -- what the report says -------------------------------------------------------------------


def test_every_copy_of_the_period_with_basis_approval_redactions_notice_status(
    broker: Broker, history: History
) -> None:
    rep = march(broker)
    assert rep.chain.ok and rep.chain.checked == rep.chain.head_seq > 0
    assert len(rep.chain.head_hash) == 64
    rows = {(d.record_id, d.recipient.email): d for d in rep.disclosures}
    assert [d.number for d in rep.disclosures] == [1, 2, 3, 4]
    assert len(rows) == 4  # the Feb legacy copy and the April copy are outside March

    park = rows[(1, PARK)]
    assert park.recipient.text == f"Ms Park <{PARK}>"
    assert park.recipient.role_text == "school (teacher)"
    assert park.requested_by.text == f"Dr. Lee <{LEE}>" and park.requested_by.role == "provider"
    assert park.date == at(2, 10, 1) and park.date_kind == "delivered"
    assert park.basis_text == "consent #3" and park.consent_id == 3
    assert park.purpose == "classroom supports in Sam's IEP"
    assert park.approval_lines == [
        "Dana Rivera <dana@home.example> (guardian), 2025-03-02 10:00 UTC; "
        "authenticated by DKIM signature verified by the broker"
    ]
    assert park.redactions.lines() == [
        "2 paragraphs removed (paragraphs 2, 5)", "1 phrase redacted",
        "1 attachment dropped (B)", "always redacted: us ssn x 1",
    ]
    assert park.notices == (NOTICE,)
    assert park.document_type == "substance use, therapy progress"
    assert park.received_at == at(1, 9)
    (att,) = park.attachments
    assert (att.filename, att.pages, att.size, att.sha256) == ("ot-report.pdf", 3, 48213,
                                                               "ab" * 32)
    assert park.status.text == "sent 2025-03-02 10:01 UTC"
    assert len(park.copy_sha256) == 64

    ortiz = rows[(1, ORTIZ)]
    assert ortiz.basis_text == PARENT_DIRECTED_BASIS and ortiz.parent_directed
    assert ortiz.purpose == "parent-directed disclosure"
    assert ortiz.date_kind == "approved" and ortiz.date == at(2, 10)
    assert ortiz.status.state == "failed"
    assert "550 5.1.1" in ortiz.status.text and "not delivered" in ortiz.status.text

    auto = rows[(2, ORTIZ)]
    assert auto.automatic and auto.basis_text == "consent #4"
    assert auto.approval_lines == ["automatic under consent #4 (no one was asked)"]
    assert auto.redactions.lines() == ["none"]
    assert auto.status.state == "cancelled" and auto.status.at == at(9, 8)
    assert auto.status.text == (
        "CANCELLED 2025-03-09 08:00 UTC before it was sent: consent #4 was revoked "
        "(by dana@home.example: Sam moved to a new school)")

    pgp = rows[(3, PARK)]
    assert pgp.subject == HOSTILE
    assert "OpenPGP signature" in pgp.approval_text

    summary = rep.summary
    assert (summary.copies, summary.releases, summary.recipients) == (4, 3, 2)
    assert (summary.parent_directed, summary.consent_based, summary.automatic) == (2, 2, 1)
    assert summary.status_text == "2 sent, 1 failed, 1 cancelled"


def test_period_filters(broker: Broker, history: History) -> None:
    def subjects(since: dt.date | None, until: dt.date | None) -> list[tuple[str, str]]:
        with broker.db.read_session() as s:
            rep = load_report(s, "sam", since, until)
        return [(d.subject, d.recipient.email) for d in rep.disclosures]

    everything = subjects(None, None)
    assert everything[0] == ("Old field-trip form", COACH)  # legacy event, still shown
    assert everything[-1] == ("April note", PARK)
    assert len(everything) == 6
    assert subjects(dt.date(2025, 4, 1), None) == [("April note", PARK)]
    assert subjects(None, dt.date(2025, 2, 28)) == [("Old field-trip form", COACH)]
    # A failed copy is dated by its approval (Mar 2), a delivered one by its delivery.
    assert subjects(dt.date(2025, 3, 2), dt.date(2025, 3, 2)) == [
        ("OT report March", ORTIZ), ("OT report March", PARK)]
    assert subjects(dt.date(2025, 3, 21), dt.date(2025, 3, 21)) == [(HOSTILE, PARK)]
    assert subjects(dt.date(2025, 5, 1), None) == []


def test_legacy_event_renders_from_what_it_recorded(broker: Broker, history: History) -> None:
    with broker.db.read_session() as s:
        rep = load_report(s, "sam", None, dt.date(2025, 2, 28))
    (old,) = rep.disclosures
    assert old.recipient.text == f"Coach Reyes <{COACH}>"
    assert old.basis_text == PARENT_DIRECTED_BASIS
    assert old.approval_lines == ["Dana Rivera <dana@home.example> (guardian); "
                                  "authentication not recorded"]
    assert [a.filename for a in old.attachments] == ["form.pdf"]
    assert old.status.text == "sent 2025-02-20 10:00 UTC"
    assert old.copy_sha256 == "cd" * 32
    html = report_render.to_html(rep)
    assert "Old field-trip form" in html


def test_csv_one_row_per_copy(home: Path, broker: Broker, history: History) -> None:
    result = run(home, "--child", "sam", "--since", "2025-03-01", "--until", "2025-03-31",
                 "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert tuple(rows[0].keys()) == report_render.CSV_FIELDS
    got = {(r["record"], r["recipient_email"]): r for r in rows}
    assert len(rows) == 4
    park = got[("1", PARK)]
    assert park["date"] == "2025-03-02T10:01:00+00:00" and park["date_kind"] == "delivered"
    assert park["basis"] == "consent #3" and park["consent_id"] == "3"
    assert park["recipient_name"] == "Ms Park" and park["recipient_tags"] == "teacher"
    assert park["requested_by_email"] == LEE and park["requested_by_role"] == "provider"
    assert park["approved_by"] == (
        "Dana Rivera <dana@home.example> (guardian; auth=dkim; at=2025-03-02T10:00:00+00:00)")
    assert park["notices"] == NOTICE
    assert "always redacted: us ssn x 1" in park["redactions"]
    assert park["attachments"] == (
        f"ot-report.pdf (application/pdf, 48213 bytes, 3 pages, sha256 {'ab' * 32})")
    assert park["status"] == "sent" and park["status_at"] == "2025-03-02T10:01:00+00:00"
    assert park["received_at"] == "2025-03-01T09:00:00+00:00"
    assert got[("1", ORTIZ)]["basis"] == "parent-directed"
    assert got[("1", ORTIZ)]["status"] == "failed"
    assert "mailbox unavailable" in got[("1", ORTIZ)]["status_detail"]
    assert got[("2", ORTIZ)]["status"] == "cancelled"
    assert got[("2", ORTIZ)]["automatic"] == "yes"
    assert got[("3", PARK)]["subject"] == HOSTILE


def test_csv_cells_cannot_become_spreadsheet_formulas(broker: Broker, history: History) -> None:
    rep = march(broker)
    first = rep.disclosures[0]
    hostile = replace(rep, disclosures=(replace(first, subject='=HYPERLINK("http://x")'),))
    (row,) = csv.DictReader(io.StringIO(report_render.to_csv(hostile)))
    assert row["subject"] == "'=HYPERLINK(\"http://x\")"


def test_html_escapes_hostile_subject_and_states_everything(
    home: Path, broker: Broker, history: History
) -> None:
    out = home / "report.html"
    result = run(home, "--child", "sam", "--since", "2025-03-01", "--until", "2025-03-31",
                 "--format", "html", "--output", str(out))
    assert result.exit_code == 0, result.output
    html = out.read_text(encoding="utf-8")
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; behaviour plan" in html
    assert "Accounting of Disclosures" in html and "Sam Rivera (sam)" in html
    assert "2025-03-01 to 2025-03-31" in html
    assert "VERIFIED: intact" in html
    assert f"Ms Park &lt;{PARK}&gt;" in html and f"Mr Ortiz &lt;{ORTIZ}&gt;" in html
    assert "consent #3" in html and PARENT_DIRECTED_BASIS in html
    assert "automatic under consent #4" in html
    assert "authenticated by DKIM signature verified by the broker" in html
    assert NOTICE in html
    assert "CANCELLED 2025-03-09 08:00 UTC before it was sent: consent #4 was revoked" in html
    assert "FAILED 2025-03-02 10:05 UTC" in html
    assert "2 copies, of which 1 automatic" in html  # the summary
    assert "2 sent, 1 failed, 1 cancelled" in html
    assert "{" not in html.split("</style>", 1)[1]  # no raw JSON in the document body
    assert out.stat().st_mode & 0o077 == 0  # record content: not readable by others


def test_html_to_stdout(home: Path, broker: Broker, history: History) -> None:
    result = run(home, "--child", "sam", "--format", "html")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("<!DOCTYPE html>")
    assert "Old field-trip form" in result.stdout and "April note" in result.stdout


def test_pdf_has_the_disclosures_page_numbers_and_draws_text(
    home: Path, broker: Broker, history: History
) -> None:
    out = home / "report.pdf"
    result = run(home, "--child", "sam", "--since", "2025-03-01", "--until", "2025-03-31",
                 "--format", "pdf", "--output", str(out))
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data.startswith(b"%PDF")
    content = pdf_text(data)
    flat = " ".join(content.split())
    for expected in (f"Ms Park <{PARK}>", f"Mr Ortiz <{ORTIZ}>", "consent #3", "consent #4",
                     "VERIFIED: intact", PARENT_DIRECTED_BASIS, "automatic under consent #4",
                     "Sam Rivera (sam)", "OT report March", NOTICE, "ot-report.pdf",
                     "CANCELLED", "FAILED", "Disclosure 4 of 4"):
        assert expected in flat, expected
    doc = pdfium.PdfDocument(data)
    try:
        pages = len(doc)
        assert pages >= 2
        assert f"Page 1 of {pages}" in flat and f"Page {pages} of {pages}" in flat
        width, height = doc[0].get_size()
        assert (round(width), round(height)) == (612, 792)  # US Letter, in points
        image = doc[0].render(scale=1).to_pil().convert("L")
    finally:
        doc.close()
    assert image.size == (612, 792)
    histogram = image.histogram()  # 256 grey levels
    dark = sum(histogram[:128]) / sum(histogram)
    assert 0.01 < dark < 0.5, dark  # text was drawn, and the page is not a black box


def test_pdf_refuses_a_terminal_but_writes_to_a_pipe(
    home: Path, broker: Broker, history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(home, "--child", "sam", "--format", "pdf")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.startswith(b"%PDF")
    monkeypatch.setattr(audit_cli, "_stdout_is_terminal", lambda: True)
    result = run(home, "--child", "sam", "--format", "pdf")
    assert result.exit_code == 2
    assert "--output" in result.output


def test_pdf_replaces_characters_its_fonts_cannot_show(broker: Broker, history: History) -> None:
    rep = march(broker)
    first = rep.disclosures[0]
    odd = replace(first, subject="Zoë’s plan – 中文 ✓ Łódź")
    data = report_render.to_pdf(replace(rep, disclosures=(odd,)))
    flat = " ".join(pdf_text(data).split())
    assert "Zoë’s plan – [U+4E2D][U+6587] v Lódz" in flat
    assert "[U+XXXX]" in flat  # the note that says so


def test_tampered_log_says_broken_at_seq(home: Path, broker: Broker, history: History) -> None:
    with broker.db.session() as s:
        s.execute(text("UPDATE audit_events SET description = :d WHERE seq = 3"),
                  {"d": json.dumps({"tampered": True})})
    with broker.db.read_session() as s:
        rep = load_report(s, "sam")
    assert not rep.chain.ok
    assert rep.chain.text.startswith("broken at seq 3:")
    assert rep.chain.checked == 2
    out = home / "tampered.pdf"
    result = run(home, "--child", "sam", "--format", "pdf", "--output", str(out))
    assert result.exit_code == 1  # the report is written, and the exit status says it
    assert "BROKEN at seq 3" in result.stderr
    flat = " ".join(pdf_text(out.read_bytes()).split())
    assert "BROKEN: broken at seq 3" in flat
    result = run(home, "--child", "sam", "--format", "html")
    assert "BROKEN: broken at seq 3" in result.stdout


def test_unknown_child_and_bad_period(home: Path, broker: Broker, history: History) -> None:
    result = run(home, "--child", "max", "--format", "csv")
    assert result.exit_code == 2 and "no child 'max' (known: sam)" in result.output
    result = run(home, "--child", "sam", "--since", "2025-04-01", "--until", "2025-03-01",
                 "--format", "csv")
    assert result.exit_code == 2 and "is after" in result.output
    result = CliRunner().invoke(audit, ["--home", str(home), "--child", "sam", "report",
                                        "--format", "csv"])
    assert result.exit_code == 2 and "after `report`" in result.output


def test_empty_period_still_a_document(home: Path, broker: Broker, history: History) -> None:
    result = run(home, "--child", "sam", "--since", "2026-01-01", "--format", "csv")
    assert result.exit_code == 0
    assert result.stdout.strip() == ",".join(report_render.CSV_FIELDS)
    result = run(home, "--child", "sam", "--since", "2026-01-01", "--format", "html")
    assert "No record was released in this period." in result.stdout


def test_build_report_is_pure() -> None:
    """The core needs no database: a chain result and no copies is a valid report."""
    rep = build_report(child_slug="sam", child_name="Sam", since=None, until=None,
                       generated_at=at(1), sources=[],
                       chain=ChainResult(True, 0, 0, ""))
    assert rep.summary.copies == 0 and rep.period_text == "all disclosures on record"
    assert report_render.to_pdf(rep).startswith(b"%PDF")


# -- a real release -------------------------------------------------------------------------


@pytest.mark.slow
def test_real_release_renders(tmp_path: Path, db_url: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.harness import DOMAIN, World, reply_to, report

    world = World(tmp_path / "home", db_url).start()
    try:
        world.send(report(), LEE, f"sam@{DOMAIN}")
        review = world.wait_for(lambda m: GUARDIAN in m.rcpt_tos
                                and "Review needed" in str(m.msg["Subject"]))[0]
        world.send(reply_to(review, "APPROVE"), GUARDIAN, str(review.msg["Reply-To"]))
        world.wait_for(lambda m: m.rcpt_tos[0] in (PARK, ORTIZ), count=2)
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=15)
        while True:
            with world.db.read_session() as s:
                delivered = s.execute(text(
                    "SELECT count(*) FROM audit_events WHERE action = 'delivered'")).scalar()
            if delivered == 2 or dt.datetime.now(dt.UTC) > deadline:
                break
            world.settle(0.1)
    finally:
        world.stop()
    monkeypatch.setenv("BROKER_DATABASE_URL", db_url)
    result = CliRunner().invoke(audit, ["--home", str(world.home), "report", "--child", "sam",
                                        "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert sorted(r["recipient_email"] for r in rows) == [ORTIZ, PARK]
    for row in rows:
        assert row["status"] == "sent"
        assert row["basis"] == "parent-directed"
        assert row["approved_by"].startswith("Dana Rivera <dana@home.example> (guardian; "
                                             "auth=token")
        assert row["requested_by_email"] == LEE
        assert len(row["copy_sha256"]) == 64
    result = CliRunner().invoke(audit, ["--home", str(world.home), "report", "--child", "sam",
                                        "--format", "pdf", "--output",
                                        str(tmp_path / "real.pdf")])
    assert result.exit_code == 0, result.output
    flat = " ".join(pdf_text((tmp_path / "real.pdf").read_bytes()).split())
    assert f"Ms Park <{PARK}>" in flat and "VERIFIED" in flat
