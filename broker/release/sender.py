"""Works the outbox: claims due copies, relays them, records what happened.

A claim pushes next_attempt_at forward by a lease ([outbox] claim_lease) instead of
holding a lock while talking to the relay, so a crash mid-send only delays the copy
until the lease ends; it is then sent again with the same bytes and Message-ID. On
PostgreSQL several senders claim disjoint rows with FOR UPDATE SKIP LOCKED.

Released copies to one recipient leave in the order they were queued (the order of
the decisions): such a copy is not claimed while an older one to the same address
waits for a retry or is in another sender's hands, and when one is deferred the
younger ones to that address in the same round wait behind it. Review requests and
notices are not held back that way (each stands alone). A relay that was down therefore
gets each recipient's backlog in order, whatever each copy's own backoff says.

A copy queued with ``sign_on_send`` (everything the broker queues that is not encrypted)
is signed here with the broker's key, outside any transaction, and its signed bytes replace
its content and sha256 with its "sent" outcome. A retry (after a refusal, or a crash after
the relay took it) signs it again, to the same bytes: the signature's time is the copy's
queueing time and Ed25519 signatures are deterministic.

What happened to a round's copies is written in one transaction at the end of the
round (sooner when the round runs long): one commit (one fsync, one turn at SQLite's
write lock beside a busy pipeline) instead of one per copy. A crash before that write
only means those copies are sent again, with the same bytes and Message-ID.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, selectinload

from broker.audit.log import record_event
from broker.crypto import pgpmime
from broker.db.models import Delivery, Person, Record, utcnow
from broker.mail.compose import bounce_address
from broker.policy.context import record_audience
from broker.release.relay import (
    PermanentFailure,
    RelayClient,
    RelayMisconfigured,
    RelayUnavailable,
    TemporaryFailure,
)
from broker.release.settle import make_notifier, settle
from broker.review import render
from broker.runtime import Runtime

log = logging.getLogger(__name__)

# Summary fields that quote the record (subject, file names): kept in the sealed delivery
# summary only, never copied into the audit (which can never be re-encrypted).
SEALED_ONLY = frozenset({"subject", "attachments", "attachments_detail"})
BROKER_ACTOR = "broker"
# Seconds of sending after which the outcomes so far are written without waiting for
# the end of the round (a crash then resends at most this much). Short: a broker that
# crashes again and again (a crash loop) must still make progress through its queue.
RECORD_EVERY = 0.25


@dataclass(frozen=True)
class Claimed:
    id: int
    recipient: str
    content_ref: str
    attempts: int
    created_at: dt.datetime
    record_id: int | None = None
    kind: str = "release"
    sign_on_send: bool = False
    signed: bytes | None = None  # the bytes to send, when they were signed this round


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed copy: sent, temporary, permanent, or deferred (not
    tried: an older copy to the same recipient could not be sent, or the round ran
    too long)."""

    item: Claimed
    kind: str
    error: str = ""
    keep: bool = False


def pick_in_order(queued: list[tuple[int, str, dt.datetime, str]], now: dt.datetime,
                  limit: int) -> list[int]:
    """Ids of the due copies that may go now, oldest first. Released copies to one
    recipient keep their order: only those older than its oldest release copy that is
    not due (waiting for a retry, or leased) may go. Review requests and notices each
    stand alone: one held by a crashed sender's lease must not hold up the family's
    other review requests for the length of that lease."""
    blocked: set[str] = set()
    picked: list[int] = []
    for delivery_id, recipient, next_attempt_at, kind in sorted(queued):
        ordered = kind == "release"
        if ordered and recipient in blocked:
            continue
        if next_attempt_at > now:
            if ordered:
                blocked.add(recipient)
            continue
        picked.append(delivery_id)
        if len(picked) >= limit:
            break
    return picked


