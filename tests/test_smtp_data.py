"""The intake's DATA (broker.intake.data, one buffer instead of a list of lines) answers
and stores exactly what aiosmtpd's own DATA does: the same bytes are sent over real SMTP to
the broker's intake and to a plain aiosmtpd server on 127.0.0.1, and their replies and the
bytes each kept are compared. Then: a large message costs the intake about twice its size
in memory, where aiosmtpd's own DATA took four times; and a line that never ends costs it
nothing, where aiosmtpd kept every piece of it."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtpd
import pytest
from aiosmtpd.controller import Controller
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.intake import data as one_buffer
from broker.intake.smtp import IntakeHandler, IntakeServer, address_acceptor
from broker.intake.spool import Spool
from tests.harness import free_port

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "records.example"
SAM = f"sam@{DOMAIN}"
LIMIT = 4096  # small, so the size refusal is reached too


class Keeper:
    """aiosmtpd's own DATA, keeping what each message brought."""

    def __init__(self) -> None:
        self.kept: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.kept.append(envelope.original_content)
        return "250 OK"


class Pair:
    """The broker's intake and a plain aiosmtpd server, both listening on 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        self.spool = Spool(tmp / "spool")
        self.handler = IntakeHandler(self.spool, address_acceptor(DOMAIN, lambda: {"sam"}))
        self.intake = IntakeServer(self.handler, "127.0.0.1", 0, hostname="mx.records.example",
                                   data_size_limit=LIMIT)
        self.keeper = Keeper()
        self.plain = Controller(self.keeper, hostname="127.0.0.1", port=free_port(),
                                server_hostname="plain.example", data_size_limit=LIMIT,
                                decode_data=False, enable_SMTPUTF8=True)

    def start(self) -> Pair:
        self.intake.start()
        self.plain.start()
        return self

    def stop(self) -> None:
        self.plain.stop()
        self.intake.stop()
        self.handler.close()
        self.spool.close()

    def ports(self) -> tuple[int, int]:
        return self.intake.port, self.plain.port


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = Pair(tmp_path_factory.mktemp("data")).start()
    yield p
    p.stop()


def _wire(port: int, wire: bytes, pieces: tuple[int, ...] = ()) -> tuple[
        tuple[int, bytes], tuple[int, bytes]]:
    """``wire`` (already dot-stuffed) as one message's DATA, then a small message on the
    same session: (the reply to the first, the reply to the second). ``pieces``: sizes
    (repeated) in which to send it, each a write of its own with a pause after it, so
    the server reads it in those pieces (the terminator split anywhere)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="clinic.example", timeout=10) as c:
        c.ehlo()
        assert c.sock is not None
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = []
        for body in (wire, b"Subject: next\r\n\r\nstill usable\r\n"):
            assert c.mail("lee@clinic.example")[0] == 250
            assert c.rcpt(SAM)[0] == 250
            c.putcmd("data")
            assert c.getreply()[0] == 354
            data = body + b".\r\n"
            if pieces and body is wire:
                at, k = 0, 0
                while at < len(data):
                    n = pieces[k % len(pieces)]
                    c.send(data[at:at + n])
                    at, k = at + n, k + 1
                    time.sleep(0.0005)
            else:
                c.send(data)
            replies.append(c.getreply())
        return replies[0], replies[1]


def _both(pair: Pair, wire: bytes, pieces: tuple[int, ...] = ()) -> None:
    ours_port, plain_port = pair.ports()
    before_ours = {e.id for e in pair.spool.pending()}
    before_plain = len(pair.keeper.kept)
    ours, ours_next = _wire(ours_port, wire, pieces)
    plain, plain_next = _wire(plain_port, wire, pieces)
    assert ours[0] == plain[0]
    assert ours_next[0] == plain_next[0] == 250
    if ours[0] != 250:
        assert ours == plain  # aiosmtpd's own error reply, word for word
    new = sorted((e for e in pair.spool.pending() if e.id not in before_ours),
                 key=lambda e: e.envelope.received_at)
    kept_ours = [pair.spool.read(e.id) for e in new]
    kept_plain = pair.keeper.kept[before_plain:]
    assert kept_ours == kept_plain


def test_the_broker_runs_its_own_data_here(pair: Pair) -> None:
    """Else the comparisons below would compare aiosmtpd with itself."""
    assert aiosmtpd.__version__.startswith(one_buffer.FOLLOWS)
    assert one_buffer._DataState is not None


EDGES = [
    b"Subject: plain\r\n\r\nhello\r\n",
    b"",  # an empty message
    b"Subject: dots\r\n\r\n..\r\n...\r\n.. \r\n..x\r\n",  # stuffed lines, unstuffed once
    b"Subject: bare\r\n\r\nbare\nline feeds\rand returns\r\n",
    b"Subject: eight\r\n\r\n\xe2\x9c\x93 \xff\x00\r\n",
    b"Subject: long\r\n\r\n" + b"x" * 999 + b"\r\n",  # at the limit: kept
    b"Subject: long\r\n\r\n" + b"x" * 1000 + b"\r\n",  # one over: 500
    b"Subject: longer\r\n\r\n" + b"y" * 70_000 + b"\r\n",  # past the reader's buffer: 500
    b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 60,  # past the size limit: 552
    b"Subject: both\r\n\r\n" + (b"z" * 78 + b"\r\n") * 60 + b"w" * 2000 + b"\r\n",
]


@pytest.mark.parametrize("wire", EDGES, ids=range(len(EDGES)))
def test_each_edge_is_answered_and_kept_as_aiosmtpd_does(pair: Pair, wire: bytes) -> None:
    _both(pair, wire)


