"""Build the broker's outgoing messages and its own addresses, with the standard library only.

Every message the broker sends (review requests, previews, notices, releases) is a new
message made here from plain data, never a re-sent copy of something received, so
nothing the parent did not approve can ride along in a header or a MIME part.
The address helpers are the single place that knows how tokens and delivery ids are
written into addresses and Message-IDs, so parsing and composing cannot drift apart.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid, parseaddr

from broker.mail.document import Attachment
from broker.mail.headers import SMTP

# Review tokens: 160 random bits written as lower-case base32 without padding.
TOKEN_RE = re.compile(r"[a-z2-7]{32}")
# Local parts the broker uses itself; a child's slug may not take them.
RESERVED_LOCAL_PARTS = frozenset(
    {"review", "bounces", "postmaster", "abuse", "mailer-daemon", "noreply", "broker"}
)
_SLUG_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
_DOMAIN_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_MSGID_RE = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")
_HEADER_NAME_RE = re.compile(r"[!-9;-~]+")
# Headers compose() sets itself; extra_headers may not replace or duplicate them.
_OWN_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "reply-to",
        "in-reply-to",
        "references",
        "auto-submitted",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
    }
)
# RFC 5322 recommends lines of at most 78 characters; longer ones are sent quoted-printable.
_MAX_PLAIN_LINE = 78


# --------------------------------------------------------------------------- names


def first_name(child_name: str) -> str:
    """The child's first name: what the family's mail is signed with."""
    parts = child_name.split()
    return parts[0] if parts else child_name


def possessive(name: str) -> str:
    """``Sam`` -> ``Sam's``: one rule, used in display names and texts alike."""
    return f"{name}'s"


def records_name(child_name: str) -> str:
    """Display name of the list address, e.g. ``Sam's records``."""
    return f"{possessive(first_name(child_name))} records"


# --------------------------------------------------------------------------- addresses


def _check_domain(domain: str) -> str:
    """Reject a domain that could smuggle extra address syntax into a header."""
    if not _DOMAIN_RE.fullmatch(domain):
        raise ValueError(f"not a plain domain name: {domain!r}")
    return domain.lower()


def _split_address(addr: str) -> tuple[str, str] | None:
    """(local part, lower-cased domain) of an address that may carry a display name."""
    _, spec = parseaddr(addr)
    local, at, dom = spec.rpartition("@")
    if not at or not local or not dom:
        return None
    return local, dom.lower()


def is_token(token: str) -> bool:
    """True for a well-formed review token (not whether it exists)."""
    return bool(TOKEN_RE.fullmatch(token))


def _check_token(token: str) -> str:
    if not is_token(token):
        raise ValueError("malformed review token")
    return token


def list_address(slug: str, domain: str) -> str:
    """The child's list address, where team members post: ``sam@domain``."""
    if not _SLUG_RE.fullmatch(slug) or slug in RESERVED_LOCAL_PARTS:
        raise ValueError(f"unusable child slug: {slug!r}")
    return f"{slug}@{_check_domain(domain)}"


def review_address(token: str, domain: str) -> str:
    """Reply-To of a review request: ``review+<token>@domain``."""
    return f"review+{_check_token(token)}@{_check_domain(domain)}"


def review_message_id(token: str, domain: str, seq: int = 0) -> str:
    """Message-ID of a review request, carrying the token for clients that drop plus-addresses.

    ``seq`` > 0 gives reminders and re-sends distinct Message-IDs that still map to the token.
    """
    if seq < 0:
        raise ValueError("seq must be >= 0")
    suffix = f".{seq}" if seq else ""
    return f"<review.{_check_token(token)}{suffix}@{_check_domain(domain)}>"


def token_from_address(addr: str, domain: str) -> str | None:
    """The token of a ``review+<token>@domain`` address, or None for anything else."""
    parts = _split_address(addr)
    if parts is None or parts[1] != domain.lower():
        return None
    local = parts[0].lower()
    prefix, plus, token = local.partition("+")
    if not plus or prefix != "review" or not is_token(token):
        return None
    return token


def tokens_from_references(header_values: Iterable[str], domain: str) -> list[str]:
    """Tokens named by In-Reply-To/References values, in order of appearance, without repeats.

    Matches only Message-IDs the broker itself wrote (``<review.<token>[.n]@domain>``).
    """
    pattern = re.compile(
        r"<review\.([a-z2-7]{32})(?:\.\d+)?@" + re.escape(domain.lower()) + r">",
        re.IGNORECASE,
    )
    found: list[str] = []
    for value in header_values:
        for match in pattern.finditer(str(value)):
            token = match.group(1).lower()
            if token not in found:
                found.append(token)
    return found


