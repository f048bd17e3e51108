"""Works the outbox: claims due copies, relays them, records what happened.

A claim pushes next_attempt_at forward by a lease instead of holding a lock while
talking to the relay, so a crash mid-send only delays the copy until the lease ends;
it is then sent again with the same bytes and Message-ID. On PostgreSQL several
senders claim disjoint rows with FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass

from sqlalchemy import select

from broker.audit.log import record_event
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

LEASE = dt.timedelta(minutes=10)
# Summary fields that quote the record (subject, file names): kept in the sealed delivery
# summary only, never copied into the audit (which can never be re-encrypted).
SEALED_ONLY = frozenset({"subject", "attachments", "attachments_detail"})
BROKER_ACTOR = "broker"


@dataclass(frozen=True)
class Claimed:
    id: int
    recipient: str
    content_ref: str
    attempts: int
    created_at: dt.datetime


class OutboxSender:
    """`idle_close`: seconds without anything to send after which the relay connection
    (kept open across rounds) is closed; the next copy opens a new one."""

    def __init__(self, rt: Runtime, batch: int = 50, idle_close: float = 60.0) -> None:
        self.rt = rt
        self.batch = batch
        self.notifier = make_notifier(rt)
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
        with self.rt.db.session() as s:
            rows = s.scalars(
                select(Delivery)
                .where(Delivery.state == "queued", Delivery.next_attempt_at <= now)
                .order_by(Delivery.id)
                .limit(self.batch)
                .with_for_update(skip_locked=True)
            ).all()
            claimed = []
            for row in rows:
                row.next_attempt_at = now + LEASE
                row.attempts += 1
                claimed.append(
                    Claimed(row.id, row.recipient, row.content_ref, row.attempts, row.created_at)
                )
        return claimed

    def run_once(self) -> int:
        """Sends what is due; returns how many copies were handled."""
        claimed = self.claim()
        if not claimed:
            if (self._relay is not None and self._relay.connected
                    and time.monotonic() - self._last_round > self.idle_close):
                self.close()
            return 0
        domain = self.rt.settings.domain
        relay = self.relay
        down: RelayUnavailable | None = None
        try:
            for item in claimed:
                if down is not None:
                    # No session could be opened: the rest of the batch waits too,
                    # without another attempt (a wrong password is tried once a round).
                    self._temporary(item, str(down), keep=isinstance(down, RelayMisconfigured))
                    continue
                try:
                    data = self.rt.content.get(item.content_ref)
                    relay.send(bounce_address(item.id, domain), item.recipient, data)
                except RelayUnavailable as exc:
                    down = exc
                    if isinstance(exc, RelayMisconfigured):
                        log.error("relay: %s (outbound copies stay queued)", exc)
                    else:
                        log.warning("relay: %s", exc)
                    self._temporary(item, str(exc), keep=isinstance(exc, RelayMisconfigured))
                except TemporaryFailure as exc:
                    self._temporary(item, str(exc))
                except PermanentFailure as exc:
                    self._permanent(item, str(exc))
                else:
                    self._sent(item)
        except BaseException:
            relay.drop()  # a half-done exchange is never reused
            raise
        finally:
            self._last_round = time.monotonic()
        return len(claimed)

    # -- outcomes ---------------------------------------------------------------------

    def _sent(self, item: Claimed) -> None:
        with self.rt.db.session() as s:
            # Locked: a revocation cancelling this copy right now is either seen here
            # (the copy left anyway) or sees it sent.
            row = s.get(Delivery, item.id, with_for_update=True)
            assert row is not None
            if row.state == "sent":
                return
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
                settle(s, self.rt, self.notifier, record)
        log.info("delivery %s sent", item.id)

    def _temporary(self, item: Claimed, error: str, keep: bool = False) -> None:
        """Retry later. `keep`: the relay is misconfigured (the operator's problem, not
        the recipient's), so the copy is never given up for it."""
        schedule = self.rt.settings.retry_schedule
        delay = schedule[min(item.attempts - 1, len(schedule) - 1)]
        now = utcnow()
        give_up = not keep and (
            (now - item.created_at).total_seconds() >= self.rt.settings.give_up_after)
        if give_up:
            self._permanent(item, f"gave up after {item.attempts} attempts: {error}")
            return
        with self.rt.db.session() as s:
            row = s.get(Delivery, item.id)
            assert row is not None
            row.next_attempt_at = now + dt.timedelta(seconds=delay)
            row.last_error = error[:500]
        log.warning("delivery %s: temporary failure, retry in %ss", item.id, int(delay))

    def _permanent(self, item: Claimed, error: str) -> None:
        with self.rt.db.session() as s:
            row = s.get(Delivery, item.id, with_for_update=True)
            assert row is not None
            if row.state == "cancelled":  # revoked meanwhile: nothing left, nothing to redo
                row.last_error = error[:500]
                return
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
                settle(s, self.rt, self.notifier, record)
        log.warning("delivery %s failed permanently", item.id)
