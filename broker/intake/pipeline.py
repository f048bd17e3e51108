"""The intake pipeline: from a spooled message to a held record, a decision, or a
quarantine - one database transaction per message, off the SMTP event loop.

The spool file is removed only after the transaction that took the message in has
committed, and a message already taken in (same spool id) is skipped, so a crash at
any point neither loses a message nor processes it twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import email
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import parseaddr

from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from broker.audit.log import record_event
from broker.consents.manage import active_for_child
from broker.content.codec import document_to_bytes, draft_from_bytes, draft_to_bytes
from broker.crypto.keys import broker_private_key
from broker.crypto.outbound import withheld
from broker.db.models import Child, Consent, Inbound, Person, Record, utcnow
from broker.intake.pgpin import open_record, open_reply
from broker.intake.smtp import header_block
from broker.intake.spool import Envelope, SpoolCorrupt, SpoolEntry
from broker.mail import compose as mc
from broker.mail.autoreply import classify_automatic
from broker.mail.document import Document, Draft
from broker.mail.headers import INBOUND
from broker.mail.parse import LimitExceeded, MimeLimits, ParseFailed, parse_message
from broker.policy.authority import Authority
from broker.policy.context import (
    active_people,
    audience,
    authority_for,
    member,
    team_members,
)
from broker.policy.evaluate import evaluate
from broker.policy.recipients import hold_reasons
from broker.records import states
from broker.records.transitions import transition
from broker.redact.text import apply_draft
from broker.release.approve import release
from broker.release.bounces import handle_bounce
from broker.review import render, tokens
from broker.review.notify import Notifier, guardians
from broker.review.replies import handle_reply
from broker.runtime import Runtime

log = logging.getLogger(__name__)


# How long the REVOKE link in the FYI copy of an automatic release keeps working.
FYI_TOKEN_LIFETIME = dt.timedelta(days=90)
# Spooled messages taken in per database transaction: fewer commits, but on SQLite
# every other writer (the outbox sending review requests) waits for a whole batch.
BATCH = 5
# How often the spool directory is listed in full when no announcement arrives.
RESCAN_SECONDS = 2.0
# How often the pipeline looks for the files it waits for (see journal_wait).
JOURNAL_POLL = 0.002
# Messages above this size are "large": the service takes them in on a thread of their
# own (small records must not wait seconds behind one), and their slow part - storing
# the raw bytes and parsing the whole MIME tree - runs before the database transaction,
# so the write lock that the small ones need is held only for the database work.
LARGE = 1024 * 1024


@dataclasses.dataclass
class Prepared:
    """What a large message's transaction can use without redoing it: the reference of
    its stored raw bytes and its parsed document (or why it could not be parsed)."""

    raw_ref: str
    doc: Document | None = None
    error: Exception | None = None


class Pipeline:
    """``sizes``: which messages this pipeline takes (``"small"``, ``"large"`` or ``"all"``,
    split at :data:`LARGE` bytes); two pipelines of one service split the spool this way."""

    def __init__(self, rt: Runtime, sizes: str = "all", journal_wait: float = 0.0) -> None:
        if sizes not in ("all", "small", "large"):
            raise ValueError(f"sizes must be all, small or large, not {sizes!r}")
        self.rt = rt
        self.sizes = sizes
        # Seconds an announced message still in the journal may take to become a file
        # (made by another process) before this pipeline makes it itself.
        self.journal_wait = journal_wait
        # Large messages one per transaction: a batch is read into memory whole, and five
        # 25 MB messages (with their parsed documents) at once would need five times the
        # memory of one.
        self.batch = 1 if sizes == "large" else BATCH
        self._prepared: dict[str, Prepared] = {}
        self._ids: deque[str] = deque()
        self._last_scan = float("-inf")  # the first round lists the spool
        self._backlog = False
        # Called after each batch commits (the service wakes the outbox with it).
        self.on_commit: Callable[[], None] | None = None
        self.notifier = Notifier(rt.content, rt.settings.domain,
                                 signer=broker_private_key(rt.settings.home),
                                 per_day=rt.settings.limits.notices_per_address_per_day)
        limits = rt.settings.limits
        self.mime_limits = MimeLimits(max_depth=limits.max_mime_depth,
                                      max_parts=limits.max_mime_parts,
                                      max_attachments=limits.max_attachments)

    def notify(self, spool_id: str) -> None:
        """The intake stored this message (thread-safe)."""
        self._ids.append(spool_id)

    def run_once(self, limit: int = 100) -> int:
        """Work the ids the intake announced; list the whole spool directory only at
        start, when the announcements may have missed something (every few seconds),
        or while a backlog lasts. Listing a directory of thousands of files on every
        round would slow the intake's own file creation in it."""
        if len(self._ids) > limit:
            self._backlog = True
        if self._backlog or (not self._ids
                             and time.monotonic() - self._last_scan >= RESCAN_SECONDS):
            # A backlog (or a look for what the announcements missed): list the spool,
            # which holds every announced message too, and take the family's decisions
            # and bounces before records - a parent's APPROVE must not wait behind
            # thousands of reports (a review token exists only once its record does).
            self._ids.clear()
            entries = self.rt.spool.pending(limit, first=self._is_answer, keep=self.takes)
            self._last_scan = time.monotonic()
            self._backlog = len(entries) >= limit
        elif self._ids:
            ids = [self._ids.popleft() for _ in range(min(limit, len(self._ids)))]
            entries = [e for e in self._entries(ids) if self.takes(e.envelope)]
        else:
            return 0
        for i in range(0, len(entries), self.batch):
            self.process_batch(entries[i:i + self.batch])
        return len(entries)

    def _entries(self, ids: list[str]) -> list[SpoolEntry]:
        """The announced messages. The journal holds only small mail, so the large
        pipeline passes over what is still there. Where another process turns the
        journal's records into files (``journal_wait``), the small one waits that long for
        its files before it makes them itself."""
        spool = self.rt.spool
        if self.sizes == "large":
            return [e for i in ids if (e := spool.entry(i, materialise=False)) is not None]
        found = {i: spool.entry(i, materialise=False) for i in ids}
        deadline = time.monotonic() + self.journal_wait
        while any(e is None for e in found.values()) and time.monotonic() < deadline:
            time.sleep(JOURNAL_POLL)
            found.update({i: spool.entry(i, materialise=False)
                          for i, e in found.items() if e is None})
        return [e for i in ids if (e := found[i] or spool.entry(i)) is not None]

    def takes(self, envelope: Envelope) -> bool:
        """Whether this pipeline takes the message in (see ``sizes``)."""
        if self.sizes == "all":
            return True
        return (envelope.size > LARGE) == (self.sizes == "large")

    def _is_answer(self, envelope: Envelope) -> bool:
        """Mail to a review+TOKEN or bounces+ID address: a decision or a bounce."""
        domain = self.rt.settings.domain
        return any(mc.token_from_address(r.lower(), domain)
                   or mc.delivery_id_from_bounce_address(r.lower(), domain)
                   for r in envelope.rcpt_tos)

    def process(self, entry: SpoolEntry) -> None:
        self.process_batch([entry])

    def process_batch(self, entries: list[SpoolEntry]) -> None:
        """Take several spooled messages in with one commit (one flush of the database
        instead of one per message). Each message runs in its own savepoint, so one
        that fails is kept as a failed inbound row without undoing the others; the
        spool files go only after the commit."""
        readable: list[tuple[SpoolEntry, bytes]] = []
        prepared: dict[str, Prepared] = {}
        for entry in entries:
            try:
                raw = self.rt.spool.read(entry.id)
                if len(raw) > LARGE:
                    ready = self._store_large(raw)
                    # Not held while the parser makes its own copy (some 2.6x the
                    # message): read again, whole, for the transaction after, into one
                    # buffer (the sealed and the open bytes are never both held).
                    del raw
                    if ready is not None:
                        self._parse_large(entry, ready)
                        prepared[entry.id] = ready
                    raw = self.rt.spool.read_buffer(entry.id)
                readable.append((entry, raw))
            except FileNotFoundError:
                continue  # another pipeline took it in (and removed it) meanwhile
            except SpoolCorrupt:
                self._set_aside(entry)
        if not readable:
            return
        self._prepared = prepared
        try:
            self._take_in_batch(readable)
        finally:
            self._prepared = {}

    def _store_large(self, raw: bytes) -> Prepared | None:
        """The slow, database-free part of taking a large message in, done before the
        transaction: the raw bytes stored (content-addressed, so storing them again in
        the transaction finds them there)."""
        try:
            return Prepared(raw_ref=self.rt.content.put(raw))
        except OSError:
            return None  # (a full disk) the transaction stores it, or fails, as before

    def _parse_large(self, entry: SpoolEntry, prepared: Prepared) -> None:
        """For mail to a child's address, the parsed document, before the transaction.
        Parsing a message that turns out not to be a record is wasted work, never wrong:
        only a record's path uses the document.

        The parser reads the sealed spool file a piece at a time as it is decrypted:
        neither a whole plaintext copy nor a memory-backed file is held beside the
        parser's own. Should the file fail its checks after the last piece, nothing
        parsed is kept: the transaction reads the file again and sets it aside."""
        if self._is_answer(entry.envelope):
            return
        try:
            doc = parse_message(lambda: self.rt.spool.read_pieces(entry.id),
                                self.mime_limits)
        except (SpoolCorrupt, OSError):
            return  # the read for the transaction finds the same and says so
        except Exception as exc:  # raised again where the transaction parses
            prepared.error = exc
            return
        # Attachments too large for the database stored now, as the transaction would
        # store them (files, content-addressed like the raw bytes, so the transaction
        # finds them there): not in the transaction, beside the whole message, where a
        # sealed copy of a 20 MB PDF made the peak.
        with contextlib.suppress(OSError):  # (a full disk) the transaction tries again
            for attachment in doc.attachments:
                self.rt.content.put_ahead(attachment.data)
        prepared.doc = doc

    def _take_in_batch(self, readable: list[tuple[SpoolEntry, bytes]]) -> None:
        # Another pipeline's message stays in the spool: its transaction may yet roll back.
        others: set[str] = set()
        try:
            try:
                self._take_in_transaction(readable, others, isolate=False)
            except OperationalError:
                raise
            except Exception as exc:
                # A message tripped over a bug, and the whole transaction went back. Again,
                # each message in a savepoint of its own: that one is kept as a failed
                # inbound row without undoing the others. (Savepoints for every batch cost
                # two statements and a flush per message, for what almost never happens.)
                log.warning("a batch of %d failed (%s); taking it in message by message",
                            len(readable), type(exc).__name__)
                others.clear()
                self._take_in_transaction(readable, others, isolate=True)
        except OperationalError:
            # The database is away: everything stays spooled for the next round.
            log.warning("database unavailable; %d message(s) stay spooled", len(readable))
            raise
        for entry, _ in readable:
            if entry.id not in others:
                self.rt.spool.remove(entry.id)
        if self.on_commit is not None:
            self.on_commit()  # review requests are queued: the outbox need not wait

    def _take_in_transaction(self, readable: list[tuple[SpoolEntry, bytes]],
                             others: set[str], *, isolate: bool) -> None:
        """One transaction for the batch; ``isolate``: each message in its own savepoint,
        one that fails kept as a failed inbound row (its exception otherwise escapes)."""
        with self.rt.db.session() as s:
            mine: list[tuple[SpoolEntry, bytes]] = []
            for entry, raw in readable:
                if _claim(s, entry.id, entry.envelope.sha256):
                    mine.append((entry, raw))
                else:
                    others.add(entry.id)
            # Taken in already (a crash after the commit, before the spool file went):
            # one look for the whole batch, after the claims (see _claim).
            done = set(s.scalars(select(Inbound.spool_id).where(
                Inbound.spool_id.in_([entry.id for entry, _ in mine])))) if mine else set()
            for entry, raw in mine:
                if entry.id in done:
                    continue
                done.add(entry.id)  # (announced twice, it is in the batch twice)
                if not isolate:
                    self._take_in(s, entry, raw)
                    continue
                try:
                    with s.begin_nested():
                        self._take_in(s, entry, raw)
                except OperationalError:
                    raise
                except Exception as exc:
                    # A bug must neither lose the message nor spin on it: keep it, with
                    # its bytes, as a failed inbound row for the operator. The type only
                    # in the log: an exception's text may quote the mail.
                    log.error("message %s could not be processed: %s", entry.id,
                              type(exc).__name__)
                    with s.begin_nested():
                        self._keep_failed(s, entry, raw, exc)

    def _set_aside(self, entry: SpoolEntry) -> None:
        """The bytes on disk no longer match what was acknowledged: keep them aside for
        the operator rather than act on damaged content or retry forever."""
        log.error("spool message %s is damaged; set aside", entry.id)
        self.rt.spool.set_aside(entry.id)
        with self.rt.db.session() as s:
            record_event(s, action="intake_failed", actor="broker", actor_role="broker",
                         description={"spool_id": entry.id, "error": "spool damaged",
                                      "sha256": entry.envelope.sha256})

    def _keep_failed(self, s: Session, entry: SpoolEntry, raw: bytes, exc: Exception) -> None:
        inbound = self._inbound(s, entry, raw, kind="failed")
        inbound.outcome = f"internal error: {type(exc).__name__}; kept for the operator"
        record_event(s, action="intake_failed", actor="broker", actor_role="broker",
                     description={"inbound": inbound.id, "error": type(exc).__name__,
                                  "sha256": inbound.sha256})

    def _inbound(self, s: Session, entry: SpoolEntry, raw: bytes, kind: str, *,
                 flush: bool = True) -> Inbound:
        """The message's inbound row, flushed (its id named in the audit) unless ``flush``
        is false: a record's row goes with the record's own flush."""
        env = entry.envelope
        inbound = Inbound(
            spool_id=entry.id,
            received_at=dt.datetime.fromisoformat(env.received_at),
            mail_from=env.mail_from,
            rcpt_tos=json.dumps(list(env.rcpt_tos)),
            peer=env.peer[:64],
            size=len(raw),
            sha256=env.sha256,
            raw_ref=(prepared.raw_ref if (prepared := self._prepared.get(entry.id))
                     else self.rt.content.put(raw, s)),
            kind=kind,
        )
        s.add(inbound)
        if flush:
            s.flush()
        return inbound

    # -- routing ------------------------------------------------------------------------

    def _take_in(self, s: Session, entry: SpoolEntry, raw: bytes) -> None:
        domain = self.rt.settings.domain
        env = entry.envelope
        # The header block only: the parser would otherwise hold the whole message as a
        # str and a list of lines (some 7x a 25 MB record) just to skip the body.
        headers = BytesHeaderParser(policy=INBOUND).parsebytes(header_block(raw))
        assert isinstance(headers, EmailMessage)
        rcpts = [r.lower() for r in env.rcpt_tos]

        bounce_ids = [i for r in rcpts if (i := mc.delivery_id_from_bounce_address(r, domain))]
        if bounce_ids:
            inbound = self._inbound(s, entry, raw, kind="bounce")
            inbound.outcome = "delivery status notification; kept"
            record_event(s, action="bounce_received", actor=env.mail_from or "<>",
                         actor_role="outside",
                         description={"inbound": inbound.id, "deliveries": bounce_ids})
            try:
                bounce_msg = email.message_from_bytes(raw, policy=INBOUND)
            except RecursionError:
                inbound.outcome = "bounce: MIME nested too deeply to read; kept"
                return
            assert isinstance(bounce_msg, EmailMessage)
            handle_bounce(s, self.rt, self.notifier, inbound, bounce_msg, env.mail_from,
                          bounce_ids)
            return

        addr_tokens = [t for r in rcpts if (t := mc.token_from_address(r, domain))]
        ref_tokens = mc.tokens_from_references(
            [str(v) for h in ("In-Reply-To", "References") for v in headers.get_all(h, [])],
            domain,
        )
        from_addr = _from_address(headers)
        own = _own_mail(domain, from_addr, env.mail_from)
        if addr_tokens or (ref_tokens and self._is_any_decider(s, from_addr)):
            inbound = self._inbound(s, entry, raw, kind="reply")
            if own:
                # Loops: the broker never answers mail from its own domain.
                inbound.outcome = f"ignored: {own}"
                record_event(s, action="reply_ignored", actor=from_addr or "<>",
                             actor_role="outside",
                             description={"inbound": inbound.id, "reason": own})
                return
            try:
                msg = email.message_from_bytes(raw, policy=INBOUND)
            except RecursionError:
                inbound.outcome = "refused: MIME nested too deeply to read; nothing changed"
                record_event(s, action="reply_refused", actor=from_addr or "<>",
                             actor_role="outside",
                             description={"inbound": inbound.id, "reason": "malformed"})
                return
            assert isinstance(msg, EmailMessage)
            # A reply encrypted to the broker's key is read decrypted (in memory only).
            msg = open_reply(raw, self.notifier.signer) or msg
            handle_reply(s, self.rt, self.notifier, inbound, msg, env.mail_from,
                         list(dict.fromkeys(addr_tokens + ref_tokens)))
            return

        slugs = [local for r in rcpts if (local := _local_at(r, domain)) is not None]
        children = s.scalars(select(Child).where(Child.slug.in_(slugs))).all() if slugs else []
        if not children:
            inbound = self._inbound(s, entry, raw, kind="stray")
            inbound.outcome = "no child of this broker among the recipients"
            record_event(s, action="stray_mail", actor=from_addr or "<>", actor_role="outside",
                         description={"inbound": inbound.id, "recipients": rcpts})
            return
        first = s.scalar(select(Inbound.id).where(Inbound.sha256 == env.sha256,
                                                  Inbound.kind == "record").limit(1))
        if first is not None:
            # The very same bytes again: a sending MTA that lost our 250 (a crash between
            # the commit and the answer) sends again. A second record would ask the
            # family twice and could release the report twice under two Message-IDs.
            inbound = self._inbound(s, entry, raw, kind="duplicate")
            inbound.outcome = f"the same message (identical bytes) as inbound {first}; kept"
            record_event(s, action="duplicate_received", actor=from_addr or "<>",
                         actor_role="outside",
                         description={"inbound": inbound.id, "same_as": first,
                                      "sha256": env.sha256})
            return
        inbound = self._inbound(s, entry, raw, kind="record", flush=False)
        for child in children:
            self._new_record(s, entry, inbound, child, headers, from_addr, raw=raw)

    def _is_any_decider(self, s: Session, address: str) -> bool:
        """A guardian or a student: someone whose reply may carry a decision."""
        return address != "" and s.scalar(
            select(Person.id).where(Person.email == address,
                                    Person.role.in_(("guardian", "student")),
                                    Person.active.is_(True)).limit(1)
        ) is not None

    # -- a new record -------------------------------------------------------------------

    def _new_record(
        self,
        s: Session,
        entry: SpoolEntry,
        inbound: Inbound,
        child: Child,
        headers: EmailMessage,
        from_addr: str,
        raw: bytes = b"",
    ) -> None:
        env = entry.envelope
        subject = " ".join(str(headers.get("Subject", "")).split())
        received_at = inbound.received_at
        record = Record(
            child_id=child.id, child=child, state=states.RECEIVED, sender_email=from_addr,
            subject=subject, raw_ref=inbound.raw_ref, raw_sha256=inbound.sha256,
            received_at=received_at,
        )
        s.add(record)
        s.flush()
        inbound.record_id = record.id
        inbound.child_id = child.id
        record_event(
            s, action="received", actor=from_addr or "<>", actor_role="sender",
            child=child.slug, record_id=record.id,
            # No subject: the audit is append-only and can never be re-encrypted, so it
            # holds references and metadata only (records.subject is sealed).
            description={"sender": from_addr, "sha256": inbound.sha256,
                         "size": inbound.size, "envelope_from": env.mail_from},
        )

        automatic = classify_automatic(headers, env.mail_from)
        if automatic:
            self._quarantine(s, record, f"automatic mail: {automatic}", notify=False)
            return
        own = _own_mail(self.rt.settings.domain, from_addr, env.mail_from)
        if own:
            # Loops: nothing from the broker's own domain is answered or forwarded.
            self._quarantine(s, record, own, notify=False)
            return
        sender = next((p for p in active_people(s, child) if p.email == from_addr), None)
        if sender is None:
            self._quarantine(s, record, "the sender is not on the team")
            return
        if sender.role in ("guardian", "student"):
            self._quarantine(s, record, f"mail from a {sender.role} to the list address is not "
                             "forwarded; the family decides by replying to review requests")
            return
        # OpenPGP: decrypt mail encrypted to the broker and verify the member's signature;
        # decrypted plaintext is parsed from memory, never written anywhere.
        opened = open_record(raw, self.notifier.signer, sender)
        if opened.error:
            self._quarantine(s, record, opened.error)
            return
        prepared = self._prepared.get(entry.id)
        try:
            if opened.message is not None:
                doc = parse_message(opened.message, self.mime_limits)
            elif prepared is not None and prepared.error is not None:
                raise prepared.error
            elif prepared is not None and prepared.doc is not None:
                doc = prepared.doc
            else:
                # The plaintext already read from the sealed spool file (never a disk).
                doc = parse_message(raw, self.mime_limits)
        except LimitExceeded as exc:
            self._quarantine(s, record, f"over a limit of this broker: {exc}")
            return
        except ParseFailed as exc:
            self._quarantine(s, record, f"malformed message: it could not be read ({exc})")
            return

        record.sender_id = sender.id
        record.doc_ref = self.rt.content.put(
            document_to_bytes(doc, put_blob=lambda data: self.rt.content.put(data, s)), s)
        people = active_people(s, child)
        day = received_at.date()
        ev = evaluate(
            self.rt.rules, jurisdiction=child.jurisdiction, sender=member(sender),
            members=team_members(people), subject=doc.subject,
            paragraphs=[p.text for p in doc.paragraphs]
            + [p.text for a in doc.attachments for p in a.paragraphs or ()],
            attachment_names=[a.filename for a in doc.attachments],
            consents=active_for_child(s, child.id, day), day=day,
        )
        # Who decides (guardians, the student) at intake; evaluated again at the decision.
        authority = authority_for(s, self.rt.rules, child, ev.categories, day)
        if ev.auto_consent is not None and not all(d.role == "guardian"
                                                   for d in authority.deciders):
            ev = dataclasses.replace(ev, auto_consent=None, auto_reason=(
                "not released automatically: the student has a say in this record"))
        if ev.auto_consent is not None and any(
                withheld(p) for p in people if p.email in ev.recipients):
            ev = dataclasses.replace(ev, auto_consent=None, auto_reason=(
                "not released automatically: a recipient requires encryption and has no "
                "usable key"))
        if ev.auto_consent is not None and (authority.blocked or doc.attachments):
            # Attachments are released automatically only once they can be redacted
            # for certain; until then a parent looks at them.
            ev = dataclasses.replace(ev, auto_consent=None, auto_reason=(
                "not released automatically: " + (authority.blocked or
                                                   "records with attachments are reviewed")))
        record.policy = json.dumps(ev.to_json(), sort_keys=True)
        reasons = ev.reasons() + ([ev.auto_reason] if ev.auto_reason else [])
        reasons += list(authority.reasons) + ([authority.blocked] if authority.blocked else [])
        reasons += hold_reasons(sender)[1:] + list(opened.notes)
        record.hold_reasons = json.dumps(reasons)
        record.expires_at = received_at + dt.timedelta(days=self._hold_days())
        if ev.redact_phrases:
            # Always-redacted patterns (rules/default.toml [[patterns.always]]) start the
            # draft: every version and every copy leaves them out, whoever approves.
            record.draft_ref = self.rt.content.put(
                draft_to_bytes(Draft(phrases=ev.redact_phrases)), s)
        transition(s, record, states.HELD, actor="broker", actor_role="broker",
                   description={"sender": from_addr, "sender_role": sender.role,
                                # Category names and counts: no words of the message.
                                "categories": list(ev.categories),
                                "jurisdiction": ev.jurisdiction,
                                "always_redacted": dict(ev.always_redacted),
                                "paragraphs": len(doc.paragraphs),
                                # a count: filenames are content (never in the audit)
                                "attachments": len(doc.attachments)})

        by_email = {p.email: p for p in people}
        recipients = [by_email[e] for e in ev.recipients if e in by_email]
        if ev.auto_consent is not None:
            self._release_automatically(s, record, doc, recipients, ev.auto_consent)
        else:
            if blocked := [f"{p.name} <{p.email}> {why}: nothing will be sent to them (TO the "
                           "others, or have the operator fix the key)"
                           for p in recipients if (why := withheld(p))]:
                record.hold_reasons = json.dumps(json.loads(record.hold_reasons) + blocked)
            by_id = {p.id: p for p in people}
            deciders = [by_id[d.person_id] for d in authority.deciders if d.person_id in by_id]
            token = tokens.issue(s, record, record.expires_at, first=True)
            sent_to = self.notifier.review_request(
                s, record, doc, token, recipients, sender, deciders=deciders,
                coverage=[f"{by_email[c.email].name or c.email}: {c.label}"
                          for c in ev.coverage if c.email in by_email],
                who_decides=_who_decides(authority),
                suggestions=[f"{x['name'].replace('_', ' ')} \"{x['text']}\": "
                             f"REDACT \"{x['text']}\" ({x['why']})" for x in ev.suggestions],
            )
            transition(s, record, states.AWAITING_REVIEW, actor="broker", actor_role="broker",
                       action="review_requested", recipients=sent_to,
                       description={"default_recipients": [p.email for p in recipients],
                                    "expires_at": record.expires_at.isoformat()})
        message_id = str(headers.get("Message-ID", "")).strip() or None
        self.notifier.notice(
            s, child, sender, "receipt",
            render.render_receipt(child_name=child.name, subject=subject,
                                  received_at=received_at),
            subject=subject, record=record, in_reply_to=message_id,
            auto_submitted="auto-replied",
        )

    def _hold_days(self) -> float:
        """broker.toml [hold] lifetime_days when the operator set it, else the rules'."""
        return self.rt.settings.hold_days or self.rt.rules.hold.lifetime_days

    def _release_automatically(self, s: Session, record: Record, doc: Document,
                               recipients: list[Person], consent_id: int) -> None:
        """Released at once under an automatic consent; the guardians get an FYI copy
        whose answer REVOKE stops the consent."""
        draft = (draft_from_bytes(self.rt.content.get(record.draft_ref, s))
                 if record.draft_ref else Draft())
        content = apply_draft(doc, draft)
        release(s, self.rt, self.notifier, record, doc, draft, recipients, approvers=[],
                actor="broker", actor_role="broker", auth="consent", automatic=consent_id)
        token = tokens.issue(s, record, utcnow() + FYI_TOKEN_LIFETIME, purpose="fyi",
                             first=True)
        consent = s.get(Consent, consent_id)
        for g in guardians(s, record.child):
            self.notifier.fyi(s, record, content, token, recipients, g,
                              consent_label=consent.purpose if consent else "",
                              consent_id=consent_id)

    def _quarantine(self, s: Session, record: Record, reason: str, notify: bool = True) -> None:
        record.quarantine_reason = reason
        transition(s, record, states.QUARANTINED, actor="broker", actor_role="broker",
                   description={"reason": reason})
        if not notify:
            return
        for g in audience(s, self.rt.rules, record.child):
            self.notifier.notice(
                s, record.child, g, "quarantine",
                render.render_quarantine_notice(
                    child_name=record.child.name, quarantine_id=record.id,
                    from_addr=record.sender_email or "(no sender)", subject=record.subject,
                    date=record.received_at.strftime("%Y-%m-%d %H:%M UTC"), reason=reason,
                ),
                subject=record.subject, record=record,
            )


