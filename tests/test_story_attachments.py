"""Stories of attachments: a provider attaches a PDF or a Word file -> the parent reads it in
the review request, numbered page by page -> redacts a phrase, a paragraph or a page by
email -> the preview carries the attachment exactly as it would go out -> APPROVE -> the
school receives a file with no trace of what was removed.
"""

from __future__ import annotations

import email
import hashlib
import io
import re
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli.main import cli
from tests import pdfs
from tests.harness import DOMAIN, World, reply_to, report

fpdf = pytest.importorskip("fpdf")
pdfium = pytest.importorskip("pypdfium2")
pikepdf = pytest.importorskip("pikepdf")
docx = pytest.importorskip("docx")

SECRET = "family conflict"
SCHOOL = ("park@school.example", "ortiz@school.example")


def make_pdf(pages: list[list[str]], *, title: str = "OT report") -> bytes:
    doc = fpdf.FPDF()
    doc.set_title(title)
    doc.set_author("Dr. Lee")
    doc.set_font("Helvetica", size=11)
    for paragraphs in pages:
        doc.add_page()
        for text in paragraphs:
            doc.multi_cell(0, 6, text)
            doc.ln(8)
    return bytes(doc.output())


THREE_PAGES = [
    ["Occupational therapy report for Sam, spring term.",
     f"Sam spoke about {SECRET} at home during the first session."],
    ["Handwriting: letters are better formed and spacing has improved.",
     "Scissor skills: cuts along curved lines with support."],
    ["Recommendations: slant board, pencil grip, short breaks.",
     f"Note: the {SECRET} seems to affect Sam's sleep."],
]


def make_docx(paragraphs: list[str]) -> bytes:
    d = docx.Document()
    for text in paragraphs:
        d.add_paragraph(text)
    d.core_properties.title = f"Notes on {SECRET}"
    out = io.BytesIO()
    d.save(out)
    return out.getvalue()


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def post(world: World, *attachments: tuple[str, str, bytes]) -> None:
    world.send(report("OT report", "Please find the report attached.",
                      attachments=attachments), "lee@clinic.example", f"sam@{DOMAIN}")


def answer(world: World, msg, text: str) -> None:
    world.send(reply_to(msg, text), "dana@home.example", str(msg.msg["Reply-To"]))


def attachments_of(msg: EmailMessage) -> dict[str, tuple[str, bytes]]:
    """filename -> (content type, bytes) of the attachments as the recipient opens them."""
    inner = msg
    out = {}
    for part in inner.iter_attachments():
        out[part.get_filename()] = (part.get_content_type(), part.get_payload(decode=True))
    return out


def release_copy(world: World) -> EmailMessage:
    got = world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL
                         and not str(m.msg["Subject"]).startswith("["))[0]
    return email.message_from_bytes(got.data, policy=policy.default)


def pdf_text(data: bytes) -> str:
    pdf = pdfium.PdfDocument(data)
    try:
        return "\n".join(pdf[i].get_textpage().get_text_range() for i in range(len(pdf)))
    finally:
        pdf.close()


def every_string(data: bytes) -> str:
    """Every string and decoded stream in the file, and its metadata (pikepdf)."""
    parts: list[str] = []
    with pikepdf.open(io.BytesIO(data)) as pdf:
        parts.extend(str(v) for v in pdf.docinfo.values())
        for obj in pdf.objects:
            if isinstance(obj, pikepdf.String):
                parts.append(str(obj))
            elif isinstance(obj, pikepdf.Stream):
                try:
                    parts.append(obj.read_bytes().decode("latin-1"))
                except pikepdf.PdfError:
                    parts.append(obj.read_raw_bytes().decode("latin-1"))
            elif isinstance(obj, pikepdf.Dictionary):
                parts.append(repr(obj))
    return "\n".join(parts)


def absent(phrase: str, text: str) -> bool:
    rx = re.compile(r"\s+".join(map(re.escape, phrase.split())), re.I)
    return rx.search(text) is None


