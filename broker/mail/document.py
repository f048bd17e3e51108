"""The parsed, numbered form of a held record: what the parent reviews and redacts.

Plain data only, so the review, redaction and rendering code can be pure functions
over it. Paragraph ids are what the parent types in commands: ``"2"`` for the
second paragraph of the body, ``"A1.3"`` for the third paragraph of attachment A1.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Paragraph:
    id: str  # "2" or "A1.3"
    text: str
    page: int | None = None  # the page of a PDF attachment it is on (1-based)


@dataclass(frozen=True)
class Attachment:
    label: str  # "A1", "A2", ...
    filename: str
    content_type: str  # "application/pdf"
    size: int  # bytes of the decoded payload
    data: bytes = field(repr=False)
    # Extracted text, numbered "A1.1", "A1.2"...; None when the type cannot be read
    # (binary: it can only be released whole or dropped).
    paragraphs: tuple[Paragraph, ...] | None = None
    note: str = ""  # e.g. "scanned, no text" - shown to the parent
    # "pdf", "docx", "text" (read by broker.mail.extract) or "" (not read).
    kind: str = ""
    pages: int | None = None  # PDF: the page count
    scanned: tuple[int, ...] = ()  # PDF: pages with no text layer (images of text)
    # Why it cannot be checked at all ("encrypted (password-protected)", "damaged"): such
    # a file is never sent; the parent can only DROP it.
    problem: str = ""

    def page_paragraphs(self, page: int) -> tuple[Paragraph, ...]:
        return tuple(p for p in self.paragraphs or () if p.page == page)


@dataclass(frozen=True)
class Document:
    subject: str
    sender: str  # the From address, lower-cased
    sender_name: str
    date: str  # as sent, for display
    paragraphs: tuple[Paragraph, ...]
    attachments: tuple[Attachment, ...] = ()
    had_html: bool = False  # the sender sent HTML; recipients only get our text rebuild

    def paragraph_ids(self) -> set[str]:
        ids = {p.id for p in self.paragraphs}
        for a in self.attachments:
            ids.update(p.id for p in a.paragraphs or ())
        return ids

    def attachment(self, label: str) -> Attachment | None:
        for a in self.attachments:
            if a.label.upper() == label.upper():
                return a
        return None


@dataclass(frozen=True)
class Draft:
    """What the parent has asked for so far, applied on top of the original Document.

    Every preview and every release is computed from (Document, Draft); nothing is
    edited in place, so any version can be rebuilt and audited.
    """

    redact_ids: frozenset[str] = frozenset()  # "2", "A1.3"
    redact_pages: frozenset[str] = frozenset()  # whole pages of PDF attachments: "A1 p.2"
    phrases: tuple[str, ...] = ()  # removed everywhere, case-insensitively
    dropped: frozenset[str] = frozenset()  # "A2"
    recipients: tuple[str, ...] | None = None  # member e-mail addresses; None = default
    note: str = ""  # the parent's note, shown on top of what recipients get

    def is_default(self) -> bool:
        return self == Draft()


@dataclass(frozen=True)
class ReleaseContent:
    """Exactly what recipients get (before the footer): the output of redaction."""

    subject: str
    note: str
    paragraphs: tuple[Paragraph, ...]
    attachments: tuple[Attachment, ...]
    # Human-readable lines for the preview: what was removed or withheld, and why.
    changes: tuple[str, ...] = ()