# The first keys of the advisory locks that claim a spool id and a message's bytes
# (PostgreSQL), so they can never meet another use of advisory locks.
SPOOL_LOCK_CLASS = 0x5B001
BYTES_LOCK_CLASS = 0x5B002


def _claim(s: Session, spool_id: str, sha256: str) -> bool:
    """Claim a spooled message for this transaction; False if another pipeline (another
    `broker serve` on the same spool and database) is taking it in right now - that
    message, or another copy of the same bytes (a sender that lost our 250 and sent
    again): the copy taken second must see the first one's row, or both would become
    records.

    On PostgreSQL transaction-level advisory locks on the spool id and on the bytes' hash,
    taken without waiting and held until commit: the owner commits its inbound row before
    the locks go, so whoever claims next sees the row. A message not claimed stays in the
    spool for a later round; a hash collision only postpones one. Not inside the message's
    savepoint: a lock taken there would go with a rollback to it. SQLite's write lock
    (BEGIN IMMEDIATE) already serialises pipelines there."""
    if s.get_bind().dialect.name != "postgresql":
        return True
    return bool(s.scalar(
        text(f"SELECT pg_try_advisory_xact_lock({SPOOL_LOCK_CLASS}, hashtext(:id)) "
             f"AND pg_try_advisory_xact_lock({BYTES_LOCK_CLASS}, hashtext(:sha))"),
        {"id": spool_id, "sha": sha256}))


