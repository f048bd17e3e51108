"""The spool's write-ahead journal: the intake appends small mail to a prepared segment and
flushes one file; the pipeline's side turns records into spool files and deletes finished
segments. Real files, real SMTP (aiosmtpd on 127.0.0.1), a real process killed with -9."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.crypto.vault import Vault, new_key
from broker.intake import journal as jnl
from broker.intake.smtp import IntakeHandler, IntakeServer, address_acceptor
from broker.intake.spool import Envelope, Spool

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "records.example"
SAM = f"sam@{DOMAIN}"
SEGMENT = 256 * 1024  # small segments: quick to prepare, and several per test


def _raw(i: int, filler: int = 0) -> bytes:
    return (f"From: ot@clinic.example\r\nTo: {SAM}\r\nSubject: note {i}\r\n\r\n"
            f"Sam worked on handwriting, note {i}.\r\n").encode() + b"x" * filler + b"\r\n"


def _envelope(data: bytes) -> Envelope:
    return Envelope.for_message(data, mail_from="ot@clinic.example", rcpt_tos=[SAM],
                                peer="127.0.0.1:2525", helo="clinic.example")


def _wait_for_spare(spool: Spool, timeout: float = 10.0) -> None:
    """The first store starts the writer, which prepares its first segment in a thread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        writer = spool._journal
        if writer is not None and writer._spare_ready:
            return
        time.sleep(0.01)
    raise AssertionError("the journal never prepared a segment")


def _store_async(spool: Spool, messages: list[bytes]) -> list[str | BaseException]:
    """Submit every message in one turn of an event loop, as concurrent SMTP sessions do."""
    async def run() -> list[str | BaseException]:
        futures = [spool.submit_async(m, _envelope(m)) for m in messages]
        return list(await asyncio.gather(*futures, return_exceptions=True))
    return asyncio.run(run())


def _journal_ids(spool: Spool) -> list[str]:
    return [sid for seg in jnl.segments(spool.journal_dir)
            for sid, _, _ in jnl.read_records(seg, jnl.read_position(seg))]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", journal=True, journal_segment=SEGMENT)
    _store_async(s, [_raw(0)])  # starts the writer (this one is stored as a file)
    _wait_for_spare(s)
    yield s
    s.close()


def test_records_round_trip_and_stop_at_a_cut_or_damaged_record(tmp_path: Path) -> None:
    writer = jnl.JournalWriter(tmp_path / "j", segment_size=SEGMENT)
    try:
        deadline = time.monotonic() + 10
        while not writer._spare_ready and time.monotonic() < deadline:
            time.sleep(0.01)
        ids = [f"{i:020d}-{i:016x}" for i in range(1, 4)]
        assert writer.append([jnl.record_bytes(i, (b"head\n", f"body {i}".encode()))
                              for i in ids])
    finally:
        writer.close()
    [segment] = jnl.segments(tmp_path / "j")
    assert segment.stat().st_size == SEGMENT  # written full beforehand: no size change
    records = list(jnl.read_records(segment))
    assert [(r[0], r[1]) for r in records] == [(i, f"head\nbody {i}".encode()) for i in ids]
    # From a position on, only what follows it.
    assert [r[0] for r in jnl.read_records(segment, records[0][2])] == ids[1:]
    # One byte changed in the second record's bytes: the reading stops before it.
    with open(segment, "r+b") as f:
        f.seek(records[1][2] - 2)
        f.write(b"!")
    assert [r[0] for r in jnl.read_records(segment)] == ids[:1]


def test_stores_in_one_loop_turn_share_one_journal_flush_and_become_files(
        spool: Spool) -> None:
    messages = [_raw(i) for i in range(1, 21)]
    ids = _store_async(spool, messages)
    assert all(isinstance(i, str) for i in ids), ids
    # Durable in the journal, not yet files: one segment holds all twenty.
    assert _journal_ids(spool) == ids
    assert not any((spool.root / f"{i}.eml").exists() for i in ids)
    # The pipeline's side: listing the spool materialises them, in arrival order.
    listed = [e.id for e in spool.pending()]
    assert listed[-20:] == ids
    assert [spool.read(i) for i in ids] == messages
    assert _journal_ids(spool) == []  # the position moved past them


def test_an_announced_id_is_found_while_still_in_the_journal(spool: Spool) -> None:
    [spool_id] = _store_async(spool, [_raw(7)])
    assert isinstance(spool_id, str)
    entry = spool.entry(spool_id)
    assert entry is not None and entry.envelope.rcpt_tos == (SAM,)
    assert spool.read(spool_id) == _raw(7)


