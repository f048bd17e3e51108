"""Faults under the intake, made real: the database goes away, the spool's disk fills up.

Database away: the broker answers 451 at RCPT (the sender keeps the mail), never says 250
for mail it did not store, works off every message it did acknowledge and takes mail again
by itself once the database is back. On PostgreSQL the broker talks to the server through
a TCP proxy this test starts and then shuts (the shared server keeps running); on SQLite
the database lives on a small tmpfs that the test fills, which is what stops SQLite in
real life (it can still read, but no transaction can commit).

Spool disk full: the spool is a 2 MB tmpfs; mail is refused with 452 once it is full, no
half-written file stays behind, and mail is taken again as soon as space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from email.policy import SMTP
from pathlib import Path

import pytest
from sqlalchemy import make_url, select

from broker.db.migrate import upgrade
from broker.db.models import Inbound, Record
from broker.intake.smtp import IntakeHandler, IntakeServer, address_acceptor
from broker.intake.spool import CommitMode, Spool
from broker.service import DatabaseGate
from tests.harness import DOMAIN, World, report

SAM = f"sam@{DOMAIN}"
PROVIDER = "lee@clinic.example"


# -- real faults -----------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` for the test (skips where mounting is not
    permitted); unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {exc}")
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, timeout=10)
        if done.returncode != 0:  # something still holds a file open: detach it anyway
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill(directory: Path) -> Path:
    """Write a filler file until its file system says ENOSPC; the filler, to free it later."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            try:
                while True:
                    os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 to ``upstream`` that can go down (listener closed, every
    connection cut: clients see connection refused) and come back on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class Outage:
    """Takes the broker's database away and brings it back, for real."""

    def down(self) -> None:
        raise NotImplementedError

    def up(self) -> None:
        raise NotImplementedError


class PostgresOutage(Outage):
    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy

    def down(self) -> None:
        self.proxy.down()

    def up(self) -> None:
        self.proxy.up()


class SqliteDiskFull(Outage):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.filler: Path | None = None

    def down(self) -> None:
        self.filler = fill(self.directory)

    def up(self) -> None:
        if self.filler is not None:
            self.filler.unlink()
            self.filler = None


@pytest.fixture
def outage(db_url: str, tmp_path: Path) -> Iterator[tuple[str, Outage]]:
    """(the URL the broker is given, how to take that database away)."""
    if db_url.startswith("sqlite"):
        with tmpfs(tmp_path / "dbfs", "16m") as fs:
            url = f"sqlite:///{fs / 'broker.db'}"
            upgrade(url)
            yield url, SqliteDiskFull(fs)
        return
    real = make_url(db_url)
    proxy = TcpProxy((real.host or "127.0.0.1", real.port or 5432))
    try:
        yield real.set(port=proxy.port).render_as_string(hide_password=False), PostgresOutage(
            proxy)
    finally:
        proxy.down()


# -- SMTP as a sending MTA sees it -----------------------------------------------------------


