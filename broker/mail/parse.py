"""From raw mail to a numbered Document.

mail-parser reads the message a piece at a time, from a file or from bytes in memory
(its own parse_from_bytes would decode the whole message at once: a higher peak).
Where it gives up on hostile MIME, the standard library's parser is tried; a message
neither can read is quarantined as malformed by the caller (ParseFailed), never guessed
at.
"""

from __future__ import annotations

import binascii
import email
import email.utils
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email import policy
from email.feedparser import BytesFeedParser
from email.message import EmailMessage, Message
from pathlib import Path

import mailparser

from broker.mail.document import Attachment, Document
from broker.mail.extract import extract
from broker.redact.text import split_paragraphs

FEED_CHUNK = 8192  # as mail-parser reads a file

# A message that can be read a piece at a time, and read again (the fallback parser
# starts over): the spool's sealed file, decrypted as it is read. Neither the pieces'
# reader nor the parser then holds the whole message beside the parser's own copy.
Pieces = Callable[[], Iterable[bytes]]


class ParseFailed(Exception):
    """The message could not be read at all."""


class LimitExceeded(ParseFailed):
    """The message's MIME structure is beyond a configured limit; str() is the reason."""


class _SourceFailed(Exception):
    """Reading the message failed (its store, not its MIME): the reader's own error is
    raised to the caller, never taken for malformed mail."""

    def __init__(self, error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.error = error


def _pieces(source: Pieces) -> Iterator[bytes]:
    it = iter(source())
    while True:
        try:
            piece = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise _SourceFailed(exc) from exc
        yield piece


@dataclass(frozen=True)
class MimeLimits:
    """[limits] max_mime_depth, max_mime_parts, max_attachments (broker.config.Limits)."""

    max_depth: int = 20
    max_parts: int = 200
    max_attachments: int = 50


def check_structure(msg: Message, limits: MimeLimits) -> None:
    """Walk the parsed MIME tree without recursion; raise LimitExceeded past a limit.

    Depth counts nesting below the top-level entity (a multipart/mixed holding a text part
    is depth 1); parts count every entity, containers included."""
    stack: list[tuple[Message, int]] = [(msg, 0)]
    parts = 0
    while stack:
        part, depth = stack.pop()
        parts += 1
        if depth > limits.max_depth:
            raise LimitExceeded(f"MIME parts nested deeper than {limits.max_depth} levels")
        if parts > limits.max_parts:
            raise LimitExceeded(f"more than {limits.max_parts} MIME parts")
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend((p, depth + 1) for p in payload if isinstance(p, Message))


def _too_deep(limits: MimeLimits | None) -> LimitExceeded:
    depth = limits.max_depth if limits else MimeLimits.max_depth
    return LimitExceeded(f"MIME parts nested deeper than {depth} levels (too deep to read)")


@dataclass(frozen=True)
class _Part:
    filename: str
    content_type: str
    data: bytes


def _html_to_text(html: str) -> str:
    from broker.mail.html import html_to_text

    return html_to_text(html)


def _sender(from_header: str) -> tuple[str, str]:
    name, addr = email.utils.parseaddr(from_header or "")
    return name, addr.strip().lower()


def _mailparser_from_pieces(pieces: Iterable[bytes]) -> mailparser.MailParser:
    """What mail-parser's parse_from_file does with a file, from memory: the stdlib's
    BytesFeedParser fed 8 KB at a time. (Its parse_from_bytes decodes the whole message
    into one text first: one more copy of a 25 MB message, on top of the parser's own.)"""
    parser = BytesFeedParser()
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, len(view), FEED_CHUNK):
            parser.feed(bytes(view[start:start + FEED_CHUNK]))
    return mailparser.MailParser(parser.close())


