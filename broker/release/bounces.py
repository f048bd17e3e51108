"""Bounces: what came back to ``bounces+<delivery id>@domain`` (VERP), and what to do.

Pure core: :func:`parse_bounce` reads a delivery status notification (RFC 3464,
``multipart/report; report-type=delivery-status``) with the standard library's
``email`` package - each ``message/delivery-status`` part is already split into its
per-message and per-recipient field blocks by the parser - and classifies every
recipient:

- ``hard``: Action failed with a 5.x.x status (the copy will not arrive);
- ``soft``: a 4.x.x status or Action delayed (the sending side retries);
- ``none``: relayed, delivered, expanded: not a failure.

Each failure gets a reason in plain words for a parent ("mailbox does not exist"),
from a small table by status code, else from the diagnostic text with addresses, hosts
and numbers taken out. Bounces without a report (old qmail, Postfix, Exim, Gmail
texts) are read best effort and conservatively; anything else is "unclassified".
Auto-replies (vacation) sent back to the envelope sender are no bounces at all.

Thin shell: :func:`handle_bounce` applies a parsed bounce to the deliveries named by
the VERP addresses, in the pipeline's transaction. The audit gets delivery ids, status
codes and recipient addresses only: never the diagnostic text (which may quote mail).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage, Message
from email.parser import HeaderParser
from email.utils import collapse_rfc2231_value, getaddresses, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from broker.mail.autoreply import automatic_reasons

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from broker.db.models import Inbound
    from broker.review.notify import Notifier
    from broker.runtime import Runtime

Outcome = Literal["hard", "soft", "none"]
Kind = Literal["dsn", "plain", "autoreply", "feedback", "unclassified"]

# At most this many parts are looked at, and this many recipients reported.
MAX_PARTS = 200
MAX_RECIPIENTS = 100


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient of a bounce: what the reporting server says happened to the copy."""

    recipient: str  # Final-Recipient (lowercase address), "" when none is given
    original: str = ""  # Original-Recipient
    action: str = ""  # failed | delayed | delivered | relayed | expanded | ...
    status: str = ""  # RFC 3463 code "5.1.1", "" when none
    diagnostic: str = ""  # Diagnostic-Code as given (never audited)
    remote_mta: str = ""
    outcome: Outcome = "none"
    reason: str = ""  # plain words for a parent

    @property
    def failed(self) -> bool:
        return self.outcome != "none"


@dataclass(frozen=True)
class Bounce:
    kind: Kind
    source: str = ""  # "dsn", "qmail", "postfix", "exim", "gmail", or the auto-reply reason
    recipients: tuple[RecipientStatus, ...] = ()
    message_ids: tuple[str, ...] = field(default=())  # of the returned original, if any

    @property
    def failures(self) -> tuple[RecipientStatus, ...]:
        return tuple(r for r in self.recipients if r.failed)


# --------------------------------------------------------------------------- reasons

