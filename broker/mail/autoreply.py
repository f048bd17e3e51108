"""Recognise automatic mail: auto-replies, bounces, list traffic, feedback reports.

Such a message must never be answered (RFC 3834 section 2: answering an
automatic message starts mail loops) and must never count as a parent's
decision (a vacation reply quoting the review request must not approve it).

Each check is a small named :class:`Rule` that returns *why* it matched, in the
spirit of Mailman 3's moderation rules, so the quarantine entry and the audit
log can say which header gave the message away. The checks are deliberately
one-sided: a false "automatic" only quarantines a reply (the parent can see it
and resend), while a missed auto-reply could be taken as a command.

Pure functions over a parsed message (``policy.default``) and the SMTP
envelope sender; headers are read raw so a malformed header cannot raise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.utils import collapse_rfc2231_value, getaddresses

__all__ = ["RULES", "Rule", "automatic_reasons", "classify_automatic"]

Check = Callable[[EmailMessage, str], "str | None"]


@dataclass(frozen=True)
class Rule:
    """One named check: ``check(msg, mail_from)`` returns the reason it matched, or None."""

    name: str
    description: str
    check: Check


# --------------------------------------------------------------------------
# Header access
# --------------------------------------------------------------------------


def _raw_values(msg: Message, name: str) -> list[str]:
    """Unfolded raw values of header ``name``; never raises on malformed headers."""
    wanted = name.lower()
    values = []
    for key, value in msg.raw_items():  # type: ignore[attr-defined]
        if key.lower() == wanted:
            values.append(" ".join(str(value).split()))
    return values


def _first(msg: Message, name: str) -> str | None:
    values = _raw_values(msg, name)
    return values[0] if values else None


def _decoded(value: str) -> str:
    """RFC 2047-decode a header value; a broken encoded-word leaves it as is."""
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def _addresses(value: str) -> list[str]:
    return [addr.lower() for _, addr in getaddresses([value]) if addr]


def _localpart(address: str) -> str:
    return address.strip().strip("<>").rsplit("@", 1)[0].lower()


# Senders used by MTAs for DSNs (RFC 5321 section 4.5.5 gives them a null path;
# many still put mailer-daemon/postmaster in From).
_DAEMON_LOCALPARTS = frozenset(
    {"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon", "mail.delivery.system"}
)

# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------


def _report_type(msg: EmailMessage, mail_from: str) -> str | None:
    """RFC 6522 multipart/report: DSN, read receipt (MDN), ARF feedback report."""
    if msg.get_content_type() != "multipart/report":
        return None
    kind = collapse_rfc2231_value(msg.get_param("report-type", "", header="content-type"))
    kind = str(kind).strip().lower()
    if kind == "feedback-report":
        return "feedback report (multipart/report; report-type=feedback-report)"
    if kind == "disposition-notification":
        return "read receipt (multipart/report; report-type=disposition-notification)"
    return "delivery status notification (multipart/report)"


_NOTIFICATION_TYPES = {
    "message/delivery-status": "delivery status notification (message/delivery-status part)",
    "message/global-delivery-status": (
        "delivery status notification (message/global-delivery-status part)"
    ),
    "message/feedback-report": "feedback report (message/feedback-report part)",
    "message/disposition-notification": "read receipt (message/disposition-notification part)",
}


def _notification_part(msg: EmailMessage, mail_from: str) -> str | None:
    """A DSN, MDN or ARF body part anywhere in the tree, even without multipart/report."""
    for part in _walk(msg):
        reason = _NOTIFICATION_TYPES.get(part.get_content_type())
        if reason:
            return reason
    return None


def _walk(msg: Message, limit: int = 200) -> Iterator[Message]:
    """``msg.walk()`` with a bound on parts, against pathological nesting."""
    for count, part in enumerate(msg.walk()):
        if count >= limit:
            return
        yield part


def _auto_submitted(msg: EmailMessage, mail_from: str) -> str | None:
    """RFC 3834: any Auto-Submitted value other than "no" marks automatic mail."""
    for value in _raw_values(msg, "Auto-Submitted"):
        keyword = value.split(";", 1)[0].split("(", 1)[0].strip().lower()
        if keyword and keyword != "no":
            return f"Auto-Submitted: {keyword}"
    return None


_BULK_PRECEDENCE = frozenset({"bulk", "junk", "list", "auto_reply", "auto-reply"})


def _precedence(msg: EmailMessage, mail_from: str) -> str | None:
    """Precedence: bulk/junk/list (RFC 2076, RFC 3834 section 3.1.8), auto_reply."""
    for value in _raw_values(msg, "Precedence"):
        keyword = value.strip().lower()
        if keyword in _BULK_PRECEDENCE:
            return f"Precedence: {keyword}"
    return None


def _vendor_autoreply(msg: EmailMessage, mail_from: str) -> str | None:
    """X-Autoreply / X-Autorespond / X-Autogenerated (Exim, cPanel, vacation programs)."""
    for name in ("X-Autoreply", "X-Autorespond", "X-Autogenerated", "X-Auto-Reply"):
        value = _first(msg, name)
        if value is not None and value.strip().lower() not in {"no", "false", "0"}:
            return name
    if (_first(msg, "X-Apple-Action") or "").strip().upper() == "VACATION":
        return "X-Apple-Action: VACATION"
    if (_first(msg, "X-MS-Exchange-Generated-Message-Source") or "").strip():
        return "X-MS-Exchange-Generated-Message-Source"
    return None


def _auto_response_suppress(msg: EmailMessage, mail_from: str) -> str | None:
    """Exchange marks its own out-of-office replies ``X-Auto-Response-Suppress: All/OOF``."""
    for value in _raw_values(msg, "X-Auto-Response-Suppress"):
        tokens = {t.strip().lower() for t in value.split(",")}
        if tokens & {"all", "oof"}:
            return f"X-Auto-Response-Suppress: {value.strip()}"
    return None


def _mailing_list(msg: EmailMessage, mail_from: str) -> str | None:
    """RFC 2369/2919 list headers: list traffic is never a personal decision."""
    for name in ("List-Id", "List-Unsubscribe", "List-Post"):
        if _raw_values(msg, name):
            return f"{name} present"
    return None


def _null_return_path(msg: EmailMessage, mail_from: str) -> str | None:
    """Empty envelope sender ``<>``: RFC 5321 reserves it for notifications."""
    if mail_from.strip() in {"", "<>"}:
        return "null return path"
    return None


def _daemon_sender(msg: EmailMessage, mail_from: str) -> str | None:
    """Envelope or From is mailer-daemon / postmaster: an MTA's notification."""
    if mail_from.strip() not in {"", "<>"} and _localpart(mail_from) in _DAEMON_LOCALPARTS:
        return f"envelope sender {_localpart(mail_from)}"
    for value in _raw_values(msg, "From"):
        for address in _addresses(value) or [value]:
            if _localpart(address) in _DAEMON_LOCALPARTS:
                return f"From {_localpart(address)}"
    return None