def _from_mailparser(
    source: Path | bytes | Pieces, limits: MimeLimits | None = None
) -> tuple[str, str, str, str, list[str], list[str], list[_Part]]:
    if isinstance(source, bytes | bytearray):
        m = _mailparser_from_pieces((source,))
    elif callable(source):
        m = _mailparser_from_pieces(_pieces(source))
    else:
        m = mailparser.parse_from_file(str(source))
    msg = m.message
    if limits is not None:
        check_structure(msg, limits)
    name, addr = _sender(str(msg.get("From", "")))
    if m.from_:
        name, addr = m.from_[0][0] or name, (m.from_[0][1] or addr).lower()
    parts: list[_Part] = []
    for a in m.attachments:
        payload = a.get("payload") or ""
        if a.get("binary"):
            try:
                # binascii reads the ASCII text in place; base64.b64decode would first
                # copy it to bytes (25 MB more for a 25 MB attachment).
                data = binascii.a2b_base64(payload)
            except (binascii.Error, ValueError):
                data = payload.encode("latin-1", "replace")
        else:
            data = payload.encode("utf-8", "replace")
        parts.append(_Part(a.get("filename") or "attachment", a.get("mail_content_type") or
                           "application/octet-stream", data))
    return (m.subject or "", name, addr, str(msg.get("Date", "")), list(m.text_plain),
            list(m.text_html), parts)


def _from_stdlib(
    raw: bytes, limits: MimeLimits | None = None
) -> tuple[str, str, str, str, list[str], list[str], list[_Part]]:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    if limits is not None:
        check_structure(msg, limits)
    name, addr = _sender(str(msg.get("From", "")))
    plain: list[str] = []
    html: list[str] = []
    body = msg.get_body(preferencelist=("plain", "html"))
    if body is not None:
        content = body.get_content()
        (plain if body.get_content_subtype() == "plain" else html).append(content)
    parts: list[_Part] = []
    for part in msg.iter_attachments():
        data = part.get_payload(decode=True) or b""
        parts.append(_Part(part.get_filename() or "attachment", part.get_content_type(), data))
    return str(msg.get("Subject", "")), name, addr, str(msg.get("Date", "")), plain, html, parts


def parse_message(path: Path | bytes | Pieces, limits: MimeLimits | None = None) -> Document:
    """Parse the spooled file at ``path``; or bytes in memory, for decrypted mail, whose
    plaintext must never be written to disk; or a message read a piece at a time
    (``Pieces``), whose reader's own errors are raised as they are.

    With ``limits``, a structure beyond them raises LimitExceeded (a ParseFailed) naming
    the limit; so does nesting too deep for the parsers' recursion (about 1,000 levels)."""
    try:
        return _parse(path, limits)
    except _SourceFailed as exc:
        raise exc.error from None


def _parse(path: Path | bytes | Pieces, limits: MimeLimits | None) -> Document:
    try:
        subject, name, addr, date, plain, html, parts = _from_mailparser(path, limits)
    except (LimitExceeded, _SourceFailed):
        raise
    except RecursionError as exc:
        # Nested deeper than Python's recursion limit: the stdlib parser would fail the same way.
        raise _too_deep(limits) from exc
    except Exception:
        try:
            if isinstance(path, bytes | bytearray):
                raw = bytes(path)
            elif callable(path):
                raw = b"".join(_pieces(path))
            else:
                raw = path.read_bytes()
            subject, name, addr, date, plain, html, parts = _from_stdlib(raw, limits)
        except (LimitExceeded, _SourceFailed):
            raise
        except RecursionError as exc:
            raise _too_deep(limits) from exc
        except Exception as exc:
            raise ParseFailed(type(exc).__name__) from exc
    if limits is not None and len(parts) > limits.max_attachments:
        raise LimitExceeded(f"more than {limits.max_attachments} attachments ({len(parts)})")
    text = "\n\n".join(p for p in plain if p.strip())
    if not text.strip() and html:
        text = "\n\n".join(_html_to_text(h) for h in html)
    attachments: list[Attachment] = []
    for i, part in enumerate(parts, start=1):
        label = f"A{i}"
        filename = " ".join(part.filename.split())
        got = extract(label, part.content_type, filename, part.data)
        attachments.append(
            Attachment(
                label=label,
                filename=filename,
                content_type=part.content_type.lower(),
                size=len(part.data),
                data=part.data,
                paragraphs=got.paragraphs,
                note=got.note,
                kind=got.kind,
                pages=got.pages,
                scanned=got.scanned,
                problem=got.problem,
            )
        )
    return Document(
        subject=" ".join(subject.split()),
        sender=addr,
        sender_name=name,
        date=date,
        paragraphs=split_paragraphs(text),
        attachments=tuple(attachments),
        had_html=bool(html),
    )