# Plain words by status code; looked up by the full code, then "class.subject".
_REASONS: dict[str, str] = {
    "x.1.1": "mailbox does not exist",
    "x.1.0": "mailbox does not exist",
    "x.1.2": "address's mail server not found",
    "x.1.3": "the address is not valid",
    "x.1.4": "the address is ambiguous",
    "x.1.6": "mailbox has moved",
    "x.1.10": "the address's domain accepts no mail",
    "x.2.0": "mailbox unavailable",
    "x.2.1": "mailbox disabled",
    "x.2.2": "mailbox full",
    "x.2.3": "message too large",
    "x.2.4": "mailing list expansion problem",
    "x.3.0": "receiving mail system problem",
    "x.3.1": "receiving mail system full",
    "x.3.2": "receiving mail system not accepting mail",
    "x.3.4": "message too large",
    "x.4.1": "address rejected by its mail server",
    "x.4.4": "address's mail server not found",
    "x.4.6": "mail routing loop",
    "x.4.7": "delivery timed out",
    "x.5.3": "too many recipients",
    "x.7.1": "message refused as spam/policy",
}
_SUBJECT_REASONS: dict[str, str] = {
    "1": "address problem",
    "2": "mailbox problem",
    "3": "receiving mail system problem",
    "4": "address's mail server could not be reached",
    "5": "message refused by the receiving server",
    "6": "message format refused",
    "7": "message refused as spam/policy",
}
# Diagnostic words, for codes that say little (x.0.0) or are missing.
_WORDS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), words) for p, words in (
        (r"user unknown|unknown user|no such (user|mailbox|recipient)|does not exist"
         r"|recipient not found|invalid recipient|mailbox unavailable|address rejected"
         r"|not a valid mailbox|unrouteable address|no mailbox here",
         "mailbox does not exist"),
        (r"mailbox (is )?full|over ?quota|quota exceeded|exceeded storage|insufficient storage",
         "mailbox full"),
        (r"host (name )?(lookup failure|not found|unknown)|domain not found|no mx"
         r"|name or service not known|nxdomain",
         "address's mail server not found"),
        (r"too (large|big)|size limit|message size|exceeds .*size", "message too large"),
        (r"spam|blacklist|blocklist|blocked|policy|dmarc|spf|dkim|not authori[sz]ed"
         r"|access denied|rejected", "message refused as spam/policy"),
        (r"timed? ?out|too long in the queue|expired", "delivery timed out"),
    )
)
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_REPLY = re.compile(r"(?<![\d.])([245])[0-9]{2}(?=[ -])")
_ADDRESS = re.compile(r"<?[^\s<>@()\[\]]+@[^\s<>()\[\];,]+>?")
_HOSTISH = re.compile(r"\[[^\]]*\]|\([^)]*\)|\b[\w-]+(\.[\w-]+){2,}\b|\d+(\.\d+)+|\b\d{3}\b")


def reason_for(status: str, diagnostic: str = "", action: str = "") -> str:
    """Plain words for a parent: the table by status code, else the diagnostic's words,
    else its text with addresses, hosts and numbers taken out."""
    m = _STATUS.fullmatch(status or "")
    if m and (m.group(2), m.group(3)) != ("0", "0"):
        _, subject, detail = m.groups()
        words = _REASONS.get(f"x.{subject}.{detail}")
        if words:
            return words
    for pattern, words in _WORDS:
        if pattern.search(diagnostic or ""):
            return words
    if m and m.group(2) != "0":
        return _SUBJECT_REASONS.get(m.group(2), "")
    text = _stripped(diagnostic)
    if text:
        return text
    if action == "delayed" or (m and m.group(1) == "4"):
        return "delivery delayed"
    return "the receiving mail server refused the message"


def _stripped(diagnostic: str) -> str:
    """The diagnostic's words without what could identify or quote anything."""
    text = " ".join((diagnostic or "").split())
    text = re.sub(r"^(smtp|x-[\w-]+|x-postfix|x-unix)\s*;\s*", "", text, flags=re.I)
    # What the remote server said comes after its reply code; what precedes is the
    # reporting server's framing ("SMTP error from remote mail server after ...: host").
    codes = list(re.finditer(r"(?<![\d.])[245]\d\d(?:[ -][245]\.\d{1,3}\.\d{1,3})?[ -]", text))
    if codes:
        text = text[codes[-1].end():]
    text = _ADDRESS.sub("", text)
    text = _STATUS.sub("", text)
    text = _HOSTISH.sub("", text)
    text = re.sub(r"[^A-Za-z ,.'-]", " ", text)
    text = " ".join(text.split()).strip(" ,.-:")
    if len(text) > 100:
        text = text[:100].rsplit(" ", 1)[0] + "..."
    return text.lower()


def classify(action: str, status: str) -> Outcome:
    """Action failed + 5.x.x = hard; 4.x.x or delayed = soft; the rest is no failure."""
    action = action.lower()
    if action in {"delivered", "relayed", "expanded", "deliverable"}:
        return "none"
    if status.startswith("2."):
        return "none"
    if action == "delayed" or status.startswith("4."):
        return "soft"
    if action == "failed" or status.startswith("5."):
        return "hard"
    return "none"


