"""Reading attachments into numbered paragraphs, per type: plain text, PDF (pypdfium2, page
by page) and Word (python-docx). Everything else is listed with its type and size and can
only be released whole or dropped.

`extract` returns plain data for the Document: the paragraphs numbered "A1.1", "A1.2"... (a
PDF's carry their page), the page count and scanned pages of a PDF, and, for a file that
cannot be checked at all (encrypted, damaged), the problem: such a file is never sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from broker.mail.document import Paragraph

Extractor = Callable[[bytes], str | None]

PDF_TYPES = frozenset({"application/pdf", "application/x-pdf", "application/acrobat"})
DOCX_TYPES = frozenset({
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
})
# Types a sender's client uses when it does not know better: the file name decides then.
GENERIC_TYPES = frozenset({"application/octet-stream", "application/x-download",
                           "application/binary", ""})


def _text(data: bytes) -> str | None:
    for encoding in ("utf-8", "utf-16"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


EXTRACTORS: dict[str, Extractor] = {
    "text/plain": _text,
    "text/markdown": _text,
    "text/csv": _text,
}


def _mime(content_type: str) -> str:
    return content_type.lower().split(";")[0].strip()


def extract_text(content_type: str, data: bytes) -> str | None:
    extractor = EXTRACTORS.get(_mime(content_type))
    return extractor(data) if extractor else None


def kind_of(content_type: str, filename: str, data: bytes) -> str:
    """"pdf", "docx", "text" or "" (not readable), from the type, or the name and the first
    bytes when the type is a generic one."""
    mime = _mime(content_type)
    name = (filename or "").lower()
    if mime in PDF_TYPES or (mime in GENERIC_TYPES and (name.endswith(".pdf")
                                                         or data[:5] == b"%PDF-")):
        return "pdf"
    if mime in DOCX_TYPES or (mime in GENERIC_TYPES and name.endswith(".docx")):
        return "docx"
    if mime in EXTRACTORS:
        return "text"
    return ""


@dataclass(frozen=True)
class Extracted:
    kind: str
    paragraphs: tuple[Paragraph, ...] | None
    pages: int | None = None
    scanned: tuple[int, ...] = ()
    problem: str = ""
    note: str = ""


def extract(label: str, content_type: str, filename: str, data: bytes) -> Extracted:
    """Never raises for bad input: a file that cannot be read says so in ``problem``."""
    from broker.redact.text import split_paragraphs

    kind = kind_of(content_type, filename, data)
    if kind == "text":
        text = extract_text(content_type, data)
        return Extracted(kind, split_paragraphs(text or "", prefix=f"{label}."))
    if kind == "pdf":
        return _pdf(label, data)
    if kind == "docx":
        return _docx(label, data)
    return Extracted("", None)


def _cannot_check(kind: str, label: str, problem: str) -> Extracted:
    return Extracted(kind, None, problem=problem,
                     note=f"{problem}: it cannot be checked, so it is never sent. "
                          f"DROP {label} to say you saw this")


def _pdf(label: str, data: bytes) -> Extracted:
    try:
        from broker.attachments.pdf import read_pdf

        reading = read_pdf(data)
    except Exception as exc:  # a reader bug must not lose the record: fail closed
        return _cannot_check("pdf", label, f"damaged: cannot be read ({type(exc).__name__})")
    if reading.problem:
        return _cannot_check("pdf", label, reading.problem)
    paragraphs: list[Paragraph] = []
    for page in reading.pages:
        for text in page.paragraphs:
            paragraphs.append(Paragraph(f"{label}.{len(paragraphs) + 1}", text, page.number))
    scanned = tuple(p.number for p in reading.pages if p.scanned)
    note = ""
    if scanned:
        pages = ", ".join(f"p.{n}" for n in scanned)
        many = len(scanned) != 1
        note = (f"{len(scanned)} scanned page{'s' if many else ''} with no text ({pages}): "
                f"the broker cannot read or search {'them' if many else 'it'}; release "
                f"whole, REDACT {label} p.{scanned[0]} (the whole page) or DROP {label}")
    return Extracted("pdf", tuple(paragraphs), pages=len(reading.pages), scanned=scanned,
                     note=note)


def _docx(label: str, data: bytes) -> Extracted:
    try:
        from broker.attachments.docx import read_docx

        texts, problem = read_docx(data)
    except Exception as exc:
        return _cannot_check("docx", label, f"damaged: cannot be read ({type(exc).__name__})")
    if problem:
        return _cannot_check("docx", label, problem)
    return Extracted("docx", tuple(Paragraph(f"{label}.{i}", t)
                                   for i, t in enumerate(texts, start=1)))
