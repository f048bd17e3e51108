"""SMTP intake and spool: real aiosmtpd on 127.0.0.1, stdlib smtplib as the client, no mocks."""

from __future__ import annotations

import errno
import json
import os
import signal
import smtplib
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker.intake.smtp import (
    MAX_RECIPIENTS,
    IntakeHandler,
    IntakeServer,
    address_acceptor,
)
from broker.intake.spool import CommitMode, Envelope, Spool, SpoolCorrupt

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "records.example"
SAM = f"sam@{DOMAIN}"
SENDER = "therapist@clinic.example"
TOKEN = "abcdefghijklmnopqrstuvwxyz234567"  # 32 chars of [a-z2-7]

# CRLF throughout, a line that starts with a dot (dot-stuffed on the wire), a lone "..",
# 8-bit bytes and trailing whitespace: all must come back exactly.
RAW = (
    b"From: Dr T <therapist@clinic.example>\r\n"
    b"To: sam@records.example\r\n"
    b"Subject: session notes\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Sam did well today. \xc3\xa9l\xc3\xa8ve   \r\n"
    b".a line starting with a dot\r\n"
    b"..\r\n"
    b"\ttabbed\r\n"
    b"\r\n"
    b"end\r\n"
)


class FailingSpool(Spool):
    """A real spool whose write hits a full disk after part of the file is on disk."""

    def _write_file(self, path: Path, chunks: tuple[bytes, ...], *, sync: bool = True) -> None:
        blob = b"".join(chunks)
        path.write_bytes(blob[: len(blob) // 2])  # the half a full disk would leave
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class Intake:
    """A running intake server over a spool, plus what on_stored saw."""

    def __init__(self, spool: Spool, size_limit: int = 64 * 1024) -> None:
        self.spool = spool
        self.stored: list[str] = []
        self.handler = IntakeHandler(
            spool, address_acceptor(DOMAIN, lambda: {"sam", "Alex"}), on_stored=self.stored.append
        )
        self.server = IntakeServer(
            self.handler, "127.0.0.1", 0, hostname="mx.records.example",
            data_size_limit=size_limit,
        )

    def client(self) -> smtplib.SMTP:
        c = smtplib.SMTP("127.0.0.1", self.server.port, local_hostname="clinic.example",
                         timeout=10)
        c.ehlo()
        return c


def _run(spool: Spool, **kw: int) -> Iterator[Intake]:
    intake = Intake(spool, **kw)
    intake.server.start()
    try:
        yield intake
    finally:
        intake.server.stop()
        intake.handler.close()
        spool.close()


MODES: list[CommitMode] = ["batch", "each"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> CommitMode:
    mode: CommitMode = request.param
    return mode


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[Intake]:
    yield from _run(Spool(tmp_path / "spool"))


def _send(c: smtplib.SMTP, raw: bytes, rcpts: tuple[str, ...] = (SAM,)) -> tuple[int, bytes]:
    """MAIL/RCPT/DATA by hand so the test sees the DATA reply itself."""
    assert c.mail(SENDER)[0] == 250
    for r in rcpts:
        assert c.rcpt(r)[0] == 250
    return c.data(raw)


def _queued_id(reply: bytes) -> str:
    text = reply.decode()
    assert text.startswith("2.0.0 Ok: queued as "), text
    return text.rsplit(" ", 1)[1]


# -- SMTP behaviour --------------------------------------------------------------------------


def test_250_only_after_message_is_committed(intake: Intake) -> None:
    with intake.client() as c:
        code, reply = _send(c, RAW)
        assert code == 250
        spool_id = _queued_id(reply)
        # At the moment the 250 arrives, the file is complete and its header parses.
        assert intake.spool.read(spool_id) == RAW
        assert intake.spool.stored_bytes(spool_id) == RAW  # no vault here: stored as is
        env = intake.spool.envelope(spool_id)
    assert intake.stored == [spool_id]
    assert env.mail_from == SENDER
    assert env.rcpt_tos == (SAM,)
    assert env.helo == "clinic.example"
    assert env.peer.startswith("127.0.0.1:")
    assert env.size == len(RAW)
    assert env.received_at.endswith("+00:00")
    [entry] = intake.spool.pending()
    assert entry.id == spool_id and entry.envelope == env
    assert intake.spool.read(spool_id) == RAW


def test_greeting_and_ehlo_advertise_name_size_and_8bit(intake: Intake) -> None:
    with intake.client() as c:
        assert c.ehlo_resp is not None
        assert c.ehlo_resp.startswith(b"mx.records.example")
        assert c.has_extn("size") and c.esmtp_features["size"] == str(64 * 1024)
        assert c.has_extn("8bitmime") and c.has_extn("smtputf8")


def test_unknown_recipient_is_refused_at_rcpt(intake: Intake) -> None:
    with intake.client() as c:
        assert c.mail(SENDER)[0] == 250
        code, msg = c.rcpt(f"nobody@{DOMAIN}")
        assert (code, msg) == (550, b"5.1.1 no such recipient here")
        assert c.rcpt("sam@elsewhere.example")[0] == 550
        assert c.rcpt(SAM)[0] == 250
    assert intake.spool.pending() == []


def test_recipient_cap(intake: Intake) -> None:
    with intake.client() as c:
        assert c.mail(SENDER)[0] == 250
        for _ in range(MAX_RECIPIENTS):
            assert c.rcpt(SAM)[0] == 250
        code, msg = c.rcpt(SAM)
        assert code == 452 and msg.startswith(b"4.5.3")
        assert c.data(RAW)[0] == 250
    [entry] = intake.spool.pending()
    assert len(entry.envelope.rcpt_tos) == MAX_RECIPIENTS


def test_oversized_declared_in_mail_from_gets_552(intake: Intake) -> None:
    with intake.client() as c:
        code, _ = c.mail(SENDER, [f"SIZE={64 * 1024 + 1}"])
        assert code == 552
        # The session is still usable for a message that fits.
        assert _send(c, RAW)[0] == 250


def test_oversized_undeclared_gets_552_after_data(intake: Intake) -> None:
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 70  # ~70 KB > 64 KB limit
    with intake.client() as c:
        assert c.mail(SENDER)[0] == 250  # no SIZE= parameter
        assert c.rcpt(SAM)[0] == 250
        code, _ = c.data(big)
        assert code == 552
        assert _send(c, RAW)[0] == 250
    assert [intake.spool.read(e.id) for e in intake.spool.pending()] == [RAW]
    assert intake.stored and len(intake.stored) == 1


def test_stored_bytes_are_identical_to_what_was_sent(intake: Intake) -> None:
    bodies = [
        RAW,
        b"Subject: binary-ish\r\n\r\n" + bytes(range(1, 256)).replace(b"\r", b"").replace(
            b"\n", b"") + b"\r\n",
        b"Subject: no final newline in source\r\n\r\nlast",  # smtplib adds CRLF on the wire
        b"Subject: dots\r\n\r\n.\r\n..\r\n...\r\n. \r\n",
    ]
    expected = [*bodies[:2], bodies[2] + b"\r\n", bodies[3]]
    ids = []
    with intake.client() as c:
        for body in bodies:
            code, reply = _send(c, body)
            assert code == 250
            ids.append(_queued_id(reply))
    assert [intake.spool.read(i) for i in ids] == expected
    assert [e.id for e in intake.spool.pending()] == ids  # arrival order


def test_enospc_gets_452_and_nothing_committed(tmp_path: Path, mode: CommitMode) -> None:
    for intake in _run(FailingSpool(tmp_path / "spool", commit=mode)):
        with intake.client() as c:
            code, msg = _send(c, RAW)
        assert (code, msg) == (452, b"4.3.1 Insufficient system storage")
        assert intake.stored == []
        assert intake.spool.pending() == []
        assert list(intake.spool.root.iterdir()) == []  # the half-written .eml was taken back


def test_unusable_spool_dir_gets_451_and_nothing_committed(
    tmp_path: Path, mode: CommitMode
) -> None:
    root = tmp_path / "spool"
    for intake in _run(Spool(root, commit=mode)):
        # Put a plain file where the spool directory was: a real OSError (ENOTDIR), even as root.
        root.rename(tmp_path / "moved")
        root.write_bytes(b"")
        with intake.client() as c:
            code, msg = _send(c, RAW)
        assert (code, msg) == (451, b"4.3.0 Temporary failure, try again later")
        root.unlink()
        (tmp_path / "moved").rename(root)
        assert intake.stored == []
        assert intake.spool.pending() == []
        assert list(root.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_spool_dir_gets_451(tmp_path: Path) -> None:
    for intake in _run(Spool(tmp_path / "spool")):
        intake.spool.root.chmod(0o500)
        try:
            with intake.client() as c:
                code, _ = _send(c, RAW)
        finally:
            intake.spool.root.chmod(0o700)
        assert code == 451
        assert intake.spool.pending() == []


def test_concurrent_sessions_all_committed(tmp_path: Path, mode: CommitMode) -> None:
    for intake in _run(Spool(tmp_path / "spool", commit=mode)):
        _concurrent_sessions(intake)


def _concurrent_sessions(intake: Intake) -> None:
    def one(i: int) -> str:
        with intake.client() as c:
            code, reply = _send(c, RAW + f"n={i}\r\n".encode())
            assert code == 250
            return _queued_id(reply)

    with ThreadPoolExecutor(8) as ex:
        ids = list(ex.map(one, range(40)))
    assert sorted(ids) == [e.id for e in intake.spool.pending()]
    assert sorted(intake.stored) == sorted(ids)


# -- address acceptor ------------------------------------------------------------------------


def test_address_acceptor() -> None:
    slugs = {"sam"}
    accepts = address_acceptor("Records.Example", lambda: slugs)
    assert accepts("sam@records.example")
    assert accepts("SAM@RECORDS.EXAMPLE")
    assert accepts(f"review+{TOKEN}@records.example")
    assert accepts(f"Review+{TOKEN.upper()}@records.example")
    assert accepts("bounces+12345@records.example")
    assert not accepts("alex@records.example")
    slugs.add("alex")  # the set is consulted per call: new children need no restart
    assert accepts("alex@records.example")
    assert not accepts("sam@other.example")
    assert not accepts("sam@sub.records.example")
    assert not accepts("sam")
    assert not accepts("@records.example")
    assert not accepts(f"review+{TOKEN[:-1]}@records.example")  # 31 chars
    assert not accepts(f"review+{TOKEN}1@records.example")  # '1' not base32
    assert not accepts("review@records.example")
    assert not accepts("bounces+12a@records.example")
    assert not accepts("bounces+@records.example")
    assert not accepts("sam+x@records.example")


COMMAND_ARGS = [
    "", "<>", "<sam@records.example>", " <sam@records.example> SIZE=100 BODY=8BITMIME",
    "sam@records.example", "<\"odd name\"@records.example>", "<@relay.example:sam@records.example>",
    "<sam@[127.0.0.1]>", "<ünïcode@records.example> SMTPUTF8", "<sam@records.example",
    "<<sam@records.example>>", "not an address", "<a b@records.example>",
    "<" + "x" * 70 + "@r.example>",
    "<sam@>", "<@records.example>", "<sam..x@records.example>", "\x00<sam@records.example>",
]


@pytest.mark.parametrize("limit", [0, 64])
def test_command_addresses_parse_as_aiosmtpd_parses_them(limit: int) -> None:
    """The intake parses MAIL/RCPT addresses itself (cached, see _LimitedSMTP._getaddr):
    every answer must be aiosmtpd's own, twice over (the second from the cache)."""
    from aiosmtpd.smtp import SMTP

    from broker.intake.smtp import _LimitedSMTP

    ours = _LimitedSMTP(lambda peer: "k", lambda key: None, object(), hostname="mx.example")
    theirs = SMTP(object(), hostname="mx.example")
    ours.local_part_limit = theirs.local_part_limit = limit
    for _ in range(2):
        for arg in COMMAND_ARGS:
            assert ours._getaddr(arg) == SMTP._getaddr(theirs, arg), arg


# -- spool -----------------------------------------------------------------------------------


def _envelope(data: bytes) -> Envelope:
    return Envelope.for_message(data, mail_from=SENDER, rcpt_tos=[SAM], peer="127.0.0.1:1",
                                helo="clinic.example")


def test_envelope_json_round_trip() -> None:
    env = _envelope(RAW)
    assert Envelope.from_json(env.to_json()) == env
    assert json.loads(env.to_json())["rcpt_tos"] == [SAM]
    with pytest.raises(ValueError):
        Envelope.from_json("[]")
    with pytest.raises(ValueError):
        Envelope.from_json('{"mail_from": "x"}')


def test_spool_file_modes_and_removal(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert stat.S_IMODE(spool.root.stat().st_mode) == 0o700
    spool_id = spool.store(RAW, _envelope(RAW))
    assert [p.name for p in spool.root.iterdir()] == [f"{spool_id}.eml"]  # one file
    assert stat.S_IMODE((spool.root / f"{spool_id}.eml").stat().st_mode) == 0o600
    with pytest.raises(ValueError):
        spool.store(RAW + b"x", _envelope(RAW))  # envelope must describe the data
    with pytest.raises(ValueError):
        spool.read("../../etc/passwd")
    spool.remove(spool_id)
    assert spool.pending() == [] and list(spool.root.iterdir()) == []
    spool.remove(spool_id)  # idempotent


def test_read_detects_damage(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool_id = spool.store(RAW, _envelope(RAW))
    path = spool.root / f"{spool_id}.eml"
    path.write_bytes(path.read_bytes().replace(b"well", b"WELL"))  # same length, other bytes
    with pytest.raises(SpoolCorrupt):
        spool.read(spool_id)


def test_partial_eml_is_never_pending_and_is_cleaned_when_old(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    done = spool.store(RAW, _envelope(RAW))
    old, young = "00000000000000000001-00000000000000aa", "99999999999999999999-00000000000000bb"
    whole = (spool.root / f"{done}.eml").read_bytes()
    (spool.root / f"{old}.eml").write_bytes(whole[:-5])  # cut short: never acknowledged
    (spool.root / f"{young}.eml").write_bytes(whole[:10])
    long_ago = time.time() - 3600
    os.utime(spool.root / f"{old}.eml", (long_ago, long_ago))
    assert [e.id for e in spool.pending()] == [done]
    assert spool.cleanup_partial() == 1
    names = sorted(p.name for p in spool.root.iterdir())
    assert names == sorted([f"{done}.eml", f"{young}.eml"])
    assert [e.id for e in spool.pending()] == [done]


def test_listing_remembers_headers_but_never_what_is_gone(tmp_path: Path) -> None:
    """The spool keeps the headers it has read (a backlog is listed every round); a
    message taken in or set aside is never listed again, one stored since is."""
    spool = Spool(tmp_path / "spool")
    ids = [spool.store(RAW + f"{i}\r\n".encode(), _envelope(RAW + f"{i}\r\n".encode()))
           for i in range(4)]
    assert [e.id for e in spool.pending(first=lambda env: False)] == ids
    spool.remove(ids[0])
    spool.set_aside(ids[1])
    late = spool.store(RAW + b"late\r\n", _envelope(RAW + b"late\r\n"))
    assert [e.id for e in spool.pending(first=lambda env: False)] == [ids[2], ids[3], late]
    assert [e.id for e in spool.pending(limit=1)] == [ids[2]]
    assert [e.id for e in spool.pending(keep=lambda env: env.size == len(RAW) + 6)] == [late]
    spool.close()


def test_concurrent_stores(tmp_path: Path, mode: CommitMode) -> None:
    spool = Spool(tmp_path / "spool", commit=mode)
    payloads = [RAW + f"{i}\r\n".encode() for i in range(200)]
    with ThreadPoolExecutor(16) as ex:
        ids = list(ex.map(lambda d: spool.store(d, _envelope(d)), payloads))
    spool.close()
    assert len(set(ids)) == 200
    assert [e.id for e in spool.pending()] == sorted(ids)
    assert [spool.read(i) for i in ids] == payloads
    assert len(spool.pending(limit=7)) == 7


class FlakyDirSpool(Spool):
    """A real spool whose first flush (a batch's syncfs or file fsyncs, or one store's
    directory fsync) fails with EIO, slowly, so others queue behind it."""

    def __init__(self, root: Path, commit: CommitMode) -> None:
        super().__init__(root, commit=commit)
        self.fsyncs = 0

    def _fail_first(self) -> None:
        self.fsyncs += 1
        if self.fsyncs == 1:
            time.sleep(0.2)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def _flush_files(self, jobs: list[Any]) -> None:
        self._fail_first()
        super()._flush_files(jobs)

    def _fsync_root(self) -> None:
        self._fail_first()
        super()._fsync_root()


def test_failed_flush_fails_every_store_it_covered(tmp_path: Path, mode: CommitMode) -> None:
    spool = FlakyDirSpool(tmp_path / "spool", mode)
    payloads = [RAW + f"{i}\r\n".encode() for i in range(12)]

    def store(data: bytes) -> str | OSError:
        try:
            return spool.store(data, _envelope(data))
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(store, payloads))
    failed = [r for r in results if isinstance(r, OSError)]
    ok = [r for r in results if isinstance(r, str)]
    assert failed and all(e.errno == errno.EIO for e in failed)
    # Exactly the acknowledged ones are committed; the failed ones left nothing behind.
    assert sorted(ok) == [e.id for e in spool.pending()]
    assert len(list(spool.root.iterdir())) == len(ok)  # one file per message
    spool.close()


# -- crash -----------------------------------------------------------------------------------


def test_message_survives_sigkill_right_after_250(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.intake.smtp", "--spool", str(root), "--domain", DOMAIN,
         "--slug", "sam", "--port", "0"],
        stdout=subprocess.PIPE, cwd=REPO, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        assert line[0] == "READY", line
        port = int(line[2])
        c = smtplib.SMTP("127.0.0.1", port, timeout=10)
        c.ehlo("clinic.example")
        acked: dict[str, bytes] = {}
        for i in range(5):
            body = RAW + f"message {i}\r\n".encode()
            code, reply = _send(c, body)
            assert code == 250
            acked[_queued_id(reply)] = body
        # Sixth message: kill the server the instant its 250 arrives.
        body = RAW + b"the last one\r\n"
        code, reply = _send(c, body)
        proc.send_signal(signal.SIGKILL)
        assert code == 250
        acked[_queued_id(reply)] = body
        c.sock.close()
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    fresh = Spool(root)
    fresh.cleanup_partial()
    assert {e.id: fresh.read(e.id) for e in fresh.pending()} == acked


def test_damaged_spool_message_is_set_aside(tmp_path: Path) -> None:
    """A committed message whose bytes changed on disk leaves the queue for damaged/."""
    spool = Spool(tmp_path / "spool")
    data = b"From: a@b.example\r\nSubject: x\r\n\r\nbody\r\n"
    sid = spool.store(data, Envelope.for_message(data, mail_from="a@b.example",
                                                 rcpt_tos=("sam@records.example",),
                                                 peer="127.0.0.1", helo="t"))
    path = tmp_path / "spool" / f"{sid}.eml"
    tampered = path.read_bytes().replace(b"body", b"BODY")
    path.write_bytes(tampered)
    with pytest.raises(SpoolCorrupt):
        spool.read(sid)
    folder = spool.set_aside(sid)
    assert [e.id for e in spool.pending()] == []
    assert (folder / f"{sid}.eml").read_bytes() == tampered
    spool.close()