def _status_of(value: str, diagnostic: str) -> str:
    """The Status field's code; a generic x.0.0 gives way to a more precise code of the
    same class in the diagnostic; missing, the diagnostic's code (or its reply code)."""
    m = _STATUS.search(value or "")
    found = _STATUS.search(diagnostic or "")
    if m:
        code = m.group(0)
        if (found and found.group(1) == m.group(1) and code.endswith(".0.0")
                and not found.group(0).endswith(".0.0")):
            return found.group(0)
        return code
    if found:
        return found.group(0)
    reply = _REPLY.search(diagnostic or "")
    return f"{reply.group(1)}.0.0" if reply else ""


def _address(value: str) -> str:
    """``rfc822; <a@b>`` -> ``a@b``."""
    value = str(value or "")
    if ";" in value:
        value = value.split(";", 1)[1]
    _, addr = parseaddr(value.strip())
    addr = addr or value.strip().strip("<>")
    return addr.strip().lower()


def _field(block: Message, name: str) -> str:
    value = block.get(name)
    return " ".join(str(value).split()) if value is not None else ""


def _recipient(final: str, original: str = "", action: str = "", status_field: str = "",
               diagnostic: str = "", remote: str = "") -> RecipientStatus:
    # A keyword (RFC 3464 2.3.3); anything else is only ever shown as "other".
    words = action.split("(", 1)[0].split()
    action = words[0].lower() if words else ""
    if not re.fullmatch(r"[a-z-]{1,20}", action):
        action = "other" if action else ""
    status = _status_of(status_field, diagnostic)
    outcome = classify(action, status)
    return RecipientStatus(
        recipient=final, original=original, action=action, status=status,
        diagnostic=diagnostic, remote_mta=remote, outcome=outcome,
        reason=reason_for(status, diagnostic, action) if outcome != "none" else "",
    )


# --------------------------------------------------------------------------- parsing


def _walk(msg: Message) -> Iterator[Message]:
    for count, part in enumerate(msg.walk()):
        if count >= MAX_PARTS:
            return
        yield part


def _dsn_blocks(msg: Message) -> list[list[Message]]:
    """The field blocks of every delivery-status part (the parser splits them)."""
    found = []
    for part in _walk(msg):
        if part.get_content_type() in ("message/delivery-status",
                                       "message/global-delivery-status"):
            payload = part.get_payload()
            if isinstance(payload, list):
                found.append([b for b in payload if isinstance(b, Message)])
    return found


def _text_blocks(text: str) -> list[Message]:
    """Delivery-status field blocks in the text of a damaged report (a boundary that
    does not match, a part without its header): each paragraph that has a
    Final-Recipient field is read by the standard header parser."""
    found = []
    for paragraph in re.split(r"\n[ \t]*\n", _cut(text)):
        paragraph = paragraph.strip("\n")
        if re.search(r"^Final-Recipient:", paragraph, re.I | re.M):
            block = HeaderParser().parsestr(paragraph)
            if block.get("Final-Recipient") is not None:
                found.append(block)
    return found


def _dsn_recipients(msg: Message) -> list[RecipientStatus]:
    out: list[RecipientStatus] = []
    parsed = _dsn_blocks(msg)
    if not any(parsed):
        parsed = [_text_blocks(_text_of(msg))]
    for blocks in parsed:
        for block in blocks:
            final = _field(block, "Final-Recipient")
            action = _field(block, "Action")
            if not final and not action:
                continue  # the per-message block (Reporting-MTA, Arrival-Date...)
            out.append(_recipient(
                _address(final), _address(_field(block, "Original-Recipient")), action,
                _field(block, "Status"), _field(block, "Diagnostic-Code"),
                _field(block, "Remote-MTA").split(";", 1)[-1].strip(),
            ))
    return out[:MAX_RECIPIENTS]