def _who_decides(authority: Authority) -> list[str]:
    lines = []
    for g in authority.groups:
        names = ", ".join(m.name or m.email for m in g.members)
        if g.need == "all" and len(g.members) > 1:
            lines.append(f"every one of {names} must reply APPROVE")
        elif g.label == "the student":
            lines.append(f"{names} (the student) must reply APPROVE too"
                         + ("; their DENY is final" if g.veto else "")
                         if len(authority.groups) > 1 else f"{names} (the student) decides")
        else:
            lines.append(f"one of {names}" if len(g.members) > 1 else names)
    return lines if len(authority.groups) > 1 or any(
        g.need == "all" or g.label == "the student" for g in authority.groups) else []


def _from_address(headers: EmailMessage) -> str:
    try:
        value = str(headers.get("From", ""))
    except Exception:  # a header the parser cannot even turn into text
        return ""
    return parseaddr(value)[1].strip().lower()


def _own_mail(domain: str, from_addr: str, mail_from: str) -> str | None:
    """Why this is the broker's own mail (From or envelope sender at its domain or a
    subdomain), or None. Such mail is never answered: the rule that stops loops with
    the broker's own notices, bounces and auto-replies to them."""
    for what, address in (("From", from_addr), ("envelope sender", mail_from)):
        dom = address.strip().strip("<>").rpartition("@")[2].lower()
        if dom and (dom == domain or dom.endswith("." + domain)):
            return f"mail from the broker's own domain ({what} {address.strip()})"
    return None


def _local_at(address: str, domain: str) -> str | None:
    local, _, dom = address.rpartition("@")
    return local if dom == domain and local and "+" not in local else None