class OutboxSender:
    """`idle_close`: seconds without anything to send after which the relay connection
    (kept open across rounds) is closed; the next copy opens a new one."""

    def __init__(self, rt: Runtime, batch: int = 50, idle_close: float = 60.0) -> None:
        self.rt = rt
        self.batch = batch
        self.notifier = make_notifier(rt)
        self.signer = self.notifier.signer
        self.idle_close = idle_close
        self._relay: RelayClient | None = None
        self._last_round = 0.0

    @property
    def relay(self) -> RelayClient:
        """The one relay client, kept (with its connection) from round to round."""
        if self._relay is None:
            self._relay = RelayClient(self.rt.settings.relay,
                                      local_hostname=self.rt.settings.domain)
        return self._relay

    def close(self) -> None:
        """Says QUIT to the relay, if connected. The sender stays usable."""
        if self._relay is not None:
            self._relay.close()

    def claim(self) -> list[Claimed]:
        now = utcnow()
        lease = dt.timedelta(seconds=self.rt.settings.claim_lease)
        with self.rt.db.session() as s:
            # Every queued copy's address and due time (small columns): the per-recipient
            # order is worked out from these, then the chosen rows are locked.
            queued = [(i, r, at, k) for i, r, at, k in s.execute(
                select(Delivery.id, Delivery.recipient, Delivery.next_attempt_at,
                       Delivery.kind)
                .where(Delivery.state == "queued")).all()]
            wanted = pick_in_order(queued, now, self.batch)
            if not wanted:
                return []
            rows = s.scalars(
                select(Delivery)
                .where(Delivery.id.in_(wanted), Delivery.state == "queued",
                       Delivery.next_attempt_at <= now)
                .order_by(Delivery.id)
                .with_for_update(skip_locked=True)
            ).all()
            # A row skipped (another sender has it, or it changed meanwhile) holds back
            # the younger copies to its recipient, as a leased one would.
            got = {row.id for row in rows}
            held_from: dict[str, int] = {}
            for delivery_id, recipient, _, kind in sorted(queued):
                if delivery_id in wanted and delivery_id not in got and kind == "release":
                    held_from.setdefault(recipient, delivery_id)
            claimed = []
            for row in rows:
                if row.id > held_from.get(row.recipient, row.id):
                    continue
                row.next_attempt_at = now + lease
                row.attempts += 1
                claimed.append(
                    Claimed(row.id, row.recipient, row.content_ref, row.attempts, row.created_at,
                            row.record_id, row.kind, row.sign_on_send)
                )
        return claimed

    def _signed(self, item: Claimed, composed: bytes) -> Claimed | None:
        """The copy carrying its signed bytes (``signed``), or None when it cannot be
        signed. Made just before the copy is sent, so the first copy of a round leaves
        without waiting for the others' signatures. No transaction: the signed bytes are
        kept with the copy's "sent" outcome. Until then nothing of them is stored, and none
        is needed: the signature's time is the copy's queueing time and the broker's
        Ed25519 signatures are deterministic, so signing again for a retry (after a
        refusal, or a crash after the relay took the copy) gives the same bytes."""
        if self.signer is None:
            # The key is gone since this was queued: it goes as composed, like all mail of
            # a home without a key (broker.crypto.outbound.protect).
            return dataclasses.replace(item, signed=composed)
        try:
            signed = pgpmime.sign_bytes(composed, self.signer, created=item.created_at)
        except pgpmime.PGPError as exc:
            log.error("outbox: copy %s could not be signed (%s); it stays queued",
                      item.id, type(exc).__name__)
            return None
        return dataclasses.replace(item, signed=signed)

    def run_once(self) -> int:
        """Sends what is due; returns how many copies were handled."""
        claimed = self.claim()
        if not claimed:
            if (self._relay is not None and self._relay.connected
                    and time.monotonic() - self._last_round > self.idle_close):
                self.close()
            return 0
        domain = self.rt.settings.domain
        # The copies queued as composed, read in one query; each is signed as its turn comes.
        composed = self.rt.content.get_many([c.content_ref for c in claimed if c.sign_on_send])
        relay = self.relay
        down: RelayUnavailable | None = None
        held: set[str] = set()  # recipients whose older copy could not go this round
        outcomes: list[Outcome] = []
        written = started = time.monotonic()
        # Past half the lease, the rest of the round is handed back untried: a copy
        # still in hand when its lease ends could be claimed by another sender too.
        hand_back = self.rt.settings.claim_lease / 2
        try:
            for item in claimed:
                if time.monotonic() - started > hand_back:
                    outcomes.append(Outcome(item, "deferred"))
                    continue
                if down is not None:
                    # No session could be opened: the rest of the batch waits too,
                    # without another attempt (a wrong password is tried once a round).
                    # The younger copies to one address wait behind the oldest anyway.
                    outcomes.append(Outcome(item, "temporary", str(down),
                                            keep=isinstance(down, RelayMisconfigured)))
                    continue
                if item.kind == "release" and item.recipient in held:
                    outcomes.append(Outcome(item, "deferred"))
                    continue
                if item.sign_on_send:
                    signed = self._signed(item, composed.get(item.content_ref)
                                          or self.rt.content.get(item.content_ref))
                    if signed is None:
                        # The operator's problem (an expired or damaged key), not the
                        # recipient's: kept queued, never given up for it.
                        outcomes.append(Outcome(item, "temporary", "signing failed",
                                                keep=True))
                        if item.kind == "release":
                            held.add(item.recipient)
                        continue
                    item = signed
                try:
                    data = (item.signed if item.signed is not None
                            else self.rt.content.get(item.content_ref))
                    relay.send(bounce_address(item.id, domain), item.recipient, data)
                except RelayUnavailable as exc:
                    down = exc
                    if isinstance(exc, RelayMisconfigured):
                        log.error("relay: %s (outbound copies stay queued)", exc)
                    else:
                        log.warning("relay: %s", exc)
                    outcomes.append(Outcome(item, "temporary", str(exc),
                                            keep=isinstance(exc, RelayMisconfigured)))
                except TemporaryFailure as exc:
                    outcomes.append(Outcome(item, "temporary", str(exc)))
                    if item.kind == "release":
                        held.add(item.recipient)
                except PermanentFailure as exc:
                    outcomes.append(Outcome(item, "permanent", str(exc)))
                else:
                    outcomes.append(Outcome(item, "sent"))
                if time.monotonic() - written > RECORD_EVERY:
                    self._record(outcomes)
                    outcomes, written = [], time.monotonic()
        except BaseException:
            relay.drop()  # a half-done exchange is never reused
            raise
        finally:
            self._last_round = time.monotonic()
            # What did happen is written even when the round broke off.
            self._record(outcomes)
        return len(claimed)

    def _record(self, outcomes: list[Outcome]) -> None:
        """Writes a round's outcomes in one transaction, records in id order (so two
        senders settling records lock them in the same order); if that transaction
        fails (a deadlock, a lost connection), each outcome is tried on its own."""
        if not outcomes:
            return
        ordered = sorted(outcomes, key=lambda o: (o.item.record_id or 0, o.item.id))
        try:
            self._write(ordered)
        except OperationalError:
            if len(ordered) == 1:
                raise
            log.warning("outbox: writing %d outcomes at once failed; one by one",
                        len(ordered))
            for o in ordered:
                self._write([o])
        for o in outcomes:
            if o.kind == "sent":
                log.info("delivery %s sent", o.item.id)

    def _write(self, outcomes: list[Outcome]) -> None:
        with self.rt.db.session() as s:
            # The copies sent or failed for good, locked in one statement (id order, as
            # every sender locks them), and their records with their children: one query
            # each instead of one per copy.
            final = [o.item.id for o in outcomes if o.kind in ("sent", "permanent")]
            locked = {row.id: row for row in s.scalars(
                select(Delivery).where(Delivery.id.in_(final)).order_by(Delivery.id)
                .with_for_update())} if final else {}
            records = {o.item.record_id for o in outcomes if o.item.record_id is not None}
            if records:
                s.scalars(select(Record).where(Record.id.in_(records))
                          .options(selectinload(Record.child))).all()
            ended: dict[int, Record] = {}  # records with a release copy sent or failed
            for o in outcomes:
                record: Record | None = None
                if o.kind == "sent":
                    record = self._mark_sent(s, o.item, locked[o.item.id])
                elif o.kind == "temporary":
                    record = self._mark_temporary(s, o.item, o.error, o.keep)
                elif o.kind == "permanent":
                    record = self._mark_permanent(s, o.item, o.error)
                else:
                    self._mark_deferred(s, o.item)
                if record is not None:
                    ended[record.id] = record
            # Each record settled once, after all its copies of this round (in id order,
            # as the outcomes were written): not once per copy, each a locked read.
            for record_id in sorted(ended):
                settle(s, self.rt, self.notifier, ended[record_id])

    # -- outcomes ---------------------------------------------------------------------

    def _mark_sent(self, s: Session, item: Claimed, row: Delivery) -> Record | None:
        """Returns the record to settle, if this was one of its release copies."""
        # ``row`` is locked: a revocation cancelling this copy right now is either seen
        # here (the copy left anyway) or sees it sent.
        if item.signed is not None and row.sign_on_send:
            # What left is what the copy holds from now on, and what its hash names.
            row.content_ref = self.rt.content.put(item.signed, s)
            row.sha256 = hashlib.sha256(item.signed).hexdigest()
            row.sign_on_send = False
        if row.state == "sent":
            return None
        # Cancelled (its consent revoked) while it was already with the relay: it went
        # out all the same, so the record says so.
        after_revocation = row.state == "cancelled"
        row.state = "sent"
        row.sent_at = utcnow()
        row.last_error = ""
        if row.kind == "release" and row.record_id is not None:
            record = s.get(Record, row.record_id)
            assert record is not None
            summary = json.loads(row.summary or "{}")
            record_event(
                s, action="delivered", actor=BROKER_ACTOR, actor_role="broker",
                child=record.child.slug, record_id=record.id, recipients=[row.recipient],
                # Subject and attachment names stay in the sealed delivery summary
                # (the audit can never be re-encrypted); `broker audit` joins to it.
                description={"record": record.id, "delivery": row.id,
                             "message_id": row.message_id, "sha256": row.sha256,
                             **{k: v for k, v in summary.items()
                                if k not in SEALED_ONLY},
                             **({"after_revocation": True} if after_revocation else {})},
            )
            return record
        return None

    def _mark_deferred(self, s: Session, item: Claimed) -> None:
        """Not tried (an older copy to the same recipient failed this round, or the round
        ran long): due again at once, behind any older copy still waiting (see
        pick_in_order), and the claim's attempt is not counted."""
        row = s.get(Delivery, item.id)
        assert row is not None
        if row.state == "queued":
            row.next_attempt_at = utcnow()
            row.attempts = max(0, row.attempts - 1)

    def _mark_temporary(self, s: Session, item: Claimed, error: str,
                        keep: bool = False) -> Record | None:
        """Retry later. `keep`: the relay is misconfigured (the operator's problem, not
        the recipient's), so the copy is never given up for it. Returns the record to
        settle when the copy is given up instead."""
        schedule = self.rt.settings.retry_schedule
        delay = schedule[min(item.attempts - 1, len(schedule) - 1)]
        now = utcnow()
        give_up = not keep and (
            (now - item.created_at).total_seconds() >= self.rt.settings.give_up_after)
        if give_up:
            return self._mark_permanent(s, item,
                                        f"gave up after {item.attempts} attempts: {error}")
        row = s.get(Delivery, item.id)
        assert row is not None
        row.next_attempt_at = now + dt.timedelta(seconds=delay)
        row.last_error = error[:500]
        log.warning("delivery %s: temporary failure, retry in %ss", item.id, int(delay))
        return None

    def _mark_permanent(self, s: Session, item: Claimed, error: str) -> Record | None:
        """Returns the record to settle, if this was one of its release copies."""
        row = s.get(Delivery, item.id, with_for_update=True)
        assert row is not None
        if row.state == "cancelled":  # revoked meanwhile: nothing left, nothing to redo
            row.last_error = error[:500]
            return None
        row.state = "failed"
        row.last_error = error[:500]
        if row.kind == "release" and row.record_id is not None:
            record = s.get(Record, row.record_id)
            assert record is not None
            record_event(
                s, action="delivery_failed", actor=BROKER_ACTOR, actor_role="broker",
                child=record.child.slug, record_id=record.id, recipients=[row.recipient],
                description={"record": record.id, "delivery": row.id, "error": error[:300]},
            )
            person = s.get(Person, row.person_id) if row.person_id else None
            for g in record_audience(s, self.rt.rules, record):
                self.notifier.notice(
                    s, record.child, g, "release_failed",
                    render.render_release_failed(
                        child_name=record.child.name, record_id=record.id,
                        subject=record.subject,
                        recipient=render.Person(person.name if person else "",
                                                row.recipient),
                        reason=error[:300], failed_at=utcnow(),
                    ),
                    subject=record.subject, record=record,
                )
            log.warning("delivery %s failed permanently", item.id)
            return record
        log.warning("delivery %s failed permanently", item.id)
        return None