def _text_of(msg: Message) -> str:
    """The readable text of the report itself (not of a returned message)."""
    texts = []
    for part in _walk(msg):
        if part.get_content_type() == "message/rfc822":
            break
        if part.get_content_maintype() == "multipart" and not part.is_multipart():
            # A multipart whose boundary never comes: the parser leaves its body as text.
            payload = part.get_payload()
            if isinstance(payload, str):
                texts.append(payload)
            continue
        if part.get_content_maintype() == "text" and part.get_content_subtype() == "plain":
            try:
                payload = part.get_payload(decode=True) or b""
            except Exception:  # a damaged part is simply not read
                continue
            if isinstance(payload, bytes):
                charset = part.get_content_charset() or "utf-8"
                try:
                    texts.append(payload.decode(charset, "replace"))
                except LookupError:
                    texts.append(payload.decode("utf-8", "replace"))
        if part.get_content_type() == "text/rfc822-headers":
            break
    return "\n".join(texts).replace("\r\n", "\n")


# Where the copy of the returned message starts in a plain-text bounce.
_RETURNED = re.compile(
    r"^(-+ ?(This is a copy of|Below this line is a copy of|Original message|"
    r"The original message|Undelivered message)|--- Below this line)", re.IGNORECASE | re.M)
_BARE_ADDR = re.compile(r"<?([A-Za-z0-9._%+=/-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})>?")


def _cut(text: str) -> str:
    m = _RETURNED.search(text)
    return text[:m.start()] if m else text


def _blocks(lines: list[str], start: re.Pattern[str]) -> list[tuple[str, str]]:
    """(address, following text) for each line matching ``start`` (group 1: address)."""
    out: list[tuple[str, list[str]]] = []
    for line in lines:
        m = start.match(line)
        if m:
            rest = line[m.end(1):].lstrip(">: \t")
            out.append((m.group(1).lower(), [rest] if rest else []))
        elif out:
            if not line.strip() and out[-1][1]:
                out.append(("", []))  # a blank line after the block's text ends it
            else:
                out[-1][1].append(line.strip())
    return [(a, " ".join(t)) for a, t in out if a]


def _plain(msg: Message) -> tuple[str, list[RecipientStatus]]:
    """Bounces without a report, by the fixed texts of a few MTAs; else nothing."""
    text = _cut(_text_of(msg))
    lines = text.split("\n")
    permanent = bool(re.search(r"permanent (error|failure)|failed permanently|"
                               r"could not be delivered", text, re.I))
    delayed = bool(re.search(r"has been delayed|not yet been delivered|will be retried|"
                             r"still being retried|warning message only", text, re.I))
    action = "delayed" if delayed and not permanent else "failed"

    def made(source: str, pairs: Iterable[tuple[str, str]]) -> tuple[str, list[RecipientStatus]]:
        recipients = [_recipient(a, "", action, "", d) for a, d in pairs if "@" in a]
        return (source, recipients[:MAX_RECIPIENTS]) if recipients else ("", [])

    if "This is the qmail-send program" in text:
        return made("qmail", _blocks(lines, re.compile(r"^<([^>\s]+@[^>\s]+)>:\s*$")))
    if "This message was created automatically by mail delivery software" in text:
        pairs = _blocks(lines, re.compile(r"^ {1,4}<?([^\s<>@]+@[^\s<>]+?)>?\s*$"))
        if not pairs:
            failed = ",".join(str(v) for v in msg.get_all("X-Failed-Recipients", []))
            pairs = [(a.lower(), text) for _, a in getaddresses([failed]) if a]
        return made("exim", pairs)
    if re.search(r"This is the mail system at host|The mail system\s*$", text, re.M):
        return made("postfix", _blocks(lines, re.compile(r"^<([^>\s]+@[^>\s]+)>:?(.*)$")))
    m = re.search(r"Delivery to the following recipients? (failed permanently|has been "
                  r"delayed|failed)[^:]*:\s*\n((?:\s+\S+@\S+\s*\n)+)", text)
    if m:
        detail = text[m.end():]
        addrs = [a.group(1).lower() for a in _BARE_ADDR.finditer(m.group(2))]
        return made("gmail", [(a, detail) for a in addrs])
    return "", []


