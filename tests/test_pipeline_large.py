"""Large mail does not hold small mail back: the service runs two pipelines split by size
(above pipeline.LARGE bytes a message is "large"), and a large message's slow part
(storing its bytes, parsing its MIME tree) runs before its database transaction, so
small records are taken in - and their review requests queued - meanwhile."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from dataclasses import dataclass
from email import policy
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.db.models import AuditEvent, Inbound, Record
from broker.intake import pipeline as pipeline_mod
from broker.intake.pipeline import LARGE, Pipeline
from broker.intake.spool import Envelope
from broker.records import states
from broker.runtime import Runtime
from tests.harness import DOMAIN, report, team_runtime


@pytest.fixture
def rt(tmp_path: Path, db_url: str):
    runtime = team_runtime(tmp_path / "home", db_url)
    yield runtime
    runtime.spool.close()
    runtime.close()


def spool(rt: Runtime, data: bytes) -> str:
    return rt.spool.store(data, Envelope.for_message(
        data, mail_from="lee@clinic.example", rcpt_tos=(f"sam@{DOMAIN}",), peer="x",
        helo="x"))


def large_report(subject: str, size: int) -> bytes:
    # Random bytes: base64 of them cannot be compressed or shortcut by any layer.
    scan = os.urandom(size)
    return report(subject=subject, attachments=(("scan.pdf", "application/pdf", scan),)
                  ).as_bytes(policy=policy.SMTP)


def small_report(subject: str) -> bytes:
    return report(subject=subject).as_bytes(policy=policy.SMTP)


@dataclass(frozen=True)
class Held:
    id: int
    state: str
    quarantine_reason: str | None


def records(rt: Runtime) -> dict[str, Held]:
    """Every record by subject (subjects are sealed in the database; read through it)."""
    with rt.db.read_session() as s:
        return {r.subject: Held(r.id, r.state, r.quarantine_reason)
                for r in s.scalars(select(Record))}


def test_small_and_large_pipelines_split_the_spool(rt: Runtime) -> None:
    """Provider sends a 2 MB scan and a short note -> the small pipeline takes only the
    note, the large one only the scan -> both are held records, the scan's raw bytes
    stored whole."""
    big = large_report("scan of the assessment", LARGE + 512 * 1024)
    spool(rt, big)
    spool(rt, small_report("short note"))

    assert Pipeline(rt, sizes="small").run_once() == 1
    assert set(records(rt)) == {"short note"}
    assert len(rt.spool.pending()) == 1  # the scan waits for its own pipeline

    assert Pipeline(rt, sizes="large").run_once() == 1
    held = records(rt)
    assert set(held) == {"short note", "scan of the assessment"}
    assert all(r.state == states.AWAITING_REVIEW for r in held.values())
    assert rt.spool.pending() == []
    with rt.db.read_session() as s:
        inbound = s.scalar(select(Inbound).where(Inbound.record_id
                                                 == held["scan of the assessment"].id))
        assert inbound is not None
        assert rt.content.get(inbound.raw_ref) == big


def test_a_large_message_that_cannot_be_parsed_is_quarantined_like_any_other(
        rt: Runtime) -> None:
    """Parsing ran before the transaction and failed there: the record is quarantined
    with the same reason the in-transaction parse gives, and nothing is lost."""
    limits = rt.settings.limits
    parts = limits.max_attachments + 1
    msg = report(subject="too many parts", attachments=tuple(
        (f"page{i}.pdf", "application/pdf", os.urandom(LARGE // parts + 1024))
        for i in range(parts)))
    data = msg.as_bytes(policy=policy.SMTP)
    assert len(data) > LARGE
    spool(rt, data)
    assert Pipeline(rt, sizes="large").run_once() == 1
    record = records(rt)["too many parts"]
    assert record.state == states.QUARANTINED
    assert "over a limit of this broker" in (record.quarantine_reason or "")


def test_small_records_are_taken_in_while_a_large_one_is_parsed(rt: Runtime) -> None:
    """A 12 MB report arrives first, then a short one -> while the large pipeline is still
    reading the large report, the small pipeline takes the short one in and commits it
    (its record id is the lower one) -> then the large one is held too."""
    spool(rt, large_report("twelve megabyte report", 12 * 1024 * 1024))
    spool(rt, small_report("short one after it"))

    real = pipeline_mod.parse_message
    parsing, small_done = threading.Event(), threading.Event()
    large_thread: list[threading.Thread] = []

    def parse(source, *args, **kwargs):
        # The real parser. On the large pipeline's thread it first says it started and
        # then stays "busy parsing" until the small pipeline is done (at most 10 s): if
        # the parse held the database, the small one could not finish meanwhile.
        if large_thread and threading.current_thread() is large_thread[0]:
            parsing.set()
            small_done.wait(10)
        return real(source, *args, **kwargs)

    pipeline_mod.parse_message = parse
    try:
        large = Pipeline(rt, sizes="large")
        errors: list[BaseException] = []

        def run_large() -> None:
            try:
                large.run_once()
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=run_large)
        large_thread.append(thread)
        thread.start()
        assert parsing.wait(30), "the large pipeline never started parsing"
        started = time.monotonic()
        assert Pipeline(rt, sizes="small").run_once() == 1
        small_took = time.monotonic() - started
        small_done.set()
        thread.join(60)
        assert not thread.is_alive() and not errors
    finally:
        small_done.set()
        pipeline_mod.parse_message = real
    held = records(rt)
    assert held["short one after it"].state == states.AWAITING_REVIEW
    assert held["twelve megabyte report"].state == states.AWAITING_REVIEW
    # Committed first although spooled second: it did not wait for the large one.
    assert held["short one after it"].id < held["twelve megabyte report"].id, (
        f"the short record waited for the large one (took {small_took:.2f} s)")


def test_large_messages_are_taken_in_one_per_transaction(rt: Runtime) -> None:
    """Three 1.5 MB scans arrive together -> the large pipeline reads and takes in one at
    a time (a batch is held in memory whole), the small one batches as before."""
    for k in range(3):
        spool(rt, large_report(f"scan {k}", LARGE + 512 * 1024))
    for k in range(3):
        spool(rt, small_report(f"note {k}"))
    sizes: list[tuple[str, int]] = []
    pipelines = [Pipeline(rt, sizes="large"), Pipeline(rt, sizes="small")]
    for pipeline in pipelines:
        real = pipeline.process_batch

        def counted(entries, _real=real, _name=pipeline.sizes):
            sizes.append((_name, len(entries)))
            return _real(entries)

        pipeline.process_batch = counted  # type: ignore[method-assign]
        assert pipeline.run_once() == 3
    assert sizes == [("large", 1), ("large", 1), ("large", 1), ("small", 3)]
    assert len(records(rt)) == 6


# -- read a piece at a time (tests/test_pieces.py has the parts) ------------------------


def test_taking_in_a_large_report_never_holds_3x_its_size(rt: Runtime) -> None:
    """Provider sends an 8 MB scan -> the large pipeline stores it, parses it from the
    sealed spool file and takes it in -> at no moment do its Python allocations reach 3x
    the message (before: the whole plaintext sat beside the parser's lines and their
    joined text, about 3.6x; the parser's own share is some 2.6x)."""
    data = large_report("an eight megabyte scan", 6 * 1024 * 1024)
    spool(rt, data)
    size = len(data)
    del data
    pipeline = Pipeline(rt, sizes="large")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert pipeline.run_once() == 1
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert records(rt)["an eight megabyte scan"].state == states.AWAITING_REVIEW
    assert peak < 3 * size, f"peak {peak / size:.2f}x the message"


def test_a_large_report_damaged_between_its_reads_is_set_aside_unused(rt: Runtime) -> None:
    """A scan is damaged on disk just after the pipeline first read it -> its piecewise
    parse fails its checks at the end and the parsed document is thrown away -> the
    message is set aside for the operator as damaged, and no record is made of it."""
    sid = spool(rt, large_report("a scan that gets damaged", LARGE + 256 * 1024))
    path = rt.spool.root / f"{sid}.eml"
    real_read = rt.spool.read

    def read_then_damage(spool_id: str) -> bytes:
        data = real_read(spool_id)
        damaged = bytearray(path.read_bytes())
        damaged[-40_000] ^= 0x01
        path.write_bytes(damaged)
        return data

    rt.spool.read = read_then_damage  # type: ignore[method-assign]
    parsed: list[object] = []
    pipeline = Pipeline(rt, sizes="large")
    real_parse = pipeline._parse_large

    def parse_large(entry, prepared) -> None:
        real_parse(entry, prepared)
        parsed.append(prepared.doc)

    pipeline._parse_large = parse_large  # type: ignore[method-assign]
    assert pipeline.run_once() == 1
    assert parsed == [None]  # nothing kept of the unauthenticated pieces
    assert (rt.spool.root / "damaged" / f"{sid}.eml").exists()
    assert rt.spool.pending() == []
    with rt.db.read_session() as s:
        assert s.scalar(select(Record)) is None
        events = [(e.action, e.description) for e in s.scalars(select(AuditEvent))
                  if e.action == "intake_failed"]
    assert events and "spool damaged" in str(events[0][1])