def test_pdf_is_numbered_page_by_page_and_a_phrase_is_removed_for_real(world: World) -> None:
    """provider sends a 3-page PDF -> review lists A1 p.1.. with numbered paragraphs ->
    REDACT "family conflict" -> preview carries the rebuilt PDF -> APPROVE -> the school's
    PDF holds the phrase nowhere (text, strings, streams, metadata) and has 3 pages."""
    original = make_pdf(THREE_PAGES, title=f"About {SECRET}")
    post(world, ("ot-report.pdf", "application/pdf", original))
    review = world.review()
    text = review.text().replace("\r\n", "\n")
    assert "A1 ot-report.pdf, application/pdf" in text and "3 pages" in text
    assert "--- A1 p.1 ---" in text and "--- A1 p.3 ---" in text
    assert re.search(r"\[A1\.3\] Handwriting: letters are better formed", text)

    answer(world, review, f'REDACT "{SECRET}"')
    preview = world.notice("Preview, please confirm")
    assert "rebuilt from pictures of its 3 pages" in " ".join(preview.text().split())
    shown = attachments_of(preview.msg)
    assert shown["ot-report.pdf"][0] == "application/pdf"
    previewed = shown["ot-report.pdf"][1]

    answer(world, preview, "APPROVE")
    copy = release_copy(world)
    sent_type, sent = attachments_of(copy)["ot-report.pdf"]
    assert sent_type == "application/pdf"
    assert sent == previewed  # the preview showed exactly what went out
    assert sent != original
    assert absent(SECRET, pdf_text(sent))
    assert absent(SECRET, every_string(sent))
    assert absent(SECRET, sent.decode("latin-1"))
    with pikepdf.open(io.BytesIO(sent)) as pdf:
        assert len(pdf.pages) == 3
        assert "/Title" not in pdf.docinfo and "/Author" not in pdf.docinfo
        assert "/Metadata" not in pdf.Root
        assert all("/Annots" not in page.obj for page in pdf.pages)
    # The same checks as every unit-tested redaction: pypdfium2 and pdfminer text, every
    # object, the raw bytes, and black pixels where the phrase was on pages 1 and 3 while
    # the handwriting paragraph on page 2 stays readable.
    pdfs.assert_clean_redaction(
        sent, [SECRET], page_count=3, original_info=["Dr. Lee"],
        blacked=pdfs.phrase_regions(original, 1, SECRET) + pdfs.phrase_regions(original, 3,
                                                                                 SECRET),
        untouched=pdfs.phrase_regions(original, 2, "letters are better formed"))
    # The accounting of disclosures describes the file sent: its pages and its hash.
    world.wait_state("released")
    result = CliRunner().invoke(cli, ["audit", "report", "--child", "sam", "--format", "csv",
                                      "--home", str(world.home)])
    assert result.exit_code == 0, result.output
    assert "3 pages" in result.output
    assert hashlib.sha256(sent).hexdigest() in result.output


def test_a_whole_page_is_removed(world: World) -> None:
    post(world, ("ot-report.pdf", "application/pdf", make_pdf(THREE_PAGES)))
    review = world.review()
    answer(world, review, "REDACT A1 p.2")
    preview = world.notice("Preview, please confirm")
    assert "Removed page 2 of attachment A1" in preview.text()
    answer(world, preview, "APPROVE")
    sent = attachments_of(release_copy(world))["ot-report.pdf"][1]
    # The removed page carries none of its text; the page count stays (page 2 is blank).
    rendered = pdfium.PdfDocument(sent)
    try:
        assert len(rendered) == 3
        page2 = rendered[1].render(scale=0.5).to_pil().convert("L")
        page1 = rendered[0].render(scale=0.5).to_pil().convert("L")
    finally:
        rendered.close()
    dark = lambda img: sum(1 for v in img.tobytes() if v < 128)  # noqa: E731
    # Page 1 keeps its text (dark glyphs); page 2 is either blanked or fully blacked out:
    # no glyph-like mix of ink and paper remains. Compare with the original's page 2.
    src = pdfium.PdfDocument(make_pdf(THREE_PAGES))
    try:
        original2 = src[1].render(scale=0.5).to_pil().convert("L")
    finally:
        src.close()
    assert dark(page1) > 0
    assert page2.tobytes() != original2.tobytes()
    assert absent("Scissor skills", every_string(sent))


def test_an_untouched_pdf_passes_as_it_came(world: World) -> None:
    original = make_pdf(THREE_PAGES)
    post(world, ("ot-report.pdf", "application/pdf", original))
    answer(world, world.review(), "APPROVE")
    assert attachments_of(release_copy(world))["ot-report.pdf"][1] == original