def _returned_message_ids(msg: Message) -> tuple[str, ...]:
    """Message-IDs of the returned original (message/rfc822 or text/rfc822-headers)."""
    ids: list[str] = []
    for part in _walk(msg):
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            inner = part.get_payload()
            inner = inner[0] if isinstance(inner, list) and inner else inner
            if isinstance(inner, Message) and inner.get("Message-ID"):
                ids.append(str(inner.get("Message-ID")).strip())
        elif ctype == "text/rfc822-headers":
            payload = part.get_payload(decode=True) or b""
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
            m = re.search(r"^Message-ID:\s*(<[^>\s]+>)", text, re.I | re.M)
            if m:
                ids.append(m.group(1))
    return tuple(dict.fromkeys(ids))


def parse_bounce(msg: EmailMessage, mail_from: str = "") -> Bounce:
    """What a message sent back to a VERP address says (pure; never raises on input)."""
    ids = _returned_message_ids(msg)
    report = collapse_rfc2231_value(msg.get_param("report-type", "", header="content-type"))
    report = str(report).strip().lower()
    is_report = msg.get_content_type() == "multipart/report"
    if is_report and report in {"feedback-report", "disposition-notification"}:
        return Bounce("feedback", report, (), ids)
    recipients = _dsn_recipients(msg)
    if recipients:
        return Bounce("dsn", "dsn", tuple(recipients), ids)
    source, plain = _plain(msg)
    if plain:
        return Bounce("plain", source, tuple(plain), ids)
    if is_report or _dsn_blocks(msg):
        return Bounce("unclassified", "report without recipients", (), ids)
    # No bounce: an auto-reply (vacation) to the envelope sender is dropped quietly.
    # RFC 3834 auto-replies come from the null path too: that alone says nothing either way.
    reasons = {k: v for k, v in dict(automatic_reasons(msg, mail_from)).items()
               if k != "null-return-path"}
    bounce_rules = {"report", "notification-part", "failed-recipients", "daemon-sender"}
    subject = str(msg.get("Subject", ""))
    looks_bounce = bool(re.match(r"\s*(undeliver|delivery (status|failure)|mail delivery|"
                                 r"returned mail|failure notice|non[- ]?delivery)",
                                 subject, re.I))
    if looks_bounce or set(reasons) & bounce_rules:
        return Bounce("unclassified", "bounce not understood", (), ids)
    if reasons:
        return Bounce("autoreply", next(iter(reasons.values())), (), ids)
    if _vacation(msg):
        return Bounce("autoreply", "vacation subject", (), ids)
    return Bounce("unclassified", "not a bounce", (), ids)


def _vacation(msg: Message) -> bool:
    return bool(re.match(r"\s*(away|out of (the )?office|vacation|on leave)",
                         str(msg.get("Subject", "")), re.I))


# --------------------------------------------------------------------------- notice

TEMPLATE = "bounce.txt.j2"


def render_bounced(*, child_name: str, record_id: int, subject: str, recipient_name: str,
                   recipient: str, reason: str, status: str, bounced_at: datetime,
                   templates: Path | str | None = None) -> str:
    """To guardians: a released copy came back: who, which record, why in plain words."""
    from broker.review import render

    return render._render(  # the shared template environment and filters
        TEMPLATE, templates, child_name=child_name, record_id=record_id, subject=subject,
        recipient=render.Person(recipient_name, recipient), reason=reason, status=status,
        bounced_at=bounced_at,
        who=_possessive(recipient_name or recipient),
    )


def _possessive(name: str) -> str:
    from broker.mail.compose import possessive

    return possessive(" ".join(name.split()))


# --------------------------------------------------------------------------- shell