def bounce_address(delivery_id: int, domain: str) -> str:
    """VERP envelope sender of one outbound copy: ``bounces+<delivery-id>@domain``."""
    if delivery_id < 0:
        raise ValueError("delivery id must be >= 0")
    return f"bounces+{int(delivery_id)}@{_check_domain(domain)}"


def delivery_id_from_bounce_address(addr: str, domain: str) -> int | None:
    """The delivery id of a ``bounces+<id>@domain`` address (a DSN's recipient), or None."""
    parts = _split_address(addr)
    if parts is None or parts[1] != domain.lower():
        return None
    prefix, plus, number = parts[0].lower().partition("+")
    if not plus or prefix != "bounces" or not number.isascii() or not number.isdigit():
        return None
    return int(number)


def release_message_id(record_id: int, recipient_email: str, domain: str) -> str:
    """Stable Message-ID of one released copy, so a resend after a crash is recognisable."""
    digest = hashlib.sha256(recipient_email.strip().lower().encode("utf-8")).hexdigest()[:16]
    return f"<release.{int(record_id)}.{digest}@{_check_domain(domain)}>"


def new_message_id(domain: str) -> str:
    """A fresh Message-ID for a one-off notice."""
    return make_msgid(idstring="broker", domain=_check_domain(domain))


# --------------------------------------------------------------------------- messages


def _one_line(value: str) -> str:
    """Collapse line breaks and runs of whitespace: header values must stay one logical line."""
    return " ".join(value.split())


def _check_address(addr: str, what: str) -> str:
    """A bare address with no room for header injection."""
    addr = addr.strip()
    if any(c in addr for c in '\r\n<>,;"') or addr.count("@") != 1 or " " in addr:
        raise ValueError(f"{what} must be one bare address, got {addr!r}")
    return addr


def _check_msgid(value: str, what: str) -> str:
    if not _MSGID_RE.fullmatch(value.strip()):
        raise ValueError(f"{what} must look like <id@domain>, got {value!r}")
    return value.strip()


def _safe_filename(name: str, fallback: str) -> str:
    """Strip path parts and control characters; never leave the name empty."""
    cleaned = "".join("_" if (c in "/\\" or ord(c) < 32 or ord(c) == 127) else c for c in name)
    cleaned = cleaned.strip().lstrip(".")
    return cleaned or fallback


def _mime_type(content_type: str) -> tuple[str, str]:
    """(maintype, subtype) we can attach as bytes; anything odd becomes octet-stream."""
    bare = content_type.split(";", 1)[0].strip().lower()
    maintype, slash, subtype = bare.partition("/")
    token = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*")
    if (
        not slash
        or not token.fullmatch(maintype)
        or not token.fullmatch(subtype)
        or maintype in {"multipart", "message"}  # structure we would have to rebuild: send opaque
    ):
        return "application", "octet-stream"
    return maintype, subtype


def _date_header(date: datetime | None) -> str:
    """RFC 5322 date in GMT; naive datetimes are taken as UTC."""
    if date is None:
        date = datetime.now(UTC)
    elif date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    return formatdate(date.timestamp(), localtime=False, usegmt=True)


