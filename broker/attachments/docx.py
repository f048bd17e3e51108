"""Word (.docx) attachments: read every paragraph, search every part, render approved text.

``read_docx`` lists the body's paragraphs and table cells in document order, then everything
else the file would carry if it were sent as it is: headers, footers, footnotes, endnotes,
comments, text deleted under tracked changes, and document properties, each labelled.

``docx_contains`` searches every part of the zip: XML with tags stripped and runs joined (so
a phrase split across runs, or across paragraphs, is found), attribute values, properties,
comments, tracked changes, headers and footers, and nested files (embedded Office files
and PDFs). It fails closed: a file it cannot read "contains" every phrase.

``render_text_pdf`` is how a redacted Word file leaves: as a PDF the broker draws from the
approved text alone (fpdf2's core fonts; nothing from the original file but that text).
"""

from __future__ import annotations

import datetime as dt
import io
import re
import unicodedata
import zipfile
from collections.abc import Iterator, Sequence

from lxml import etree

from broker.attachments import bytes_contain, phrase_regex, text_contains

ENCRYPTED = "encrypted (password-protected)"
DAMAGED = "damaged: cannot be read"
OLD_DOC = "not a .docx file (an old Word .doc file, which cannot be read)"
TOO_LARGE = "too large to read"

_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_MC_FALLBACK = "{http://schemas.openxmlformats.org/markup-compatibility/2006}Fallback"
_CFB_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"

_MAX_MEMBERS = 5000
_MAX_PART = 64 * 1024 * 1024
_MAX_TOTAL = 256 * 1024 * 1024
_MAX_DEPTH = 3

# Subtrees whose text is not part of the current document text.
_SKIP_TEXT = {
    f"{_W}del",
    f"{_W}moveFrom",
    f"{_W}txbxContent",  # text boxes: listed as paragraphs of their own
    f"{_W}instrText",  # field codes
    f"{_W}delInstrText",
    _MC_FALLBACK,  # the legacy copy of the same drawing/text box
}
# Containers not to descend into when looking for block-level paragraphs.
_SKIP_BLOCKS = {f"{_W}del", f"{_W}moveFrom", _MC_FALLBACK}
_CORE_FIELDS = (
    "title",
    "subject",
    "creator",
    "keywords",
    "description",
    "lastModifiedBy",
    "category",
    "contentStatus",
    "identifier",
    "language",
    "version",
)


class _Unreadable(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, huge_tree=False, load_dtd=False
    )