def _x_loop(msg: EmailMessage, mail_from: str) -> str | None:
    """X-Loop is set by procmail/ticket-system responders to stop loops; MUAs never set it."""
    value = _first(msg, "X-Loop")
    return f"X-Loop: {value.strip()}" if value is not None else None


def _failed_recipients(msg: EmailMessage, mail_from: str) -> str | None:
    """Exim adds X-Failed-Recipients to its bounces."""
    return "X-Failed-Recipients present" if _raw_values(msg, "X-Failed-Recipients") else None


# Subject prefixes of out-of-office replies that carry no header (some webmail,
# Apple iCloud, older Exchange). Anchored at the start: a parent's reply to a
# review request starts with "Re:" / "AW:" / "SV:" instead.
_AUTO_SUBJECT = re.compile(
    r"^\s*(?:auto(?:matic)?[ -]?reply|auto[ -]?response|autoresponse|out of (?:the )?office"
    r"|abwesenheitsnotiz|automatische antwort|réponse automatique|respuesta automática"
    r"|risposta automatica|automatisch antwoord|afwezigheidsbericht|autosvar"
    r"|automatyczna odpowiedź|автоответ|автоматический ответ"
    r"|undeliverable|undelivered mail|delivery status notification|mail delivery failed"
    r"|returned mail|failure notice|delivery failure|non[- ]?delivery)\b",
    re.IGNORECASE,
)


def _automatic_subject(msg: EmailMessage, mail_from: str) -> str | None:
    """Last resort: the subject of an out-of-office reply or a bounce."""
    value = _first(msg, "Subject")
    if value is None:
        return None
    subject = _decoded(value)
    m = _AUTO_SUBJECT.match(subject)
    return f"subject {m.group(0).strip()!r}" if m else None


RULES: tuple[Rule, ...] = (
    Rule("report", "RFC 6522 multipart/report (DSN, MDN, ARF)", _report_type),
    Rule("notification-part", "a delivery-status/feedback/MDN body part", _notification_part),
    Rule("auto-submitted", "RFC 3834 Auto-Submitted other than no", _auto_submitted),
    Rule(
        "vendor-autoreply", "X-Autoreply, X-Autorespond, Apple/Exchange markers", _vendor_autoreply
    ),
    Rule(
        "auto-response-suppress",
        "Exchange X-Auto-Response-Suppress: All/OOF",
        _auto_response_suppress,
    ),
    Rule("precedence", "Precedence: bulk/junk/list/auto_reply", _precedence),
    Rule("mailing-list", "List-Id / List-Unsubscribe / List-Post", _mailing_list),
    Rule("null-return-path", "empty envelope sender", _null_return_path),
    Rule("daemon-sender", "mailer-daemon / postmaster sender", _daemon_sender),
    Rule("failed-recipients", "Exim X-Failed-Recipients", _failed_recipients),
    Rule("x-loop", "X-Loop set by an automatic responder", _x_loop),
    Rule("subject", "out-of-office or bounce subject prefix", _automatic_subject),
)


def automatic_reasons(msg: EmailMessage, mail_from: str) -> list[tuple[str, str]]:
    """All ``(rule name, reason)`` pairs that match, in rule order (for the audit log)."""
    found = []
    for rule in RULES:
        reason = rule.check(msg, mail_from or "")
        if reason:
            found.append((rule.name, reason))
    return found


def classify_automatic(msg: EmailMessage, mail_from: str) -> str | None:
    """Reason the message is automatic (never answer it, never count it), or None.

    ``mail_from`` is the SMTP envelope sender as received (``""`` or ``"<>"`` for
    the null path). The first matching rule's reason is returned.
    """
    for rule in RULES:
        reason = rule.check(msg, mail_from or "")
        if reason:
            return reason
    return None