def test_full_segments_roll_and_finished_ones_are_deleted_once_materialised(
        spool: Spool) -> None:
    sent: dict[str, bytes] = {}
    for batch in range(6):  # 6 x 8 x ~16 KB: several 256 KB segments
        messages = [_raw(batch * 10 + i, filler=16_000) for i in range(8)]
        for spool_id, data in zip(_store_async(spool, messages), messages, strict=True):
            assert isinstance(spool_id, str)
            sent[spool_id] = data
        _wait_for_spare(spool)
    assert len(jnl.segments(spool.journal_dir)) >= 2
    got = {e.id: spool.read(e.id) for e in spool.pending() if e.id in sent}
    assert got == sent
    # Only the segment still being written is left.
    assert len(jnl.segments(spool.journal_dir)) == 1
    for spool_id in sent:
        spool.remove(spool_id)
    # Taken in and removed: listing again does not bring them back.
    assert not any(e.id in sent for e in spool.pending())


def test_restart_finishes_the_old_segment(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool", journal=True, journal_segment=SEGMENT)
    _store_async(first, [_raw(0)])
    _wait_for_spare(first)
    ids = _store_async(first, [_raw(1), _raw(2)])
    first.close()
    [old] = jnl.segments(first.journal_dir)
    second = Spool(tmp_path / "spool", journal=True, journal_segment=SEGMENT)
    try:
        _store_async(second, [_raw(3)])
        _wait_for_spare(second)
        [new_id] = _store_async(second, [_raw(4)])
        assert len(jnl.segments(second.journal_dir)) == 2  # never appends to the old one
        listed = [e.id for e in second.pending()]
        assert set(ids) | {new_id} <= set(listed)
        assert not old.exists()  # finished and materialised: deleted
    finally:
        second.close()


def test_records_made_into_files_again_after_a_lost_position(spool: Spool) -> None:
    """A crash between making files and recording the position: the records come back
    as files (the pipeline knows them by spool id); a file cut short is written again."""
    ids = _store_async(spool, [_raw(1), _raw(2)])
    assert [e.id for e in spool.pending()][-2:] == ids
    [segment] = jnl.segments(spool.journal_dir)
    segment.with_suffix(jnl.POSITION_SUFFIX).unlink()
    cut = spool.root / f"{ids[0]}.eml"
    cut.write_bytes(cut.read_bytes()[:40])
    (spool.root / f"{ids[1]}.eml").unlink()
    assert spool.materialise() == 2
    assert [spool.read(i) for i in ids] == [_raw(1), _raw(2)]


def test_no_segment_ready_falls_back_to_files(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Too little free space for a segment (a nearly full disk): the stores go to files,
    the way they would without a journal, and the disk is never filled to find out."""
    monkeypatch.setattr(jnl, "MIN_FREE", 1 << 62)
    s = Spool(tmp_path / "spool", journal=True, journal_segment=SEGMENT)
    try:
        first = _store_async(s, [_raw(1)])
        time.sleep(0.2)
        second = _store_async(s, [_raw(2), _raw(3)])
        ids = first + second
        assert all(isinstance(i, str) for i in ids)
        assert all((s.root / f"{i}.eml").exists() for i in ids)
        assert jnl.segments(s.journal_dir) == []
        assert not (s.journal_dir / jnl.SPARE_NAME).exists()
    finally:
        s.close()


def test_a_failed_journal_write_fails_its_stores_and_the_next_use_a_new_segment(
        spool: Spool) -> None:
    [ok] = _store_async(spool, [_raw(1)])
    writer = spool._journal
    assert writer is not None and writer._fd is not None
    _wait_for_spare(spool)
    os.close(writer._fd)  # the segment's file is no longer writable (EBADF)
    failed = _store_async(spool, [_raw(2), _raw(3)])
    assert all(isinstance(f, OSError) for f in failed), failed
    [later] = _store_async(spool, [_raw(4)])
    assert isinstance(later, str)
    assert len(jnl.segments(spool.journal_dir)) == 2
    listed = {e.id for e in spool.pending()}
    assert {ok, later} <= listed
    assert spool.read(later) == _raw(4)


def test_damage_in_a_finished_segment_sets_it_aside(spool: Spool) -> None:
    ids = _store_async(spool, [_raw(1), _raw(2), _raw(3)])
    [segment] = jnl.segments(spool.journal_dir)
    records = list(jnl.read_records(segment))
    with open(segment, "r+b") as f:  # the third record's bytes damaged
        f.seek(records[2][2] - 3)
        f.write(b"?")
    _wait_for_spare(spool)
    assert spool._journal is not None and spool._journal._roll()  # this one is finished
    listed = {e.id for e in spool.pending()}
    assert set(ids[:2]) <= listed and ids[2] not in listed
    assert not segment.exists()
    assert (spool.root / "damaged" / segment.name).exists()


def test_sealed_at_rest_in_the_journal_too(tmp_path: Path) -> None:
    vault = Vault.from_keys([new_key()])
    s = Spool(tmp_path / "spool", journal=True, journal_segment=SEGMENT, vault=vault)
    try:
        _store_async(s, [_raw(0)])
        _wait_for_spare(s)
        secret = b"Sam's diagnosis is confidential"
        [spool_id] = _store_async(s, [_raw(1) + secret])
        [segment] = jnl.segments(s.journal_dir)
        assert secret not in segment.read_bytes()
        s.materialise()
        assert s.read(spool_id) == _raw(1) + secret
    finally:
        s.close()


def test_provider_mail_over_smtp_is_acknowledged_from_the_journal(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", journal=True, journal_segment=SEGMENT)
    stored: list[str] = []
    handler = IntakeHandler(spool, address_acceptor(DOMAIN, lambda: {"sam"}),
                            on_stored=stored.append)
    server = IntakeServer(handler, "127.0.0.1", 0, hostname="mx.records.example")
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="clinic.example",
                          timeout=10) as c:
            c.sendmail("ot@clinic.example", [SAM], _raw(0))
            _wait_for_spare(spool)
            for i in range(1, 4):
                c.sendmail("ot@clinic.example", [SAM], _raw(i))
        assert _journal_ids(spool) == stored[1:]
        assert [e.id for e in spool.pending()] == stored
        assert [spool.read(i) for i in stored] == [_raw(i) for i in range(4)]
    finally:
        server.stop()
        handler.close()
        spool.close()


def test_message_in_the_journal_survives_sigkill_right_after_250(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.intake.smtp", "--spool", str(root), "--domain", DOMAIN,
         "--slug", "sam", "--port", "0", "--journal", "--journal-segment", str(SEGMENT)],
        stdout=subprocess.PIPE, cwd=REPO, env=env,
    )
    acked: dict[str, bytes] = {}
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        assert line[0] == "READY", line
        c = smtplib.SMTP("127.0.0.1", int(line[2]), timeout=10)
        c.ehlo("clinic.example")
        deadline = time.monotonic() + 10
        i = 0
        while True:  # until the journal takes them (its first segment is prepared)
            i += 1
            body = _raw(i)
            c.mail("ot@clinic.example")
            c.rcpt(SAM)
            code, reply = c.data(body)
            assert code == 250
            spool_id = reply.decode().rsplit(" ", 1)[1]
            acked[spool_id] = body
            segs = jnl.segments(root / "journal")
            if segs and spool_id in {r[0] for r in jnl.read_records(segs[-1])}:
                break
            assert time.monotonic() < deadline, "no message went through the journal"
            time.sleep(0.05)
        c.mail("ot@clinic.example")
        c.rcpt(SAM)
        code, reply = c.data(_raw(999))
        proc.send_signal(signal.SIGKILL)
        assert code == 250
        acked[reply.decode().rsplit(" ", 1)[1]] = _raw(999)
        c.sock.close()
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    fresh = Spool(root)  # a reader: no journal writer of its own
    fresh.cleanup_partial()
    assert {e.id: fresh.read(e.id) for e in fresh.pending()} == acked


def test_a_failed_flush_fails_its_stores_voids_them_and_the_next_use_a_new_segment(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    [ok] = _store_async(spool, [_raw(1)])
    _wait_for_spare(spool)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(jnl, "_fdatasync", failing)
    failed = _store_async(spool, [_raw(2), _raw(3)])
    assert all(isinstance(f, OSError) for f in failed), failed
    monkeypatch.undo()
    [later] = _store_async(spool, [_raw(4)])
    assert isinstance(later, str)
    assert len(jnl.segments(spool.journal_dir)) == 2
    # The failed batch is void: nothing of it is ever taken in (its senders got 451).
    listed = [e.id for e in spool.pending()]
    assert sorted(spool.read(i) for i in listed) == sorted([_raw(0), _raw(1), _raw(4)])
    assert {ok, later} <= set(listed)