def _open_zip(data: bytes) -> zipfile.ZipFile:
    if data.startswith(_CFB_MAGIC):
        # An OLE compound file: either an encrypted .docx or an old binary .doc.
        if "EncryptionInfo".encode("utf-16-le") in data:
            raise _Unreadable(ENCRYPTED)
        raise _Unreadable(OLD_DOC)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise _Unreadable(DAMAGED) from exc
    infos = zf.infolist()
    if len(infos) > _MAX_MEMBERS or sum(i.file_size for i in infos) > _MAX_TOTAL:
        raise _Unreadable(TOO_LARGE)
    return zf


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, never more than _MAX_PART (headers can lie about sizes)."""
    if info.file_size > _MAX_PART:
        raise _Unreadable(TOO_LARGE)
    try:
        with zf.open(info) as fh:
            body = fh.read(_MAX_PART + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise _Unreadable(DAMAGED) from exc
    except NotImplementedError as exc:  # an unsupported compression method
        raise _Unreadable(DAMAGED) from exc
    except RuntimeError as exc:  # an encrypted zip member
        raise _Unreadable(ENCRYPTED) from exc
    if len(body) > _MAX_PART:
        raise _Unreadable(TOO_LARGE)
    return body


def _xml(zf: zipfile.ZipFile, name: str) -> etree._Element | None:
    try:
        info = zf.getinfo(name)
    except KeyError:
        return None
    try:
        return etree.fromstring(_read_member(zf, info), _parser())
    except etree.XMLSyntaxError as exc:
        raise _Unreadable(DAMAGED) from exc


# --- reading -------------------------------------------------------------------------------


def _normal(text: str) -> str:
    return " ".join(text.split())


def _paragraph_text(p: etree._Element) -> str:
    out: list[str] = []

    def walk(el: etree._Element) -> None:
        for child in el:
            tag = child.tag
            if not isinstance(tag, str) or tag in _SKIP_TEXT:
                continue
            if tag == f"{_W}t":
                out.append(child.text or "")
            elif tag in (f"{_W}tab", f"{_W}br", f"{_W}cr", f"{_W}ptab"):
                out.append(" ")
            elif tag == f"{_W}noBreakHyphen":
                out.append("-")
            else:
                walk(child)

    walk(p)
    return _normal("".join(out))


def _blocks(el: etree._Element) -> Iterator[str]:
    """Paragraph texts under ``el`` in document order: body, table cells, content controls,
    then the text boxes anchored in a paragraph right after it."""
    for child in el:
        tag = child.tag
        if not isinstance(tag, str) or tag in _SKIP_BLOCKS:
            continue
        if tag == f"{_W}p":
            text = _paragraph_text(child)
            if text:
                yield text
            for box in child.iter(f"{_W}txbxContent"):
                if not any(a.tag == _MC_FALLBACK for a in box.iterancestors()):
                    yield from _blocks(box)
        elif tag.endswith("Pr") or tag == f"{_W}sectPr":
            continue
        else:
            yield from _blocks(child)


def _deleted(root: etree._Element) -> Iterator[str]:
    for el in root.iter(f"{_W}del", f"{_W}moveFrom"):
        text = _normal("".join(t.text or "" for t in el.iter(f"{_W}delText", f"{_W}t")))
        if text:
            yield text


def _part_number(name: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", name)
    return (int(digits[-1]) if digits else 0, name)


def _notes(root: etree._Element, tag: str) -> Iterator[str]:
    for note in root.iter(f"{_W}{tag}"):
        if note.get(f"{_W}type") in ("separator", "continuationSeparator", "continuationNotice"):
            continue
        yield from _blocks(note)


def _properties(zf: zipfile.ZipFile) -> Iterator[str]:
    core = _xml(zf, "docProps/core.xml")
    if core is not None:
        for el in core:
            if not isinstance(el.tag, str):
                continue
            name = etree.QName(el).localname
            value = _normal("".join(el.itertext()))
            if name in _CORE_FIELDS and value:
                yield f"Document property ({name}): {value}"
    app = _xml(zf, "docProps/app.xml")
    if app is not None:
        for el in app:
            if not isinstance(el.tag, str):
                continue
            name = etree.QName(el).localname
            value = _normal("".join(el.itertext()))
            if name in ("Company", "Manager", "HyperlinkBase") and value:
                yield f"Document property ({name}): {value}"
    custom = _xml(zf, "docProps/custom.xml")
    if custom is not None:
        for prop in custom:
            if not isinstance(prop.tag, str):
                continue
            value = _normal("".join(prop.itertext()))
            name = _normal(prop.get("name") or "custom")
            yield f"Document property ({name}): {value}"


def read_docx(data: bytes) -> tuple[tuple[str, ...], str | None]:
    """(paragraphs, problem): body and table cells in order, then the rest, labelled.

    After the body: "Header: ...", "Footer: ...", "Footnote: ...", "Endnote: ...",
    "Comment by NAME: ...", "Deleted text (tracked change): ...", and
    "Document property (title): ..." lines, so the parent sees everything the file carries.
    Never raises: an unreadable file gives ``((), problem)``.
    """
    try:
        return tuple(_read(data)), None
    except _Unreadable as exc:
        return (), exc.problem
    except Exception:
        return (), DAMAGED


def _read(data: bytes) -> Iterator[str]:
    zf = _open_zip(data)
    with zf:
        document = _xml(zf, "word/document.xml")
        if document is None:
            raise _Unreadable(f"{DAMAGED} (no document text in it)")
        out = list(_blocks(document))
        names = zf.namelist()
        for kind, label in (("header", "Header"), ("footer", "Footer")):
            parts = sorted(
                (n for n in names if re.fullmatch(rf"word/{kind}\d*\.xml", n)), key=_part_number
            )
            for name in parts:
                root = _xml(zf, name)
                if root is not None:
                    out.extend(f"{label}: {t}" for t in _blocks(root))
        for name, tag, label in (
            ("word/footnotes.xml", "footnote", "Footnote"),
            ("word/endnotes.xml", "endnote", "Endnote"),
        ):
            root = _xml(zf, name)
            if root is not None:
                out.extend(f"{label}: {t}" for t in _notes(root, tag))
        comments = _xml(zf, "word/comments.xml")
        if comments is not None:
            for comment in comments.iter(f"{_W}comment"):
                author = _normal(comment.get(f"{_W}author") or "")
                text = " ".join(_blocks(comment))
                who = f"Comment by {author}" if author else "Comment"
                out.append(f"{who}: {text}")
        tracked = [document]
        for name in names:
            if re.fullmatch(r"word/(header|footer)\d*\.xml|word/(foot|end)notes\.xml", name):
                root = _xml(zf, name)
                if root is not None:
                    tracked.append(root)
        for root in tracked:
            out.extend(f"Deleted text (tracked change): {t}" for t in _deleted(root))
        out.extend(_properties(zf))
        return iter(out)


# --- searching -----------------------------------------------------------------------------


def docx_contains(data: bytes, phrases: Sequence[str]) -> bool:
    """True if any phrase is anywhere in the file, or the file cannot be searched.

    Every member of the zip is searched as bytes (UTF-8, Latin-1, UTF-16); XML members also
    with tags stripped, runs joined inside a paragraph and blocks spaced apart, all text
    joined with and without spaces, and their attribute values (comment authors, custom
    property names, link targets). Embedded Office files and PDFs are searched in turn.
    """
    rx = phrase_regex(phrases)
    if rx is None:
        return False
    if bytes_contain(data, rx):
        return True
    try:
        return zip_contains(data, rx, depth=0)
    except Exception:  # damaged, encrypted, too large, anything: fail closed
        return True


def zip_contains(data: bytes, rx: re.Pattern[str], depth: int) -> bool:
    """Search every member of an Office (or any) zip; raises when it cannot be read."""
    if depth > _MAX_DEPTH:
        raise _Unreadable(TOO_LARGE)
    zf = _open_zip(data)
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if text_contains(info.filename.replace("/", " "), rx):
                return True
            body = _read_member(zf, info)
            if _blob_contains(body, rx, depth):
                return True
    return False


def _blob_contains(body: bytes, rx: re.Pattern[str], depth: int) -> bool:
    if bytes_contain(body, rx):
        return True
    head = body[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        if any(text_contains(t, rx) for t in _xml_texts(body)):
            return True
    elif body.startswith(b"PK\x03\x04"):
        return zip_contains(body, rx, depth + 1)
    elif b"%PDF-" in body[:1024]:
        from broker.attachments.pdf import _CannotSearch, _Search

        try:
            return _Search(rx).pdf(body, depth + 1)
        except _CannotSearch as exc:
            raise _Unreadable(DAMAGED) from exc
    return False


_BLOCK_TAGS = {"p", "tab", "br", "cr", "tc", "tr", "tbl", "comment", "footnote", "endnote", "sdt"}


def _xml_texts(body: bytes) -> Iterator[str]:
    """The text of an XML part read four ways (see docx_contains)."""
    try:
        root = etree.fromstring(body, _parser())
    except etree.XMLSyntaxError:
        # Damaged XML: strip tags by pattern rather than give up.
        text = body.decode("utf-8", "ignore")
        yield re.sub(r"<[^>]*>", "", text)
        yield re.sub(r"<[^>]*>", " ", text)
        return
    nodes: list[str] = []
    structured: list[str] = []
    attributes: list[str] = []

    def walk(el: etree._Element) -> None:
        attributes.extend(str(v) for v in el.attrib.values())
        word = isinstance(el.tag, str) and el.tag.startswith(_W)
        local = etree.QName(el).localname if isinstance(el.tag, str) else ""
        if el.text:
            nodes.append(el.text)
            structured.append(el.text)
        for child in el:
            walk(child)
            if child.tail:
                nodes.append(child.tail)
                structured.append(child.tail)
        if not word or local in _BLOCK_TAGS:
            structured.append(" ")

    walk(root)
    yield "".join(structured)
    yield "".join(nodes)
    yield " ".join(nodes)
    yield " ".join(attributes)


# --- rendering -----------------------------------------------------------------------------

_REPLACEMENTS = {
    "\u2010": "-",
    "\u2011": "-",
    "\u2012": "-",
    "\u2015": "-",
    "\u2212": "-",
    "\u2192": "->",
    "\u2190": "<-",
    "\u2264": "<=",
    "\u2265": ">=",
    "\u2260": "!=",
    "\u2248": "~",
    "\u2713": "v",
    "\u2714": "v",
    "\u2717": "x",
    "\u2718": "x",
    "\u25cf": "\u2022",
    "\u25aa": "\u2022",
    "\u25e6": "o",
    "\uf0b7": "\u2022",  # the Symbol-font bullet Word uses
    "\u0141": "L",
    "\u0142": "l",
    "\u0110": "D",
    "\u0111": "d",
    "\u0131": "i",
    "\u2024": ".",
}
_ENCODING = "windows-1252"
_UNSHOWN = "?"


def printable(text: str) -> str:
    """``text`` in what fpdf2's core fonts (Windows-1252) can show.

    Letters with accents the code page lacks lose the accent (NFKD), a few symbols get
    ASCII stand-ins, invisible characters go, and anything else becomes "?".
    """
    out: list[str] = []
    for ch in text:
        if ch in "\n":
            out.append(ch)
            continue
        if ch == "\t":
            out.append("    ")
            continue
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs", "Co", "Cn"):
            out.append(" " if category == "Cc" else _UNSHOWN)
            continue
        if category == "Cf":  # zero-width spaces, joiners, direction marks
            continue
        if category.startswith("Z") and ch not in " \u00a0":
            out.append(" ")
            continue
        try:
            ch.encode(_ENCODING)
            out.append(ch)
            continue
        except UnicodeEncodeError:
            pass
        if ch in _REPLACEMENTS:
            out.append(_REPLACEMENTS[ch])
            continue
        base = "".join(
            c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)
        )
        try:
            base.encode(_ENCODING)
            out.append(base if base else _UNSHOWN)
        except UnicodeEncodeError:
            out.append(_UNSHOWN)
    return "".join(out)


def render_text_pdf(paragraphs: Sequence[str], *, heading: str = "") -> bytes:
    """An A4 PDF of ``heading`` and ``paragraphs``, drawn by the broker, numbered pages.

    Its only metadata is Producer "broker" (no dates, no XMP), so the same text always gives
    the same bytes. Characters the core fonts cannot show are replaced (see ``printable``).
    """
    import pikepdf
    from fpdf import FPDF

    class _Doc(FPDF):
        def footer(self) -> None:
            self.set_y(-15)
            self.set_font("Helvetica", size=9)
            self.set_text_color(110, 110, 110)
            self.cell(0, 10, f"Page {self.page_no()} of {{nb}}", align="C")

    pdf = _Doc(format="A4")
    pdf.core_fonts_encoding = _ENCODING
    pdf.set_producer("broker")
    pdf.set_creation_date(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))  # removed below
    pdf.set_margins(20, 20, 20)
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.alias_nb_pages()
    pdf.add_page()
    if heading.strip():
        pdf.set_font("Helvetica", style="B", size=14)
        pdf.multi_cell(0, 7, printable(heading.strip()))
        pdf.ln(4)
    pdf.set_font("Helvetica", size=11)
    for paragraph in paragraphs:
        text = printable(paragraph.replace("\r\n", "\n").replace("\r", "\n")).strip()
        if not text:
            continue
        pdf.multi_cell(0, 5.5, text)
        pdf.ln(3)
    drawn = bytes(pdf.output())

    # fpdf2 always writes a creation date: take it out, so the output is a function of the
    # text alone, and the only Info entry left is the Producer.
    with pikepdf.open(io.BytesIO(drawn)) as out:
        info = pikepdf.Dictionary(Producer=pikepdf.String("broker"))
        out.trailer.Info = out.make_indirect(info)
        if "/Metadata" in out.Root:
            del out.Root.Metadata
        buffer = io.BytesIO()
        out.save(buffer, deterministic_id=True, compress_streams=True)
    return buffer.getvalue()
