"""Fault: the relay is away for a stretch (first nothing listens, then a server that
answers every connection with 421), while the parent approves records one after
another; then a real relay comes back on the same port.

Every queued copy is delivered exactly once, and each recipient receives its copies
in the order the records were approved, although each copy has its own backoff (an
early copy has failed more often, so waits longer, than one approved just before the
relay came back). The retry schedule is configuration ([outbox] retry_schedule):
fractions of a second here, minutes to hours in the template.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from broker.db.models import AuditEvent, Delivery, Record
from tests.harness import DOMAIN, GUARDIAN, SCHOOL, World, reply_to, report

RECORDS = 6
# The relay's stretch away: this long refusing connections, then this long answering 421.
REFUSED_FOR, BUSY_FOR = 2.0, 2.0


class Busy:
    """A server on the relay's port that greets every connection with 421 and hangs up,
    as a relay shutting down or overloaded does."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the stretch is over
            self.connections += 1
            with conn:
                conn.sendall(b"421 4.3.2 Service not available, closing channel\r\n")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url,
              retry_schedule=(0.2, 0.4, 0.8, 1.6, 3.2)).start()
    yield w
    w.stop()


def test_relay_away_for_a_stretch_then_every_copy_once_in_approval_order(
        world: World) -> None:
    for i in range(RECORDS):
        world.send(report(subject=f"OT progress report {i}"), "lee@clinic.example",
                   f"sam@{DOMAIN}")
    reviews = world.wait_for(lambda m: m.rcpt_tos == [GUARDIAN]
                             and "Review needed" in str(m.msg["Subject"]), count=RECORDS)
    # Approved in an order of the parent's own, not the order the records came in.
    order = [3, 0, 5, 1, 4, 2]
    by_subject = {str(m.msg["Subject"]).rsplit(" ", 1)[-1]: m for m in reviews}

    world.relay.stop()  # nothing listens on the relay's port: connections are refused
    began = time.monotonic()
    busy: Busy | None = None
    step = (REFUSED_FOR + BUSY_FOR) / RECORDS
    for n, i in enumerate(order):
        time.sleep(max(0.0, began + n * step - time.monotonic()))
        if busy is None and time.monotonic() - began >= REFUSED_FOR:
            busy = Busy(world.relay_port)
        review = by_subject[str(i)]
        world.send(reply_to(review, "APPROVE"), GUARDIAN, str(review.msg["Reply-To"]))
    time.sleep(max(0.0, began + REFUSED_FOR + BUSY_FOR - time.monotonic()))
    if busy is None:
        busy = Busy(world.relay_port)
    assert world.all_to(SCHOOL) == []  # nothing got through while the relay was away
    busy.close()
    assert busy.connections > 0, "the 421 stretch was never tried"
    world.relay = Controller(world.sink, hostname="127.0.0.1", port=world.relay_port)
    world.relay.start()
    back = time.monotonic()

    world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=RECORDS * len(SCHOOL),
                   timeout=20)
    for record in world.records():
        world.wait_state("released", record.id)
    waited = time.monotonic() - back
    world.settle(1.5)  # a copy sent twice would arrive now

    with world.db.session() as s:
        copies = {d.message_id: (d.record_id, d.recipient, d.attempts, d.last_error)
                  for d in s.scalars(select(Delivery).where(Delivery.kind == "release"))}
        approved = [rid for rid in s.scalars(
            select(AuditEvent.record_id).where(AuditEvent.action == "approved")
            .order_by(AuditEvent.seq))]
        subjects = {r.id: r.subject for r in s.scalars(select(Record))}
    assert [subjects[rid].rsplit(" ", 1)[-1] for rid in approved] == [str(i) for i in order]

    # Every message the relay took, once per recipient: nothing went twice.
    with world.sink.lock:
        got = list(world.sink.messages)
    twice = [k for k, n in Counter((m.rcpt_tos[0], str(m.msg["Message-ID"]))
                                   for m in got).items() if n > 1]
    assert twice == []

    # Every release copy arrived, and each school member got them in approval order.
    arrived: dict[str, list[int]] = defaultdict(list)
    for m in got:
        mid = str(m.msg["Message-ID"])
        if mid in copies:
            record_id, recipient, _, _ = copies[mid]
            assert m.rcpt_tos == [recipient]
            arrived[recipient].append(record_id)
    assert len(copies) == RECORDS * len(SCHOOL)
    for member in SCHOOL:
        assert arrived[member] == approved, (member, arrived[member], approved)

    # The relay really was away: the first copies were tried and refused several times,
    # and the refusal is on record for the operator.
    first = [c for c in copies.values() if c[0] == approved[0]]
    assert all(attempts >= 3 for _, _, attempts, _ in first), first
    print(f"\nall {len(copies)} copies delivered {waited:.1f}s after the relay came back")