def attempt(port: int, subject: str) -> tuple[int, str | None]:
    """One delivery attempt: (the refusing or final code, the spool id when it was 250).
    Stops at RCPT when that is refused, as an MTA does: the message is never sent then."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("clinic.example")
        code, _ = c.mail(PROVIDER)
        assert code == 250
        code, text = c.rcpt(SAM)
        if code != 250:
            c.rset()
            return code, text.decode()
        code, text = c.data(report(subject=subject).as_bytes(policy=SMTP))
        return code, text.decode().rsplit(" ", 1)[1] if code == 250 else None


def send(c: smtplib.SMTP, raw: bytes) -> tuple[int, bytes]:
    """MAIL, RCPT, then DATA: the DATA reply (the one that says whether it was stored)."""
    c.ehlo_or_helo_if_needed()
    assert c.mail(PROVIDER)[0] == 250
    assert c.rcpt(SAM)[0] == 250
    return c.data(raw)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def taken_in(world: World, ids: list[str]) -> bool:
    with world.db.read_session() as s:
        got = set(s.scalars(select(Inbound.spool_id).where(Inbound.spool_id.in_(ids))))
    return got == set(ids)


# -- database away ---------------------------------------------------------------------------


def test_database_outage_gets_451_and_the_broker_recovers_by_itself(
    tmp_path: Path, outage: tuple[str, Outage]
) -> None:
    url, fault = outage
    world = World(tmp_path / "home", url).start()
    try:
        acked: list[str] = []
        code, spool_id = attempt(world.port, "before the outage")
        assert code == 250 and spool_id
        acked.append(spool_id)
        wait_until(lambda: taken_in(world, acked), 15, "the first message to be taken in")

        fault.down()
        # Until the broker notices (its next database read or pipeline round), mail may
        # still get 250: it is in the durable spool and must be worked off later.
        refused: list[tuple[int, str | None]] = []
        deadline = time.monotonic() + 15
        while not refused and time.monotonic() < deadline:
            code, detail = attempt(world.port, f"during the outage {len(acked)}")
            if code == 250:
                assert detail
                acked.append(detail)
                time.sleep(0.2)
            else:
                refused.append((code, detail))
        assert refused, "the broker kept answering 250 with its database away"
        assert refused[0][0] == 451 and (refused[0][1] or "").startswith("4.3.0"), refused
        # It stays shut while the database is away: refused at RCPT, no message sent.
        for i in range(5):
            code, detail = attempt(world.port, f"refused {i}")
            assert (code, (detail or "")[:5]) == (451, "4.3.0"), (code, detail)
            time.sleep(0.3)
        assert world.service is not None
        assert len(world.service.rt.spool.pending()) == len(acked) - 1  # nothing else kept

        fault.up()
        # No restart: the same broker takes mail again once the database answers.
        after: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            code, detail = attempt(world.port, "after the outage")
            after.append(code)
            if code == 250:
                assert detail
                acked.append(detail)
                break
            time.sleep(0.3)
        assert after[-1] == 250, f"still refused after the database came back: {after}"
        wait_until(lambda: taken_in(world, acked), 20,
                   "every acknowledged message to be taken in after recovery")
        assert world.service.rt.spool.pending() == []
        with world.db.read_session() as s:
            subjects = sorted(r.subject for r in s.scalars(select(Record)))
        assert len(subjects) == len(acked)  # one held record per 250, none for a 451
        assert "before the outage" in subjects and "after the outage" in subjects
    finally:
        fault.up()
        world.stop()


def test_broker_started_while_the_database_is_away_defers_instead_of_bouncing(
    tmp_path: Path, outage: tuple[str, Outage]
) -> None:
    """Without the database the broker does not know its children: a 550 then would bounce
    good mail for ever. It answers 451 until it can tell, then takes the mail."""
    url, fault = outage
    if isinstance(fault, SqliteDiskFull):
        pytest.skip("a full disk does not stop SQLite reads: the broker knows its children "
                    "and rightly accepts the first mail (the outage test covers what follows)")
    world = World(tmp_path / "home", url)  # the team is applied while the database is up
    fault.down()
    try:
        world.start()
        code, detail = attempt(world.port, "while starting")
        assert (code, (detail or "")[:5]) == (451, "4.3.0"), (code, detail)
        fault.up()
        codes: list[int] = []
        deadline = time.monotonic() + 20
        while (not codes or codes[-1] != 250) and time.monotonic() < deadline:
            time.sleep(0.3)
            code, detail = attempt(world.port, "after start")
            codes.append(code)
        assert codes[-1] == 250 and detail, codes
        wait_until(lambda: taken_in(world, [detail]), 20, "the message to be taken in")
    finally:
        fault.up()
        world.stop()


def test_gate_shuts_on_failed_or_hung_reads_and_pipeline_failures_and_reopens() -> None:
    now = [100.0]
    gate = DatabaseGate(hold=10.0, hang=5.0, clock=lambda: now[0])
    assert gate.is_open()
    gate.read_started()
    gate.read_done(ok=False)
    assert not gate.is_open()
    gate.read_started()
    gate.read_done(ok=True)
    assert gate.is_open()
    gate.read_started()  # a read that hangs (packets dropped): shut after `hang` seconds
    now[0] += 4.9
    assert gate.is_open()
    now[0] += 0.2
    assert not gate.is_open()
    gate.read_done(ok=True)
    gate.pipeline_failed()  # reads work, writes do not (SQLite on a full disk)
    assert not gate.is_open()
    now[0] += 9.9
    assert not gate.is_open()
    gate.pipeline_worked()
    assert gate.is_open()
    gate.pipeline_failed()  # and nothing left to retry: it does not stay shut for ever
    now[0] += 10.1
    assert gate.is_open()


# -- spool disk full -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "each"])
def test_full_spool_disk_gets_452_leaves_nothing_half_written_and_recovers(
    tmp_path: Path, mode: CommitMode
) -> None:
    with tmpfs(tmp_path / "spoolfs", "2m") as fs:
        spool = Spool(fs / "spool", commit=mode)
        handler = IntakeHandler(spool, address_acceptor(DOMAIN, lambda: {"sam"}))
        server = IntakeServer(handler, "127.0.0.1", 0, hostname="mx.records.example")
        server.start()
        body = "Sam's weekly notes.\n" * 5000  # ~100 KB: the 2 MB disk fills after ~20
        try:
            acked: list[str] = []
            codes: list[int] = []
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
                for i in range(60):
                    code, text = send(c, report(f"n{i}", body).as_bytes(policy=SMTP))
                    codes.append(code)
                    if code != 250:
                        assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
                        break
                    acked.append(text.decode().rsplit(" ", 1)[1])
            assert codes[-1] == 452, f"the 2 MB spool never filled: {len(acked)} accepted"
            assert len(acked) >= 5
            # Exactly the acknowledged messages are there, each complete; no partial file.
            assert sorted(os.listdir(spool.root)) == sorted(f"{i}.eml" for i in acked)
            assert [e.id for e in spool.pending()] == acked
            for spool_id in acked:
                assert b"Sam's weekly notes" in spool.read(spool_id)

            # The pipeline takes two messages in (it removes them from the spool): room again.
            for spool_id in acked[:2]:
                spool.remove(spool_id)
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
                code, text = send(c, report("after", body).as_bytes(policy=SMTP))
            assert code == 250, (code, text)
            assert spool.entry(text.decode().rsplit(" ", 1)[1]) is not None
        finally:
            server.stop()
            handler.close()
            spool.close()