SHORT = [
    b"a\r\n",  # the terminator right after a one-byte line
    b"\r\n",  # an empty line, then the terminator
    b"\r\n\r\n",
    b"..\r\n",  # a stuffed first line
    b"..\r\n..\r\n",
    b"\r\n..\r\n\r\n",
    b"x\r\n.\r\r\n",  # almost a terminator
    b"x\r\n.\n\r\n",
    b"x\r.\r\n",
    b"\r.\r\n",
    b"Subject: s\r\n\r\n" + b"w" * 1100 + b"\r\n",
]


@pytest.mark.parametrize("pieces", [(1,), (2,), (3,), (4,), (1, 5, 2)], ids=str)
@pytest.mark.parametrize("wire", SHORT, ids=range(len(SHORT)))
def test_short_messages_sent_in_pieces_as_aiosmtpd_does(
        pair: Pair, wire: bytes, pieces: tuple[int, ...]) -> None:
    """The terminator (and the line end before it) split across reads at every place."""
    _both(pair, wire, pieces)


lines = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b".", b"..", b". ", b"\r", b"\n", b"\x00", b"\xff"]),
        st.integers(900, 1100).map(lambda n: b"q" * n),
    ).filter(lambda b: b"\r\n" not in b and b != b"."),  # a lone dot would end the message
    max_size=40,
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=lines, pieces=st.one_of(st.just(()), st.lists(st.integers(1, 700), min_size=1,
                                                             max_size=6).map(tuple)))
def test_any_lines_are_answered_and_kept_as_aiosmtpd_does(
        pair: Pair, body: list[bytes], pieces: tuple[int, ...]) -> None:
    _both(pair, b"".join(b + b"\r\n" for b in body), pieces)


# -- memory -------------------------------------------------------------------------------

# The start of both probes: a fresh process's peak memory (VmHWM), as broker serve runs.
PREAMBLE = textwrap.dedent("""
    import smtplib, tempfile, threading
    from pathlib import Path
    from broker.intake.smtp import IntakeHandler, IntakeServer, address_acceptor
    from broker.intake.spool import Spool
    from broker.memory import return_large_blocks

    return_large_blocks()  # as broker serve does

    def hwm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
""")

PROBE = PREAMBLE + textwrap.dedent("""

    size = 24 * 1024 * 1024
    # base64-like lines, 76 characters each: what an attached PDF looks like on the wire
    body = b"Subject: large\\r\\n\\r\\n" + (b"QUJD" * 19 + b"\\r\\n") * (size // 78)
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp) / "spool")
        handler = IntakeHandler(spool, address_acceptor("records.example", lambda: {"sam"}))
        server = IntakeServer(handler, "127.0.0.1", 0, data_size_limit=2 * size)
        server.start()
        got = {}
        # The client runs in this process too: what it sends is made before the baseline
        # (no line of it starts with a dot, so it needs no stuffing) and sent as it is.
        wire = body + b".\\r\\n"
        def send():
            with smtplib.SMTP("127.0.0.1", server.port, timeout=120) as c:
                c.ehlo(); c.mail("lee@clinic.example"); c.rcpt("sam@records.example")
                c.putcmd("data"); c.getreply()
                c.send(wire)
                got["reply"] = c.getreply()
        before = hwm_kb()
        t = threading.Thread(target=send)
        t.start(); t.join()
        assert got["reply"][0] == 250, got
        assert len(spool.read(spool.pending()[0].id)) == len(body)
        server.stop(); handler.close(); spool.close()
        print((hwm_kb() - before) * 1024 / len(body))
""")


def test_a_large_message_costs_the_intake_about_twice_its_size() -> None:
    """24 MB in 76-character lines over real SMTP: the intake's peak memory grows by
    about 2x the message (2.03x here), well under issue 7's 3x; aiosmtpd's own DATA took
    4.0x in the same probe."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=300)
    ratio = float(out.stdout.split()[-1])
    assert ratio < 2.6, ratio


ENDLESS = PREAMBLE + textwrap.dedent("""

    line = b"x" * (32 * 1024 * 1024)  # one line, no CRLF until its end
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp) / "spool")
        handler = IntakeHandler(spool, address_acceptor("records.example", lambda: {"sam"}))
        server = IntakeServer(handler, "127.0.0.1", 0)
        server.start()
        got = {}
        def send():
            with smtplib.SMTP("127.0.0.1", server.port, timeout=120) as c:
                c.ehlo(); c.mail("lee@clinic.example"); c.rcpt("sam@records.example")
                c.putcmd("data"); c.getreply()
                c.send(b"Subject: endless\\r\\n\\r\\n")
                c.send(line)
                c.send(b"\\r\\n.\\r\\n")
                got["reply"] = c.getreply()
                got["next"] = c.noop()
        before = hwm_kb()
        t = threading.Thread(target=send)
        t.start(); t.join()
        server.stop(); handler.close()
        print(got["reply"][0], got["next"][0], len(spool.pending()),
              (hwm_kb() - before) / 1024)
        spool.close()
""")


def test_a_line_that_never_ends_costs_the_intake_no_memory() -> None:
    """32 MB without a line end: refused (500, line too long, after the final dot), the
    session still usable, nothing stored, and the intake's peak memory barely moves
    (aiosmtpd's own DATA keeps every piece of the line: +32 MB or more)."""
    out = subprocess.run([sys.executable, "-c", ENDLESS], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=300)
    reply, after, stored, grown_mb = out.stdout.split()
    assert (int(reply), int(after), int(stored)) == (500, 250, 0)
    assert float(grown_mb) < 8, grown_mb