def test_a_large_pdf_is_stored_apart_and_passes_as_it_came(world: World) -> None:
    """A scanned-size PDF (over the size kept inside the document) reaches the school
    byte for byte, read back from where it was stored apart."""
    import random

    from PIL import Image

    from broker.content.codec import SEPARATE_ABOVE

    noise = Image.frombytes("RGB", (400, 400), random.Random(7).randbytes(400 * 400 * 3))
    doc = fpdf.FPDF()
    doc.add_page()
    doc.set_font("Helvetica", size=11)
    doc.multi_cell(0, 6, "Handwriting sample, scanned.")
    doc.image(noise, x=10, y=30, w=150)
    original = bytes(doc.output())
    assert len(original) > SEPARATE_ABOVE
    post(world, ("scan.pdf", "application/pdf", original))
    answer(world, world.review(), "APPROVE")
    assert attachments_of(release_copy(world))["scan.pdf"][1] == original


def test_an_encrypted_pdf_is_never_sent(world: World) -> None:
    doc = fpdf.FPDF()
    doc.set_encryption(owner_password="owner", user_password="secret")
    doc.add_page()
    doc.set_font("Helvetica", size=11)
    doc.multi_cell(0, 6, "Locked report")
    locked = bytes(doc.output())
    post(world, ("locked.pdf", "application/pdf", locked),
         ("ot-report.pdf", "application/pdf", make_pdf(THREE_PAGES)))
    review = world.review()
    text = " ".join(review.text().split())
    assert "A1 locked.pdf" in text and "it cannot be checked, so it is never sent" in text
    answer(world, review, "APPROVE")
    files = attachments_of(release_copy(world))
    assert "locked.pdf" not in files and "ot-report.pdf" in files


def test_word_file_with_a_removed_paragraph_goes_as_a_broker_made_pdf(world: World) -> None:
    paragraphs = ["Speech goals for the term.", f"Sam mentioned {SECRET} twice.",
                  "Practise the s sound daily."]
    post(world, ("notes.docx",
                 "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                 make_docx(paragraphs)))
    review = world.review()
    text = review.text()
    assert "[A1.2] Sam mentioned family conflict twice." in text
    answer(world, review, "REDACT A1.2")
    preview = world.notice("Preview, please confirm")
    assert "PDF the broker made from the approved text" in " ".join(preview.text().split())
    answer(world, preview, "APPROVE")
    files = attachments_of(release_copy(world))
    assert "notes.docx" not in files
    kind, data = files["notes.pdf"]
    assert kind == "application/pdf"
    out = pdf_text(data)
    assert "Speech goals for the term." in out and "Practise the s sound daily." in out
    assert absent("Sam mentioned", out) and absent("Sam mentioned", every_string(data))
    # The file's properties were listed to the parent; the broker-made PDF leaves them out
    # (its title named the secret) and the preview said so.
    assert "Document property" not in out and absent(SECRET, every_string(data))
    assert "document properties of A1" in " ".join(preview.text().split())


def test_word_file_phrase_removed_everywhere_even_in_its_properties(world: World) -> None:
    post(world, ("notes.docx",
                 "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                 make_docx(["Speech goals for the term.", f"Sam mentioned {SECRET}."])))
    answer(world, world.review(), f'REDACT "{SECRET}"')
    preview = world.notice("Preview, please confirm")
    answer(world, preview, "APPROVE")
    _kind, data = attachments_of(release_copy(world))["notes.pdf"]
    out = pdf_text(data)
    assert "Speech goals for the term." in out
    assert absent(SECRET, out) and absent(SECRET, every_string(data))


def test_word_file_without_changes_passes_as_it_came(world: World) -> None:
    original = make_docx(["Speech goals for the term.", "Practise the s sound daily."])
    post(world, ("notes.docx",
                 "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                 original))
    answer(world, world.review(), "APPROVE")
    assert attachments_of(release_copy(world))["notes.docx"][1] == original


def test_a_long_report_is_summarised_with_the_full_text_attached(world: World) -> None:
    pages = [[f"Page {n} paragraph {k}: Sam practised handwriting and scissor skills."
              for k in range(1, 4)] for n in range(1, 21)]
    post(world, ("long.pdf", "application/pdf", make_pdf(pages)))
    review = world.review()
    text = review.text().replace("\r\n", "\n")
    assert "20 pages" in text and "Long document" in text
    assert "A1 p.20: [A1.58-A1.60] Page 20 paragraph 1" in text
    assert "Page 7 paragraph 2" not in text  # only first lines in the mail
    full = attachments_of(review.msg)["A1-full-text.txt"][1].decode()
    assert "--- A1 p.7 ---" in full and "[A1.20] Page 7 paragraph 2" in full
