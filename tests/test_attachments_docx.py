"""Word attachments: every paragraph shown in order, a phrase found wherever the file keeps
it, and the broker's own PDF rendering of approved text (no metadata, Unicode-safe)."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable

import pikepdf
import pytest
from docx import Document
from docx.oxml import parse_xml
from docx.oxml.ns import nsdecls

from broker.attachments import phrase_regex
from broker.attachments.docx import (
    DAMAGED,
    ENCRYPTED,
    OLD_DOC,
    docx_contains,
    printable,
    read_docx,
    render_text_pdf,
)
from broker.attachments.pdf import pdf_contains, read_pdf
from tests import pdfs
from tests.pdfs import SECRET, pdfium_text

CFB = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
CLEAN = "custody hearing"  # never in any of these files


def _save(doc) -> bytes:
    buffer = io.BytesIO()
    doc.save(buffer)
    return buffer.getvalue()


def _with_parts(data: bytes, parts: dict[str, bytes]) -> bytes:
    """``data`` with zip members added or replaced."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if info.filename not in parts:
                dst.writestr(info, src.read(info))
        for name, body in parts.items():
            dst.writestr(name, body, compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


W = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'


def _footnotes(text: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:footnotes {W}>'
        '<w:footnote w:type="separator" w:id="-1"><w:p><w:r><w:separator/></w:r></w:p>'
        '</w:footnote><w:footnote w:id="1"><w:p><w:r><w:t xml:space="preserve">'
        f"{text}</w:t></w:r></w:p></w:footnote></w:footnotes>"
    ).encode()


def _custom(name: str, value: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<Properties xmlns="http://schemas.openxmlformats.org/officeDocument/2006/'
        'custom-properties" xmlns:vt="http://schemas.openxmlformats.org/officeDocument/2006/'
        'docPropsVTypes"><property fmtid="{D5CDD505-2E9C-101B-9397-08002B2CF9AE}" pid="2" '
        f'name="{name}"><vt:lpwstr>{value}</vt:lpwstr></property></Properties>'
    ).encode()


def _deletion(text: str):
    return parse_xml(
        f'<w:del {nsdecls("w")} w:id="90" w:author="Dr Who" w:date="2024-01-01T00:00:00Z">'
        f'<w:r><w:delText xml:space="preserve">{text}</w:delText></w:r></w:del>'
    )


def full_docx() -> bytes:
    """Everything at once, each in a known place (see test_read_order)."""
    doc = Document()
    doc.core_properties.title = "Therapy letter"
    doc.core_properties.author = "Dr Who"
    doc.core_properties.keywords = "speech"
    doc.add_heading("Letter to school", 1)
    p = doc.add_paragraph("Intro: ")
    for piece in ("fam", "ily con", "flict", " noted."):
        p.add_run(piece)
    table = doc.add_table(rows=2, cols=2)
    for (r, c), text in {(0, 0): "A1", (0, 1): "B1", (1, 0): "A2", (1, 1): "B2"}.items():
        table.cell(r, c).text = text
    after = doc.add_paragraph("After the table. ")
    after._p.append(_deletion("struck words"))
    doc.sections[0].header.paragraphs[0].text = "Clinic letterhead"
    doc.sections[0].footer.paragraphs[0].text = "Page footer"
    doc.add_comment(after.runs[0], text="Check this", author="Dr Who", initials="DW")
    return _with_parts(_save(doc), {"word/footnotes.xml": _footnotes("A footnote.")})


def test_read_order() -> None:
    paragraphs, problem = read_docx(full_docx())
    assert problem is None
    assert paragraphs[:8] == (
        "Letter to school",
        "Intro: family conflict noted.",
        "A1",
        "B1",
        "A2",
        "B2",
        "After the table.",
        "Header: Clinic letterhead",
    )
    rest = paragraphs[8:]
    assert rest[:4] == (
        "Footer: Page footer",
        "Footnote: A footnote.",
        "Comment by Dr Who: Check this",
        "Deleted text (tracked change): struck words",
    )
    assert "Document property (title): Therapy letter" in rest
    assert "Document property (creator): Dr Who" in rest
    assert "Document property (keywords): speech" in rest


def test_tracked_insertions_are_current_text() -> None:
    doc = Document()
    p = doc.add_paragraph("Before ")
    p._p.append(
        parse_xml(
            f'<w:ins {nsdecls("w")} w:id="5" w:author="A" w:date="2024-01-01T00:00:00Z">'
            "<w:r><w:t>inserted</w:t></w:r></w:ins>"
        )
    )
    paragraphs, _ = read_docx(_save(doc))
    assert paragraphs[0] == "Before inserted"


# --- where a phrase can hide -----------------------------------------------------------------


def _body(text: str) -> bytes:
    doc = Document()
    doc.add_paragraph(text)
    return _save(doc)


def _split_runs() -> bytes:
    doc = Document()
    p = doc.add_paragraph("We discussed the ")
    for piece in ("fa", "mily c", "onfl", "ict"):
        p.add_run(piece).bold = True
    return _save(doc)


def _across_paragraphs() -> bytes:
    doc = Document()
    doc.add_paragraph("Notes on the family")
    doc.add_paragraph("conflict at home")
    return _save(doc)


def _split_runs_across_paragraphs() -> bytes:
    doc = Document()
    first = doc.add_paragraph("Notes on the ")
    first.add_run("fam")
    first.add_run("ily")
    second = doc.add_paragraph("con")
    second.add_run("flict at home")
    return _save(doc)


def _comment_author() -> bytes:
    doc = Document()
    p = doc.add_paragraph("Body text")
    doc.add_comment(p.runs[0], text="Fine", author=f"The {SECRET} team")
    return _save(doc)


def _table_cell() -> bytes:
    doc = Document()
    doc.add_paragraph("Summary table")
    doc.add_table(rows=1, cols=2).cell(0, 1).text = f"the {SECRET}"
    return _save(doc)


def _header() -> bytes:
    doc = Document()
    doc.add_paragraph("Body")
    doc.sections[0].header.paragraphs[0].text = f"Re: {SECRET}"
    return _save(doc)


def _footer() -> bytes:
    doc = Document()
    doc.add_paragraph("Body")
    doc.sections[0].footer.paragraphs[0].text = f"Re: {SECRET}"
    return _save(doc)


def _comment() -> bytes:
    doc = Document()
    p = doc.add_paragraph("Body text")
    doc.add_comment(p.runs[0], text=f"Mention the {SECRET}?", author="Reviewer")
    return _save(doc)


def _core(field: str) -> Callable[[], bytes]:
    def build() -> bytes:
        doc = Document()
        doc.add_paragraph("Body")
        setattr(doc.core_properties, field, f"On the {SECRET}")
        return _save(doc)

    return build


def _custom_property() -> bytes:
    return _with_parts(_body("Body"), {"docProps/custom.xml": _custom("Topic", SECRET)})


def _tracked_deletion() -> bytes:
    doc = Document()
    p = doc.add_paragraph("Clean sentence. ")
    p._p.append(_deletion(f"the {SECRET}"))
    return _save(doc)


def _footnote() -> bytes:
    return _with_parts(_body("Body"), {"word/footnotes.xml": _footnotes(f"See {SECRET}.")})


def _embedded_pdf() -> bytes:
    # The PDF keeps the phrase only in an old revision, in a compressed stream.
    return _with_parts(_body("Body"), {"word/embeddings/oleObject1.pdf": pdfs.old_revision_pdf()})


def _embedded_docx() -> bytes:
    return _with_parts(_body("Body"), {"word/embeddings/Doc1.docx": _split_runs()})


PLACES: dict[str, Callable[[], bytes]] = {
    "body": lambda: _body(f"At home: {SECRET}."),
    "split runs": _split_runs,
    "across paragraphs": _across_paragraphs,
    "split runs across paragraphs": _split_runs_across_paragraphs,
    "table cell": _table_cell,
    "header": _header,
    "footer": _footer,
    "comment": _comment,
    "comment author": _comment_author,
    "core title": _core("title"),
    "core subject": _core("subject"),
    "core keywords": _core("keywords"),
    "core author": _core("author"),
    "core comments": _core("comments"),
    "custom property": _custom_property,
    "tracked deletion": _tracked_deletion,
    "footnote": _footnote,
    "embedded pdf": _embedded_pdf,
    "embedded docx": _embedded_docx,
}


@pytest.mark.parametrize("place", list(PLACES))
def test_phrase_is_found_wherever_it_is(place: str) -> None:
    data = PLACES[place]()
    assert docx_contains(data, [SECRET]) is True
    assert docx_contains(data, ["FAMILY   conflict"]) is True
    assert docx_contains(data, [CLEAN]) is False


@pytest.mark.parametrize(
    "place", ["split runs", "across paragraphs", "split runs across paragraphs"]
)
def test_split_phrases_are_not_in_any_one_text_node(place: str) -> None:
    """The case is real: no single XML text node holds the phrase, yet it is found."""
    data = PLACES[place]()
    rx = phrase_regex([SECRET])
    assert rx is not None
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        xml = zf.read("word/document.xml").decode()
    nodes = re.findall(r"<w:t(?: [^>]*)?>([^<]*)</w:t>", xml)
    assert not any(rx.search(n.casefold()) for n in nodes)
    assert docx_contains(data, [SECRET]) is True


@pytest.mark.parametrize(
    "place",
    ["header", "footer", "comment", "comment author", "core title", "tracked deletion", "footnote"],
)
def test_what_the_file_carries_is_shown_to_the_parent(place: str) -> None:
    paragraphs, problem = read_docx(PLACES[place]())
    assert problem is None
    assert any(SECRET in p for p in paragraphs[1:]), paragraphs


def test_empty_phrases_match_nothing() -> None:
    assert docx_contains(full_docx(), []) is False
    assert docx_contains(full_docx(), [" "]) is False


# --- unreadable files ------------------------------------------------------------------------


def test_truncated_docx_is_damaged_and_fails_closed() -> None:
    data = full_docx()
    cut = data[: len(data) // 2]
    paragraphs, problem = read_docx(cut)
    assert paragraphs == ()
    assert problem is not None and problem.startswith(DAMAGED)
    assert docx_contains(cut, [CLEAN]) is True


def test_encrypted_and_old_word_files_are_reported() -> None:
    encrypted = CFB + b"\x00" * 500 + "EncryptionInfo".encode("utf-16-le") + b"\x00" * 100
    assert read_docx(encrypted) == ((), ENCRYPTED)
    assert docx_contains(encrypted, [CLEAN]) is True
    old = CFB + b"\x00" * 600
    assert read_docx(old) == ((), OLD_DOC)
    assert docx_contains(old, [CLEAN]) is True


@pytest.mark.parametrize(
    "data",
    [b"", b"not a zip", b"PK\x03\x04garbage", pdfs.report_pdf()],
    ids=["empty", "text", "bad-zip", "a-pdf"],
)
def test_garbage_is_reported_never_raised(data: bytes) -> None:
    paragraphs, problem = read_docx(data)
    assert paragraphs == () and problem is not None
    assert docx_contains(data, [CLEAN]) is True


def test_zip_without_a_document_is_damaged() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("hello.txt", "hi")
    assert read_docx(out.getvalue())[1] == f"{DAMAGED} (no document text in it)"


# --- render_text_pdf -------------------------------------------------------------------------


def _info(data: bytes) -> dict[str, str]:
    with pikepdf.open(io.BytesIO(data)) as pdf:
        assert "/Metadata" not in pdf.Root
        info = pdf.trailer.get("/Info")
        return {str(k): str(v) for k, v in (info.items() if info is not None else [])}


def test_rendered_pdf_has_the_text_page_numbers_and_only_our_producer() -> None:
    paragraphs = [f"Paragraph {i}: {pdfs.FILLER}" for i in range(1, 30)]
    out = render_text_pdf(paragraphs, heading="Attachment A1: letter.docx")
    text = " ".join(pdfium_text(out).split())
    assert text.startswith("Attachment A1: letter.docx")
    pages = len(read_pdf(out).pages)
    assert pages >= 2
    for n in range(1, pages + 1):
        assert f"Page {n} of {pages}" in text
    body = " ".join(re.sub(r"Page \d+ of \d+", " ", text).split())
    for paragraph in paragraphs:
        assert paragraph in body
    assert _info(out) == {"/Producer": "broker"}
    assert b"CreationDate" not in out and b"fpdf" not in out.lower()
    assert out == render_text_pdf(paragraphs, heading="Attachment A1: letter.docx")


def test_rendering_approved_docx_text_carries_none_of_the_original_metadata() -> None:
    doc = Document()
    doc.core_properties.title = "Confidential title"
    doc.core_properties.author = "Dr Who"
    doc.add_paragraph("Sam is doing well in class.")
    paragraphs, _ = read_docx(_save(doc))
    body = [p for p in paragraphs if not p.startswith("Document property")]
    out = render_text_pdf(body)
    assert pdf_contains(out, ["Sam is doing well"]) is True
    assert pdf_contains(out, ["Confidential title"]) is False
    assert pdf_contains(out, ["Dr Who"]) is False
    assert pdf_contains(out, ["python-docx"]) is False


def test_unicode_is_shown_or_replaced_never_raised() -> None:
    text = "Zoë’s “plan” – €5 • Łódź 日本 🙂 a\u200bb \x07bell \ud800 tab\tend"
    out = render_text_pdf([text, "x" * 400], heading="Ünïcode")
    shown = " ".join(pdfium_text(out).split())
    assert "Zoë’s “plan” – €5 • Lódz ?? ? ab bell ? tab end" in shown
    assert "Ünïcode" in shown
    assert "x" * 60 in shown  # a word longer than the line is broken, not lost
    assert printable("Łódź") == "Lódz"  # ó is in Windows-1252; Ł and ź are not


def test_empty_input_still_renders_a_page() -> None:
    out = render_text_pdf([])
    assert len(read_pdf(out).pages) == 1


def test_escaped_characters_are_matched_as_the_reader_sees_them() -> None:
    doc = Document()
    p = doc.add_paragraph("Referred by Lee & Park clinic")
    doc.add_comment(p.runs[0], text="ok", author="O'Brien & Sons")
    data = _save(doc)
    assert docx_contains(data, ["lee & park"]) is True
    assert docx_contains(data, ["o'brien & sons"]) is True  # only in an attribute