def handle_bounce(s: Session, rt: Runtime, notifier: Notifier, inbound: Inbound,
                  msg: EmailMessage, mail_from: str, delivery_ids: list[int]) -> None:
    """Apply one message sent to ``bounces+ID`` addresses, in the caller's transaction."""
    from broker.audit.log import record_event
    from broker.db.models import Delivery, Person, Record, utcnow
    from broker.policy.context import record_audience
    from broker.release.settle import settle

    actor = mail_from or "<>"
    bounce = parse_bounce(msg, mail_from)
    if bounce.kind in ("autoreply", "feedback"):
        inbound.outcome = f"{bounce.kind}, not a bounce; dropped"
        record_event(s, action="bounce_ignored", actor=actor, actor_role="outside",
                     description={"inbound": inbound.id, "deliveries": delivery_ids,
                                  "reason": bounce.kind})
        return
    outcomes: list[str] = []
    for delivery_id in dict.fromkeys(delivery_ids):
        row = s.get(Delivery, delivery_id, with_for_update=True)
        mine = _matching(bounce, row.recipient if row else "", row.message_id if row else "")
        base = {"inbound": inbound.id, "delivery": delivery_id}
        if row is None or mine is None:
            why = ("unknown delivery" if row is None else
                   "unclassified" if not bounce.recipients else "recipient or message "
                   "does not match the delivery")
            record_event(s, action="bounce_ignored", actor=actor, actor_role="outside",
                         description={**base, "reason": why, "recipients": [
                             r.recipient[:320] for r in bounce.recipients[:10]]})
            outcomes.append(f"{delivery_id}: ignored ({why})")
            continue
        details = {**base, "status": mine.status, "action": mine.action,
                   "recipient": row.recipient, "source": bounce.source}
        record = s.get(Record, row.record_id) if row.record_id is not None else None
        slug = record.child.slug if record is not None else None
        rid = record.id if record is not None else None
        if mine.outcome == "none":
            record_event(s, action="bounce_ignored", actor=actor, actor_role="outside",
                         child=slug, record_id=rid,
                         description={**details, "reason": "not a failure"})
            outcomes.append(f"{delivery_id}: not a failure ({mine.status or mine.action})")
            continue
        if mine.outcome == "soft":
            # The relay (or the outbox, for a copy still queued) retries: no notice.
            record_event(s, action="bounce_soft", actor=actor, actor_role="outside",
                         child=slug, record_id=rid, description=details)
            outcomes.append(f"{delivery_id}: soft bounce {mine.status}")
            continue
        was = row.state
        # Told already: the relay refused it (sender.py told the family) or an earlier
        # bounce for this copy did. Audited again, nobody told twice.
        told = was == "failed" or row.last_error.startswith("bounced ")
        row.last_error = f"bounced {mine.status}: {mine.reason}"[:500]
        if was == "queued":
            row.state = "failed"
        record_event(s, action="bounced", actor=actor, actor_role="outside", child=slug,
                     record_id=rid, recipients=[row.recipient],
                     description={**details, "state": row.state,
                                  **({"was": was} if was != row.state else {})})
        outcomes.append(f"{delivery_id}: bounced {mine.status}")
        if row.kind != "release" or record is None or was == "cancelled" or told:
            continue
        person = s.get(Person, row.person_id) if row.person_id else None
        text = render_bounced(
            child_name=record.child.name, record_id=record.id, subject=record.subject,
            recipient_name=person.name if person else "", recipient=row.recipient,
            reason=mine.reason, status=mine.status, bounced_at=utcnow(),
        )
        for g in record_audience(s, rt.rules, record):
            notifier.notice(s, record.child, g, "release_failed", text,
                            subject=record.subject, record=record)
        if was == "queued":
            settle(s, rt, notifier, record)
    inbound.outcome = "bounce: " + "; ".join(outcomes) if outcomes else "bounce; nothing to do"


def _matching(bounce: Bounce, recipient: str, message_id: str) -> RecipientStatus | None:
    """The bounce's entry for the delivery's recipient, or None (treated as forged).

    A returned original carrying a Message-ID of the broker's domain must be this very
    copy; a foreign one (a relay that rewrites Message-IDs) is not held against it."""
    if not recipient:
        return None
    ours = message_id.strip()
    domain = ours.rsplit("@", 1)[-1] if "@" in ours else ""
    if (domain and ours not in bounce.message_ids
            and any(i.lower().endswith("@" + domain.lower()) for i in bounce.message_ids)):
        return None
    recipient = recipient.lower()
    for r in bounce.recipients:
        if recipient in (r.recipient, r.original):
            return r
    return None