def compose(
    *,
    from_addr: str,
    from_name: str,
    to: str,
    subject: str,
    text: str,
    message_id: str,
    reply_to: str | None = None,
    in_reply_to: str | None = None,
    references: tuple[str, ...] = (),
    auto_submitted: str | None = None,
    attachments: tuple[Attachment, ...] = (),
    date: datetime | None = None,
    extra_headers: Mapping[str, str] | None = None,
    to_name: str = "",
) -> bytes:
    """One RFC 5322 message to one recipient, as bytes with CRLF line ends ready for SMTP.

    The text is UTF-8 (7bit when it is short-lined ASCII, quoted-printable otherwise, so no
    line ever exceeds SMTP limits). Attachments are base64 with the filename in
    Content-Disposition (RFC 2231 for non-ASCII names). ``auto_submitted`` (RFC 3834) also
    adds ``X-Auto-Response-Suppress: All`` so Exchange out-of-office replies stay away.
    """
    msg = EmailMessage(policy=SMTP)
    msg["From"] = formataddr((_one_line(from_name), _check_address(from_addr, "from_addr")))
    to_addr = _check_address(to, "to")
    msg["To"] = formataddr((_one_line(to_name), to_addr)) if to_name.strip() else to_addr
    if reply_to is not None:
        msg["Reply-To"] = _check_address(reply_to, "reply_to")
    msg["Subject"] = _one_line(subject)
    msg["Date"] = _date_header(date)
    msg["Message-ID"] = _check_msgid(message_id, "message_id")
    # In-Reply-To/References often echo an outside sender's Message-ID: malformed ones are
    # left out rather than failing the notice (bad input must never stop an answer).
    if in_reply_to and _MSGID_RE.fullmatch(in_reply_to.strip()):
        msg["In-Reply-To"] = in_reply_to.strip()
    refs = [r.strip() for r in references if _MSGID_RE.fullmatch(r.strip())]
    if refs:
        msg["References"] = " ".join(refs)
    if auto_submitted:
        msg["Auto-Submitted"] = _one_line(auto_submitted)
        msg["X-Auto-Response-Suppress"] = "All"
    for name, value in (extra_headers or {}).items():
        if not _HEADER_NAME_RE.fullmatch(name) or name.lower() in _OWN_HEADERS or name in msg:
            raise ValueError(f"extra header not allowed: {name!r}")
        msg[name] = _one_line(value)

    body = text.replace("\r\n", "\n").replace("\r", "\n")
    if not body.endswith("\n"):
        body += "\n"
    plain = body.isascii() and all(len(line) <= _MAX_PLAIN_LINE for line in body.split("\n"))
    msg.set_content(
        body, subtype="plain", charset="utf-8", cte="7bit" if plain else "quoted-printable"
    )

    for att in attachments:
        maintype, subtype = _mime_type(att.content_type)
        msg.add_attachment(
            bytes(att.data),
            maintype=maintype,
            subtype=subtype,
            filename=_safe_filename(att.filename, att.label or "attachment"),
        )
    if msg.is_multipart():
        for part in msg.iter_parts():
            del part["MIME-Version"]  # only the top level carries it
    return msg.as_bytes(policy=SMTP)


def compose_notice(
    *,
    child_name: str,
    slug: str,
    domain: str,
    to: str,
    subject: str,
    text: str,
    to_name: str = "",
    message_id: str | None = None,
    reply_to: str | None = None,
    in_reply_to: str | None = None,
    references: tuple[str, ...] = (),
    auto_submitted: str = "auto-generated",
    date: datetime | None = None,
) -> bytes:
    """A broker notice from the child's list address (help, receipts, refusals, confirmations).

    Receipts answer a sender's message: pass ``auto_submitted="auto-replied"`` and
    ``in_reply_to`` there.
    """
    return compose(
        from_addr=list_address(slug, domain),
        from_name=records_name(child_name),
        to=to,
        to_name=to_name,
        subject=subject,
        text=text,
        message_id=message_id or new_message_id(domain),
        reply_to=reply_to,
        in_reply_to=in_reply_to,
        references=references,
        auto_submitted=auto_submitted,
        date=date,
    )


def compose_review_request(
    *,
    child_name: str,
    slug: str,
    domain: str,
    token: str,
    to: str,
    subject: str,
    text: str,
    to_name: str = "",
    seq: int = 0,
    in_reply_to: str | None = None,
    references: tuple[str, ...] = (),
    date: datetime | None = None,
    attachments: tuple[Attachment, ...] = (),
) -> bytes:
    """A review request or preview to one guardian, answerable by Reply-To or by threading.

    Reply-To is ``review+<token>@domain`` and the Message-ID ``<review.<token>[.seq]@domain>``,
    so the reply maps back to the token either way.
    """
    return compose(
        from_addr=list_address(slug, domain),
        from_name=records_name(child_name),
        to=to,
        to_name=to_name,
        subject=subject,
        text=text,
        message_id=review_message_id(token, domain, seq),
        reply_to=review_address(token, domain),
        in_reply_to=in_reply_to,
        references=references,
        auto_submitted="auto-generated",
        date=date,
        attachments=attachments,
    )


def compose_release(
    *,
    child_name: str,
    slug: str,
    domain: str,
    record_id: int,
    to: str,
    subject: str,
    text: str,
    attachments: tuple[Attachment, ...] = (),
    to_name: str = "",
    date: datetime | None = None,
) -> bytes:
    """One released copy: ``From: "Sam's records" <sam@domain>``, Reply-To the list address.

    The Message-ID is stable per (record, recipient), so a resend after a crash is the same
    message. Auto-Submitted keeps vacation replies from coming back into the hold.
    """
    home = list_address(slug, domain)
    return compose(
        from_addr=home,
        from_name=records_name(child_name),
        to=to,
        to_name=to_name,
        subject=subject,
        text=text,
        message_id=release_message_id(record_id, to, domain),
        reply_to=home,
        auto_submitted="auto-generated",
        attachments=attachments,
        date=date,
    )
