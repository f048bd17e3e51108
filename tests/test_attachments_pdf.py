"""PDF attachments: what the parent is shown, what a search finds, what a redaction leaves.

Every redacted PDF goes through ``assert_clean_redaction`` (tests/pdfs.py): no text layer
for PDFium or pdfminer, the phrase in no object, string, stream, metadata or raw byte, no
annotations, embedded files, XMP or Info entries, and, on the rendered pages, black where
the phrase's characters were and readable text where a control word was.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pikepdf
import pypdfium2 as pdfium
import pytest

from broker.attachments import bytes_contain, phrase_regex
from broker.attachments.pdf import (
    ENCRYPTED,
    PdfPage,
    PdfReading,
    PdfRedactionError,
    pdf_contains,
    read_pdf,
    redact_pdf,
)
from broker.redact.text import contains_phrase
from tests import pdfs
from tests.pdfs import (
    CONTROL,
    FILLER,
    REPORT_PAGES,
    SECRET,
    Region,
    assert_clean_redaction,
    dark_fraction,
    ink_fraction,
    phrase_regions,
    word_regions,
)


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def report() -> bytes:
    return pdfs.report_pdf(info=True)


# --- read_pdf -------------------------------------------------------------------------------


def test_report_pages_and_paragraphs_in_order(report: bytes) -> None:
    reading = read_pdf(report)
    assert reading.problem is None
    assert [p.number for p in reading.pages] == [1, 2, 3, 4]
    for page, expected in zip(reading.pages, REPORT_PAGES, strict=True):
        assert page.paragraphs == tuple(_norm(t) for t in expected), f"page {page.number}"
        assert page.scanned is False


def test_reading_is_plain_frozen_data(report: bytes) -> None:
    reading = read_pdf(report)
    assert isinstance(reading, PdfReading)
    assert all(isinstance(p, PdfPage) for p in reading.pages)
    with pytest.raises(AttributeError):
        reading.pages[0].number = 9  # type: ignore[misc]


def test_phrase_broken_across_lines_is_one_paragraph_with_single_spaces(report: bytes) -> None:
    page4 = read_pdf(report).pages[3]
    assert "the family conflict should" in page4.paragraphs[1]
    assert "\n" not in page4.paragraphs[1] and "  " not in page4.paragraphs[1]


def test_scanned_page_is_flagged_and_has_no_paragraphs() -> None:
    reading = read_pdf(pdfs.scanned_pdf())
    assert reading.problem is None
    assert [p.scanned for p in reading.pages] == [False, True, False]
    assert reading.pages[1].paragraphs == ()
    assert reading.pages[0].paragraphs[0] == "Cover letter"


def test_rotated_page_reads_like_the_upright_one() -> None:
    upright = read_pdf(pdfs.report_pdf(REPORT_PAGES[:1])).pages[0].paragraphs
    assert read_pdf(pdfs.rotated_pdf()).pages[0].paragraphs == upright


def test_encrypted_pdf_is_reported_not_raised() -> None:
    reading = read_pdf(pdfs.encrypted_pdf())
    assert reading == PdfReading(pages=(), problem=ENCRYPTED)


def test_owner_password_only_pdf_opens_and_reads() -> None:
    reading = read_pdf(pdfs.owner_only_encrypted_pdf())
    assert reading.problem is None
    assert reading.pages[0].paragraphs == (f"The {SECRET} is mentioned here.",)


def test_truncated_pdf_is_reported_damaged() -> None:
    reading = read_pdf(pdfs.broken_pdf())
    assert reading.pages == ()
    assert reading.problem is not None and reading.problem.startswith("damaged")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is not a PDF",
        b"%PDF-1.7\n",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
        bytes(range(256)) * 20,
    ],
    ids=["empty", "text", "header-only", "no-pages", "binary"],
)
def test_garbage_is_reported_never_raised(data: bytes) -> None:
    reading = read_pdf(data)
    assert reading.pages == ()
    assert reading.problem is not None and reading.problem.startswith("damaged")


def test_every_truncation_point_reads_or_reports(report: bytes) -> None:
    for cut in range(0, len(report), max(1, len(report) // 40)):
        reading = read_pdf(report[:cut])
        assert (reading.problem is None) != (reading.pages == ())


def test_too_many_pages_is_a_problem(report: bytes) -> None:
    reading = read_pdf(report, max_pages=3)
    assert reading.pages == ()
    assert reading.problem == "too long: 4 pages (at most 3 can be reviewed)"


def test_old_revision_text_is_not_shown_as_current() -> None:
    reading = read_pdf(pdfs.old_revision_pdf())
    assert reading.pages[0].paragraphs == ("Revised: nothing sensitive here.",)


# --- the real PDFs in the shared mail corpus ----------------------------------------------


def _corpus() -> list[tuple[str, bytes]]:
    found = pdfs.corpus_pdfs()
    if not found:
        pytest.skip(f"no PDF attachments under {pdfs.CORPUS_EMAILS} (shared corpus absent)")
    return found


def test_corpus_pdfs_are_reported_damaged_and_fail_closed() -> None:
    for name, data in _corpus():
        reading = read_pdf(data)
        assert reading.pages == () and reading.problem, name
        assert reading.problem.startswith("damaged"), (name, reading.problem)
        assert pdf_contains(data, ["anything at all"]) is True, name
        with pytest.raises(PdfRedactionError):
            redact_pdf(data, phrases=["anything"])


# --- pdf_contains ---------------------------------------------------------------------------


def test_phrase_rule_is_the_one_the_text_redactor_uses() -> None:
    samples = [
        ("Family\n  CONFLICT at home", "family conflict"),
        ("STRASSE", "straße"),
        ("family-conflict", "family conflict"),
        ("familyconflict", "family conflict"),
        ("the fam ily", "family"),
    ]
    for text, phrase in samples:
        rx = phrase_regex([phrase])
        assert rx is not None
        assert bool(rx.search(text.casefold())) == contains_phrase(text, phrase), (text, phrase)


def test_clean_file_does_not_contain_an_absent_phrase(report: bytes) -> None:
    assert pdf_contains(report, ["custody hearing"]) is False
    assert pdf_contains(pdfs.metadata_pdf(), ["custody hearing"]) is False
    assert pdf_contains(report, []) is False
    assert pdf_contains(report, ["   "]) is False


def test_page_text_is_found_whitespace_flexibly(report: bytes) -> None:
    assert pdf_contains(report, ["FAMILY   Conflict"]) is True
    broken_only = pdfs.report_pdf(REPORT_PAGES[3:])
    assert pdf_contains(broken_only, ["family conflict"]) is True


HIDDEN = {
    "metadata": pdfs.metadata_pdf,
    "xmp": pdfs.xmp_only_pdf,
    "annotation": pdfs.annotation_pdf,
    "highlight": pdfs.highlight_pdf,
    "embedded file": pdfs.embedded_pdf,
    "bookmark": pdfs.bookmark_pdf,
    "form field": pdfs.form_field_pdf,
    "old revision": pdfs.old_revision_pdf,
    "old revision, kerned": pdfs.kerned_pdf,
    "annotation appearance": pdfs.appearance_annotation_pdf,
    "orphan object": pdfs.orphan_object_pdf,
    "encrypted title": lambda: pdfs.owner_only_encrypted_pdf(FILLER, title=f"On the {SECRET}"),
}


@pytest.fixture(scope="module")
def font_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("font")


def _hidden(where: str, font_dir: Path) -> bytes:
    if where == "old revision, glyph ids":
        return pdfs.old_revision_cid_pdf(font_dir)
    return HIDDEN[where]()


HIDDEN_ALL = [*HIDDEN, "old revision, glyph ids"]


@pytest.mark.parametrize("where", HIDDEN_ALL)
def test_phrase_outside_the_page_text_is_found(where: str, font_dir: Path) -> None:
    data = _hidden(where, font_dir)
    shown = [t for page in read_pdf(data).pages for t in page.paragraphs]
    assert not any(contains_phrase(t, SECRET) for t in shown), "the page text must be clean"
    assert pdf_contains(data, [SECRET]) is True
    assert pdf_contains(data, ["custody hearing"]) is False


@pytest.mark.parametrize(
    "where",
    [
        "embedded file",
        "old revision",
        "old revision, kerned",
        "old revision, glyph ids",
        "orphan object",
        "annotation appearance",
        "encrypted title",
    ],
)
def test_phrases_a_byte_search_misses_are_still_found(where: str, font_dir: Path) -> None:
    data = _hidden(where, font_dir)
    rx = phrase_regex([SECRET])
    assert rx is not None
    assert not bytes_contain(data, rx), "this case must hide the phrase from a byte search"
    assert pdf_contains(data, [SECRET]) is True


def test_embedded_pdf_inside_a_pdf_is_searched() -> None:
    inner = pdfs.report_pdf(((("Inner"), f"Only in here: {SECRET}."),))
    data = pdfs.embedded_pdf(payload=inner)
    assert pdf_contains(data, [SECRET]) is True
    assert pdf_contains(data, ["custody hearing"]) is False


def test_unsearchable_files_fail_closed() -> None:
    assert pdf_contains(pdfs.encrypted_pdf(), ["custody hearing"]) is True
    assert pdf_contains(pdfs.broken_pdf(), ["custody hearing"]) is True
    assert pdf_contains(b"not a pdf", ["custody hearing"]) is True


def test_owner_only_encryption_is_searched_not_assumed() -> None:
    data = pdfs.owner_only_encrypted_pdf()
    assert pdf_contains(data, [SECRET]) is True
    assert pdf_contains(data, ["custody hearing"]) is False


# --- redact_pdf -----------------------------------------------------------------------------


def _paragraph_region(original: bytes, page: int, text: str) -> list[Region]:
    """Display regions of the characters of ``text`` (a whole paragraph) on ``page``."""
    return phrase_regions(original, page, text)


def test_redacted_report_passes_every_check(report: bytes) -> None:
    out = redact_pdf(report, phrases=[SECRET], paragraphs={2: [1]}, pages=[3])
    blacked = (
        phrase_regions(report, 1, SECRET)
        + phrase_regions(report, 4, SECRET)  # broken over two lines: boxes on both
        + _paragraph_region(report, 2, REPORT_PAGES[1][1])
    )
    untouched = (
        word_regions(report, 1, CONTROL)
        + word_regions(report, 2, "Sessions and goals")
        + word_regions(report, 2, "Goal one")
        + word_regions(report, 4, "should be shared")
    )
    assert_clean_redaction(
        out,
        [SECRET, "Mother reports", "Notes from the family meeting"],
        page_count=4,
        blacked=blacked,
        untouched=untouched,
        original_info=["Therapy report", "Dr. Example", "PyFPDF", "fpdf2"],
    )
    # The removed page keeps nothing of the original: where its text was is blank paper.
    for region in phrase_regions(report, 3, "Notes from the family meeting"):
        assert ink_fraction(out, region) == 0.0


def test_phrase_broken_across_lines_is_boxed_on_both_lines(report: bytes) -> None:
    regions = phrase_regions(report, 4, SECRET)
    assert len(word_regions(report, 4, SECRET)) == 2, "the test PDF must break the phrase"
    out = redact_pdf(report, phrases=["FAMILY conflict"])
    for region in regions:
        assert dark_fraction(out, region) > 0.97
    for run in word_regions(report, 4, SECRET):  # and no anti-aliased fringe around it
        fringe = Region(run.page, run.x0 - 1, run.y0 - 1, run.x1 + 1, run.y1 + 1)
        assert dark_fraction(out, fringe) > 0.97


def test_paragraph_indexes_are_read_pdf_numbering(report: bytes) -> None:
    shown = read_pdf(report).pages[0].paragraphs
    out = redact_pdf(report, paragraphs={1: [2]})
    assert_clean_redaction(
        out,
        [shown[2]],
        page_count=4,
        blacked=_paragraph_region(report, 1, shown[2]),
        untouched=word_regions(report, 1, shown[1][:40]) + word_regions(report, 1, shown[3]),
    )


def test_phrase_running_over_a_page_break_is_boxed_on_both_pages() -> None:
    original = pdfs.report_pdf(
        (("Intro", f"{pdfs.FILLER} The team then discussed the family"), ("conflict", "More."))
    )
    out = redact_pdf(original, phrases=[SECRET])
    assert_clean_redaction(
        out,
        [SECRET],
        page_count=2,
        blacked=phrase_regions(original, 1, "the family")[-1:]
        + phrase_regions(original, 2, "conflict"),
        untouched=word_regions(original, 2, "More."),
    )


@pytest.mark.parametrize("where", HIDDEN_ALL)
def test_phrase_outside_the_page_text_is_gone_from_the_redaction(
    where: str, font_dir: Path
) -> None:
    original = _hidden(where, font_dir)
    out = redact_pdf(original, phrases=[SECRET])
    pages = len(pdfium.PdfDocument(original))
    assert_clean_redaction(out, [SECRET, "notes.txt"], page_count=pages)
    assert pdf_contains(out, [SECRET]) is False


def test_annotation_appearance_is_not_drawn() -> None:
    original = pdfs.appearance_annotation_pdf()
    doc = pdfium.PdfDocument(original)
    height = doc[0].get_height()
    shown = doc[0].render(scale=2, draw_annots=True).to_pil().convert("L")
    box = (72 * 2, int((height - 430) * 2), 372 * 2, int((height - 400) * 2))
    assert sum(shown.crop(box).histogram()[:100]) > 200, "a viewer shows the note"
    out = redact_pdf(original)
    assert ink_fraction(out, Region(1, 72, height - 430, 372, height - 400)) == 0.0
    assert_clean_redaction(out, [SECRET], page_count=1)


def test_annotations_and_form_fields_are_not_drawn() -> None:
    original = pdfs.form_field_pdf()
    out = redact_pdf(original)
    # The widget's rectangle (100,100)-(300,130) in page space: nothing drawn there.
    doc = pdfium.PdfDocument(original)
    height = doc[0].get_height()
    region = Region(1, 100, height - 130, 300, height - 100)
    assert ink_fraction(out, region) == 0.0
    assert_clean_redaction(out, [SECRET], page_count=1)


def test_rotated_page_is_boxed_where_the_phrase_is_shown() -> None:
    original = pdfs.rotated_pdf()
    out = redact_pdf(original, phrases=[SECRET])
    blacked = phrase_regions(original, 1, SECRET)
    (run,) = word_regions(original, 1, SECRET)
    assert run.y1 - run.y0 > 5 * (run.x1 - run.x0), "the phrase must run down the page"
    assert_clean_redaction(
        out,
        [SECRET],
        page_count=1,
        blacked=blacked,
        untouched=word_regions(original, 1, CONTROL),
    )


def test_scanned_page_can_only_be_removed_whole() -> None:
    original = pdfs.scanned_pdf()
    assert read_pdf(original).pages[1].scanned
    out = redact_pdf(original, pages=[2])
    assert_clean_redaction(
        out,
        [SECRET, "Scanned page"],
        page_count=3,
        untouched=word_regions(original, 1, "Cover letter"),
    )
    doc = pdfium.PdfDocument(original)
    width = doc[1].get_width()
    image_area = Region(2, 60, 60, width - 60, 200)
    assert ink_fraction(original, image_area) > 0.01, "the scan must draw something there"
    assert ink_fraction(out, image_area) == 0.0


def test_page_sizes_dpi_and_determinism(report: bytes) -> None:
    out = redact_pdf(report, phrases=[SECRET], dpi=100)
    assert out == redact_pdf(report, phrases=[SECRET], dpi=100)
    with pikepdf.open(io.BytesIO(report)) as src, pikepdf.open(io.BytesIO(out)) as dst:
        for a, b in zip(src.pages, dst.pages, strict=True):
            assert [round(float(v), 2) for v in a.mediabox] == [
                round(float(v), 2) for v in b.mediabox
            ]
            (image,) = list(b.Resources.XObject.values())
            assert abs(image.Width - float(a.mediabox[2]) * 100 / 72) <= 1


def test_redaction_output_never_quotes_the_input_metadata(report: bytes) -> None:
    out = redact_pdf(report)
    with pikepdf.open(io.BytesIO(out)) as pdf:
        assert set(pdf.trailer.keys()) <= {"/Root", "/Size", "/ID"}
        assert set(pdf.Root.keys()) == {"/Type", "/Pages"}
    assert re.search(rb"Producer|Creator|Author|Title|CreationDate", out) is None


@pytest.mark.parametrize(
    "make", [pdfs.encrypted_pdf, pdfs.broken_pdf, lambda: b"junk"], ids=["enc", "cut", "junk"]
)
def test_unreadable_input_raises(make) -> None:
    with pytest.raises(PdfRedactionError):
        redact_pdf(make(), phrases=[SECRET])


def test_requests_for_parts_that_do_not_exist_raise(report: bytes) -> None:
    with pytest.raises(PdfRedactionError, match="page 5"):
        redact_pdf(report, pages=[5])
    with pytest.raises(PdfRedactionError, match="page 0"):
        redact_pdf(report, paragraphs={0: [0]})
    with pytest.raises(PdfRedactionError, match="no paragraph 5"):
        redact_pdf(report, paragraphs={1: [4]})


def test_large_inputs_are_searched_across_window_boundaries() -> None:
    rx = phrase_regex([SECRET])
    assert rx is not None
    size = 9 * 1024 * 1024
    for where in (0, 4 * 1024 * 1024 - 7, 8 * 1024 * 1024 + 1, size - 40):
        for encoded in (SECRET.encode(), SECRET.encode("utf-16-le")):
            data = bytearray(b"x" * size)
            data[where : where + len(encoded)] = encoded
            assert bytes_contain(bytes(data), rx), (where, encoded[:4])
    assert not bytes_contain(b"x" * size, rx)


def test_two_occurrences_on_one_line_leave_the_words_between_them() -> None:
    original = pdfs.report_pdf(
        (("Twice", f"The {SECRET}, said the teacher, and again the {SECRET}."),)
    )
    assert len(word_regions(original, 1, SECRET)) == 2
    out = redact_pdf(original, phrases=[SECRET])
    assert_clean_redaction(
        out,
        [SECRET],
        page_count=1,
        blacked=phrase_regions(original, 1, SECRET),
        untouched=word_regions(original, 1, "said the teacher"),
    )


def test_a_poster_sized_page_is_rendered_within_the_pixel_cap() -> None:
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=(5000, 5000))
    pdf.add_page()
    pdf.set_font("Helvetica", size=40)
    pdf.text(200, 200, f"Poster about the {SECRET}")
    original = bytes(pdf.output())
    out = redact_pdf(original, phrases=[SECRET])
    with pikepdf.open(io.BytesIO(out)) as result:
        (image,) = list(result.pages[0].Resources.XObject.values())
        assert image.Width * image.Height <= 20_000_000
        assert [float(v) for v in result.pages[0].mediabox] == [0, 0, 5000, 5000]
    assert_clean_redaction(out, [SECRET], page_count=1)
    for run in word_regions(original, 1, SECRET):
        assert dark_fraction(out, run, scale=0.5) > 0.97
