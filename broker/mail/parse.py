"""From raw mail to a numbered Document.

mail-parser reads the spooled file (it peaks near 4x the message size when parsing
from a file, against about 9x from bytes). Where it gives up on hostile MIME, the
standard library's parser is tried; a message neither can read is quarantined as
malformed by the caller (ParseFailed), never guessed at.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.utils
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from pathlib import Path

import mailparser

from broker.mail.document import Attachment, Document, Paragraph
from broker.mail.extract import extract_text
from broker.redact.text import split_paragraphs


class ParseFailed(Exception):
    """The message could not be read at all."""


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


def _from_mailparser(
    source: Path | bytes,
) -> tuple[str, str, str, str, list[str], list[str], list[_Part]]:
    if isinstance(source, bytes | bytearray):
        m = mailparser.parse_from_bytes(bytes(source))
    else:
        m = mailparser.parse_from_file(str(source))
    msg = m.message
    name, addr = _sender(str(msg.get("From", "")))
    if m.from_:
        name, addr = m.from_[0][0] or name, (m.from_[0][1] or addr).lower()
    parts: list[_Part] = []
    for a in m.attachments:
        payload = a.get("payload") or ""
        if a.get("binary"):
            try:
                data = base64.b64decode(payload)
            except (binascii.Error, ValueError):
                data = payload.encode("latin-1", "replace")
        else:
            data = payload.encode("utf-8", "replace")
        parts.append(_Part(a.get("filename") or "attachment", a.get("mail_content_type") or
                           "application/octet-stream", data))
    return (m.subject or "", name, addr, str(msg.get("Date", "")), list(m.text_plain),
            list(m.text_html), parts)


def _from_stdlib(raw: bytes) -> tuple[str, str, str, str, list[str], list[str], list[_Part]]:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
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


def parse_message(path: Path | bytes) -> Document:
    """Parse the spooled file at ``path``; or bytes in memory, for decrypted mail, whose
    plaintext must never be written to disk."""
    try:
        subject, name, addr, date, plain, html, parts = _from_mailparser(path)
    except Exception:
        try:
            raw = bytes(path) if isinstance(path, bytes | bytearray) else path.read_bytes()
            subject, name, addr, date, plain, html, parts = _from_stdlib(raw)
        except Exception as exc:
            raise ParseFailed(type(exc).__name__) from exc
    text = "\n\n".join(p for p in plain if p.strip())
    if not text.strip() and html:
        text = "\n\n".join(_html_to_text(h) for h in html)
    attachments: list[Attachment] = []
    for i, part in enumerate(parts, start=1):
        label = f"A{i}"
        extracted = extract_text(part.content_type, part.data)
        paragraphs: tuple[Paragraph, ...] | None = None
        if extracted is not None:
            paragraphs = split_paragraphs(extracted, prefix=f"{label}.")
        attachments.append(
            Attachment(
                label=label,
                filename=" ".join(part.filename.split()),
                content_type=part.content_type.lower(),
                size=len(part.data),
                data=part.data,
                paragraphs=paragraphs,
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
