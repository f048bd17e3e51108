"""Test PDFs built on the spot (fpdf2, pikepdf, Pillow), and the checks every redacted PDF
must pass. Shared by the PDF and Word attachment tests and the benchmark.

Each builder returns bytes. The secret phrase is ``SECRET`` unless told otherwise; the text
around it is ordinary report prose, so a check that finds nothing is meaningful.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import email
import io
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from email import policy
from pathlib import Path

import pikepdf
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from fpdf import FPDF
from PIL import Image, ImageDraw, ImageFont

SECRET = "family conflict"
CONTROL = "articulation"  # a word that stays on page 1 of report_pdf
REPO = Path(__file__).resolve().parents[1]
CORPUS_EMAILS = REPO.parent / "shared" / "corpus" / "mime" / "mikel-mail" / "attachment_emails"

FIXED_DATE = dt.datetime(2024, 3, 1, 9, 30, tzinfo=dt.UTC)

FILLER = (
    "Sam attended twelve sessions this term. Progress with articulation has been steady, "
    "and the home practice sheets were returned most weeks. Sam now uses two-step "
    "instructions in class without prompting and asks for help when a task is unclear."
)
FILLER_2 = (
    "Recommendations for school: seat Sam near the front, check understanding after "
    "instructions, and allow extra processing time before expecting an answer."
)


def _doc() -> FPDF:
    pdf = FPDF(format="A4")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_margins(20, 20, 20)
    pdf.set_auto_page_break(auto=True, margin=20)
    return pdf


def _heading(pdf: FPDF, text: str) -> None:
    pdf.set_font("Helvetica", style="B", size=16)
    pdf.multi_cell(0, 8, text)
    pdf.ln(4)
    pdf.set_font("Helvetica", size=11)


def _para(pdf: FPDF, text: str) -> None:
    pdf.multi_cell(0, 5.5, text)
    pdf.ln(4)


# Page layout of report_pdf, as read_pdf must number it (0-based paragraph indexes).
REPORT_PAGES: tuple[tuple[str, ...], ...] = (
    (
        "Speech and language therapy report",
        FILLER,
        f"At home there has been some {SECRET} this autumn, which may explain tired mornings.",
        FILLER_2,
    ),
    (
        "Sessions and goals",
        FILLER_2,
        "Goal one: Sam will retell a short story in the right order with two prompts.",
    ),
    (
        "Notes from the family meeting",
        f"Mother reports that the {SECRET} has eased since October.",
        FILLER,
    ),
    (
        "Summary",
        # The line break inside this paragraph falls between the two words of the secret.
        "The team discussed whether the family\nconflict should be shared with school staff.",
        FILLER_2,
    ),
)


def report_pdf(pages: Sequence[Sequence[str]] = REPORT_PAGES, *, info: bool = False) -> bytes:
    """A text report; each page's first paragraph is a heading, the rest body text.

    An explicit newline inside a body paragraph forces a line break there.
    """
    pdf = _doc()
    if info:
        pdf.set_title("Therapy report")
        pdf.set_author("Dr. Example")
    for paragraphs in pages:
        pdf.add_page()
        _heading(pdf, paragraphs[0])
        for text in paragraphs[1:]:
            _para(pdf, text)
    return bytes(pdf.output())


def metadata_pdf(secret: str = SECRET) -> bytes:
    """Clean page text; the secret in Title, Author, Subject, Keywords and the XMP."""
    pdf = _doc()
    pdf.set_title(f"Report on {secret}")
    pdf.set_author(f"Author of {secret}")
    pdf.set_subject(f"Subject {secret}")
    pdf.set_keywords(f"therapy, {secret}")
    pdf.set_xmp_metadata(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/"><rdf:Description rdf:about="">'
        f"<dc:description>{secret}</dc:description>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    _para(pdf, FILLER)
    return bytes(pdf.output())


def xmp_only_pdf(secret: str = SECRET) -> bytes:
    """The secret only in the XMP packet (split over two XML elements' worth of space)."""
    pdf = _doc()
    words = secret.split()
    pdf.set_xmp_metadata(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/"><rdf:Description rdf:about="">'
        f"<dc:title><rdf:Alt><rdf:li>{words[0]}\n   {' '.join(words[1:])}</rdf:li></rdf:Alt>"
        "</dc:title></rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    _para(pdf, FILLER)
    return bytes(pdf.output())


def annotation_pdf(secret: str = SECRET) -> bytes:
    """Clean page text; the secret in a sticky note and a highlight annotation's text."""
    pdf = _doc()
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    _para(pdf, FILLER)
    pdf.text_annotation(x=20, y=80, text=f"Reviewer: mention the {secret}?")
    return bytes(pdf.output())


def highlight_pdf(secret: str = SECRET) -> bytes:
    pdf = _doc()
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    with pdf.highlight(f"Do not share: {secret}"):
        _para(pdf, FILLER)
    return bytes(pdf.output())


def embedded_pdf(secret: str = SECRET, payload: bytes | None = None) -> bytes:
    """Clean page text; an embedded (compressed) file whose content holds the secret."""
    pdf = _doc()
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    _para(pdf, FILLER)
    body = payload if payload is not None else f"notes.txt: the {secret} at home\n".encode()
    pdf.embed_file(bytes=body, basename="notes.txt", modification_date=FIXED_DATE, compress=True)
    return bytes(pdf.output())


def bookmark_pdf(secret: str = SECRET) -> bytes:
    """Clean page text; the secret only in an outline (bookmark) title."""
    pdf = _doc()
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    pdf.start_section(f"About the {secret}")
    _para(pdf, FILLER)
    return bytes(pdf.output())


def form_field_pdf(secret: str = SECRET) -> bytes:
    """Clean page text; the secret only as the value of an AcroForm text field (pikepdf)."""
    base = report_pdf(((("Form"), FILLER),))
    with pikepdf.open(io.BytesIO(base)) as pdf:
        field = pdf.make_indirect(
            pikepdf.Dictionary(
                FT=pikepdf.Name.Tx,
                T=pikepdf.String("note"),
                V=pikepdf.String(f"{secret} (parent view)"),
                Type=pikepdf.Name.Annot,
                Subtype=pikepdf.Name.Widget,
                Rect=pikepdf.Array([100, 100, 300, 130]),
                P=pdf.pages[0].obj,
            )
        )
        pdf.pages[0].obj.Annots = pdf.make_indirect(pikepdf.Array([field]))
        pdf.Root.AcroForm = pikepdf.Dictionary(Fields=pikepdf.Array([field]))
        out = io.BytesIO()
        pdf.save(out)
    return out.getvalue()


def kerned_pdf(secret: str = SECRET) -> bytes:
    """The secret drawn by a hand-written content stream with TJ kerning inside words, in a
    page that a later revision replaces (so only the old revision's stream has it)."""
    words = secret.split()
    pieces = " ".join(f"[({w[:2]}) -15 ({w[2:]})] TJ ( ) Tj" for w in words)
    stream = f"BT /F1 12 Tf 72 700 Td {pieces} ET".encode()
    clean = b"BT /F1 12 Tf 72 700 Td (Nothing to see here.) Tj ET"
    pdf = pikepdf.new()
    font = pdf.make_indirect(
        pikepdf.Dictionary(
            Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont=pikepdf.Name.Helvetica
        )
    )
    page = pikepdf.Dictionary(
        Type=pikepdf.Name.Page,
        MediaBox=pikepdf.Array([0, 0, 612, 792]),
        Resources=pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font)),
        Contents=pdf.make_stream(stream),
    )
    pdf.pages.append(pikepdf.Page(page))
    out = io.BytesIO()
    pdf.save(out, compress_streams=True)
    return incremental_update(out.getvalue(), clean)


def incremental_update(data: bytes, new_content: bytes) -> bytes:
    """Append a revision replacing page 1's content stream (the old one stays in the file)."""
    with pikepdf.open(io.BytesIO(data)) as pdf:
        contents = pdf.pages[0].obj.get("/Contents")
        if isinstance(contents, pikepdf.Array):
            contents = contents[0]
        num, gen = contents.objgen
        root_num, root_gen = pdf.Root.objgen
        size = int(pdf.trailer.Size)
        info = pdf.trailer.get("/Info")
        info_ref = f" /Info {info.objgen[0]} {info.objgen[1]} R" if info is not None else ""
    starts = re.findall(rb"startxref\s+(\d+)", data)
    prev = int(starts[-1])
    body = bytearray(data)
    if not body.endswith(b"\n"):
        body += b"\n"
    offset = len(body)
    body += f"{num} {gen} obj\n<< /Length {len(new_content)} >>\nstream\n".encode()
    body += new_content + b"\nendstream\nendobj\n"
    xref = len(body)
    body += (
        f"xref\n0 1\n0000000000 65535 f \n{num} 1\n{offset:010d} {gen:05d} n \n"
        f"trailer\n<< /Size {size} /Root {root_num} {root_gen} R{info_ref} /Prev {prev} >>\n"
        f"startxref\n{xref}\n%%EOF\n"
    ).encode()
    return bytes(body)


def old_revision_pdf(secret: str = SECRET) -> bytes:
    """Revision 1 says the secret on page 1; revision 2 (an incremental update) replaces
    the page's text with a clean sentence. Only the old revision still holds the secret."""
    first = report_pdf(((("Draft report"), f"The {secret} is the main concern."),))
    clean = b"BT /F1 12 Tf 72 700 Td (Revised: nothing sensitive here.) Tj ET"
    with pikepdf.open(io.BytesIO(first)) as pdf:
        # fpdf2 names its font /F1; keep it so the new content renders.
        fonts = list(pdf.pages[0].Resources.Font.keys())
    clean = clean.replace(b"/F1", fonts[0].encode())
    return incremental_update(first, clean)


def appearance_annotation_pdf(secret: str = SECRET) -> bytes:
    """Clean page text; a FreeText annotation whose appearance stream DRAWS the secret in the
    rectangle (72, 400)-(372, 430): a viewer shows it, PDFium's page text does not have it."""
    base = report_pdf(((("Annotated"), FILLER),))
    with pikepdf.open(io.BytesIO(base)) as pdf:
        font = pdf.make_indirect(
            pikepdf.Dictionary(
                Type=pikepdf.Name.Font,
                Subtype=pikepdf.Name.Type1,
                BaseFont=pikepdf.Name.Helvetica,
            )
        )
        appearance = pdf.make_stream(
            f"0 0 0 rg BT /Helv 14 Tf 4 8 Td (Note: {secret}) Tj ET".encode(),
            Type=pikepdf.Name.XObject,
            Subtype=pikepdf.Name.Form,
            BBox=pikepdf.Array([0, 0, 300, 30]),
            Resources=pikepdf.Dictionary(Font=pikepdf.Dictionary(Helv=font)),
        )
        annot = pdf.make_indirect(
            pikepdf.Dictionary(
                Type=pikepdf.Name.Annot,
                Subtype=pikepdf.Name.FreeText,
                Rect=pikepdf.Array([72, 400, 372, 430]),
                Contents=pikepdf.String("see appearance"),
                DA=pikepdf.String("0 g /Helv 14 Tf"),
                F=4,
                AP=pikepdf.Dictionary(N=appearance),
            )
        )
        pdf.pages[0].obj.Annots = pdf.make_indirect(pikepdf.Array([annot]))
        out = io.BytesIO()
        pdf.save(out, compress_streams=True)
    return out.getvalue()


def _unicode_font_file(tmp: Path) -> Path:
    """The small TrueType font Pillow ships (Aileron), as a file fpdf2 can embed."""
    font = ImageFont.load_default(size=12)
    path = tmp / "aileron.ttf"
    path.write_bytes(font.path.getvalue())  # type: ignore[union-attr]
    return path


def cid_font_pdf(paragraphs: Sequence[str], tmp: Path) -> bytes:
    """Text in an embedded TrueType (Type0/Identity-H) font: the content stream holds glyph
    ids, so only a real text extractor (with the ToUnicode map) can read it."""
    pdf = _doc()
    pdf.add_font("Aileron", fname=str(_unicode_font_file(tmp)))
    pdf.add_page()
    pdf.set_font("Aileron", size=12)
    for text in paragraphs:
        _para(pdf, text)
    return bytes(pdf.output())


def old_revision_cid_pdf(tmp: Path, secret: str = SECRET) -> bytes:
    """Like old_revision_pdf, but the old text is in glyph ids: neither a byte search nor a
    string scan of the decompressed streams can read it, only the old revision's page text."""
    first = cid_font_pdf([f"The {secret} is the main concern."], tmp)
    return incremental_update(first, b"")


def orphan_object_pdf(secret: str = SECRET) -> bytes:
    """A compressed stream holding the secret appended in an update whose cross-reference
    section does not list it: no PDF reader reaches it, but the bytes go wherever the
    file goes."""
    data = report_pdf(((("Clean"), FILLER),))
    with pikepdf.open(io.BytesIO(data)) as pdf:
        root_num, root_gen = pdf.Root.objgen
        size = int(pdf.trailer.Size)
    prev = int(re.findall(rb"startxref\s+(\d+)", data)[-1])
    payload = zlib.compress(f"(left over: the {secret}) Tj".encode())
    body = bytearray(data)
    header = f"{size + 5} 0 obj\n<< /Length {len(payload)} /Filter /FlateDecode >>\nstream\n"
    body += header.encode()
    body += payload + b"\nendstream\nendobj\n"
    xref = len(body)
    body += (
        f"xref\n0 1\n0000000000 65535 f \ntrailer\n<< /Size {size} /Root {root_num} {root_gen} R "
        f"/Prev {prev} >>\nstartxref\n{xref}\n%%EOF\n"
    ).encode()
    return bytes(body)


def text_image(lines: Sequence[str], size: tuple[int, int] = (1240, 400)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=36)
    except (OSError, TypeError):
        font = ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((40, 40 + 60 * i), line, fill="black", font=font)
    return image


def scanned_pdf() -> bytes:
    """Page 1: text; page 2: only an image of text (a scan, no text layer); page 3: text."""
    pdf = _doc()
    pdf.add_page()
    _heading(pdf, "Cover letter")
    _para(pdf, FILLER)
    pdf.add_page()
    pdf.image(text_image(["Scanned page", f"the {SECRET} at home"]), x=20, y=20, w=170)
    pdf.add_page()
    _heading(pdf, "Afterword")
    _para(pdf, FILLER_2)
    return bytes(pdf.output())


def rotated_pdf() -> bytes:
    """report_pdf's first page, shown rotated by 90 degrees (/Rotate 90)."""
    with pikepdf.open(io.BytesIO(report_pdf(REPORT_PAGES[:1]))) as pdf:
        pdf.pages[0].Rotate = 90
        out = io.BytesIO()
        pdf.save(out)
    return out.getvalue()


def encrypted_pdf() -> bytes:
    """Needs a password to open (fpdf2 AES-128 with a user password)."""
    pdf = _doc()
    pdf.set_encryption(owner_password="owner-pw", user_password="user-pw")
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    _para(pdf, f"The {SECRET} is confidential.")
    return bytes(pdf.output())


def owner_only_encrypted_pdf(
    text: str = f"The {SECRET} is mentioned here.", title: str = ""
) -> bytes:
    """Encrypted with an empty user password: opens without one (permissions only), but
    every string and stream in the file is encrypted."""
    pdf = _doc()
    pdf.set_encryption(owner_password="owner-pw")
    if title:
        pdf.set_title(title)
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    _para(pdf, text)
    return bytes(pdf.output())


def broken_pdf() -> bytes:
    """report_pdf cut off in the middle (as a mail client that gave up would leave it)."""
    data = report_pdf()
    return data[: len(data) // 2]


def long_report_pdf(pages: int, phrases: Sequence[str] = (SECRET,)) -> bytes:
    """``pages`` pages of realistic report text, each with a heading, several paragraphs,
    and one of ``phrases`` on every page. Used by the benchmark."""
    pdf = _doc()
    pdf.set_title("Annual review")
    sentences = [
        FILLER,
        FILLER_2,
        "Attention and regulation were observed in three settings: the classroom, the "
        "playground and the small-group room. Sam settled fastest in the small-group room.",
        "Standardised scores are within the expected range for receptive vocabulary and "
        "slightly below it for expressive language; see the table in the appendix.",
        "The occupational therapist recommends movement breaks every forty minutes and a "
        "sloped writing surface; both were trialled in May with good results.",
    ]
    for n in range(pages):
        pdf.add_page()
        _heading(pdf, f"Section {n + 1}: observations")
        for k, sentence in enumerate(sentences):
            if k == 2:
                phrase = phrases[n % len(phrases)]
                _para(pdf, f"{sentence} Parents mentioned the {phrase} during the call.")
            else:
                _para(pdf, sentence)
    return bytes(pdf.output())


def corpus_pdfs() -> list[tuple[str, bytes]]:
    """(eml name, bytes) of every application/pdf part in the shared mail corpus."""
    out: list[tuple[str, bytes]] = []
    if not CORPUS_EMAILS.is_dir():
        return out
    for path in sorted(CORPUS_EMAILS.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
        for part in message.walk():
            if part.get_content_type() == "application/pdf":
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes):
                    out.append((path.name, payload))
    return out


# --- what a hearing officer would check on a redacted PDF ----------------------------------


def phrase_rx(phrase: str) -> re.Pattern[str]:
    return re.compile(r"\s+".join(re.escape(w) for w in phrase.casefold().split()))


def pdfium_text(data: bytes) -> str:
    doc = pdfium.PdfDocument(data)
    try:
        texts = []
        for page in doc:
            textpage = page.get_textpage()
            texts.append(textpage.get_text_range())
            textpage.close()
            page.close()
        return "\n".join(texts)
    finally:
        doc.close()


def pdfminer_text(data: bytes) -> str:
    from pdfminer.high_level import extract_text

    return extract_text(io.BytesIO(data))


def _pike_strings(obj: object, out: list[str], depth: int = 0) -> None:
    if depth > 50:
        return
    if isinstance(obj, pikepdf.String):
        out.append(str(obj))
        out.append(bytes(obj).decode("latin-1"))
    elif isinstance(obj, pikepdf.Name):
        out.append(str(obj))
    elif isinstance(obj, pikepdf.Array):
        for item in obj:
            if not getattr(item, "is_indirect", False):
                _pike_strings(item, out, depth + 1)
    elif isinstance(obj, (pikepdf.Dictionary, pikepdf.Stream)):
        for key in list(obj.keys()):
            out.append(key)
            value = obj.get(key)
            if value is not None and not getattr(value, "is_indirect", False):
                _pike_strings(value, out, depth + 1)


def object_dump(data: bytes) -> Iterator[str]:
    """Every string, name and decoded stream of every object, as text (pikepdf)."""
    with pikepdf.open(io.BytesIO(data)) as pdf:
        strings: list[str] = []
        _pike_strings(pdf.trailer, strings)
        for obj in pdf.objects:
            _pike_strings(obj, strings)
            if isinstance(obj, pikepdf.Stream):
                if obj.get("/Subtype") == pikepdf.Name.Image:
                    continue
                try:
                    body = obj.read_bytes()
                except pikepdf.PdfError:
                    body = obj.read_raw_bytes()
                yield body.decode("latin-1")
                yield body.decode("utf-8", "ignore")
        yield "\n".join(strings)


def char_boxes(data: bytes, page_number: int, phrase: str) -> list[list[list[tuple]]]:
    """Per occurrence of ``phrase`` on the page, per line it is on: the tight char boxes (PDF
    page space) of its visible characters, as PDFium reports them. A phrase broken over
    lines is matched too (and has two lists of boxes)."""
    doc = pdfium.PdfDocument(data)
    page = doc[page_number - 1]
    textpage = page.get_textpage()
    text = textpage.get_text_range()
    out = []
    for m in phrase_rx(phrase).finditer(text.casefold()):
        lines: list[list[tuple]] = [[]]
        for i in range(m.start(), m.end()):
            if text[i] == "\n":
                lines.append([])
            elif not text[i].isspace():
                lines[-1].append(textpage.get_charbox(i))
        out.append([line for line in lines if line])
    textpage.close()
    page.close()
    doc.close()
    assert out, f"{phrase!r} is not on page {page_number} of the original"
    return out


@dataclass
class Region:
    """A rectangle in display points (the page as shown: rotation applied, y downwards)."""

    page: int
    x0: float
    y0: float
    x1: float
    y1: float


def regions_of(original: bytes, page_number: int, boxes: Iterable[tuple]) -> list[Region]:
    """Page-space char boxes of the ORIGINAL page -> display regions, by PDFium's own
    page-to-device mapping (independent of the code under test)."""
    doc = pdfium.PdfDocument(original)
    page = doc[page_number - 1]
    width, height = page.get_size()
    fine = 100
    size = (round(width * fine), round(height * fine))
    dx, dy = ctypes.c_int(), ctypes.c_int()
    out = []
    for left, bottom, right, top in boxes:
        xs, ys = [], []
        for x, y in ((left, bottom), (right, top)):
            pdfium_c.FPDF_PageToDevice(page, 0, 0, size[0], size[1], 0, x, y, dx, dy)
            xs.append(dx.value / fine)
            ys.append(dy.value / fine)
        out.append(Region(page_number, min(xs), min(ys), max(xs), max(ys)))
    page.close()
    doc.close()
    return out


def phrase_regions(original: bytes, page_number: int, phrase: str) -> list[Region]:
    """One region per visible character of every occurrence (the strictest black check)."""
    return [
        region
        for occurrence in char_boxes(original, page_number, phrase)
        for line in occurrence
        for region in regions_of(original, page_number, line)
    ]


def word_regions(original: bytes, page_number: int, phrase: str) -> list[Region]:
    """One region per line of every occurrence: the union of its characters there."""
    out: list[Region] = []
    for occurrence in char_boxes(original, page_number, phrase):
        for line in occurrence:
            group = regions_of(original, page_number, line)
            out.append(
                Region(
                    page_number,
                    min(r.x0 for r in group),
                    min(r.y0 for r in group),
                    max(r.x1 for r in group),
                    max(r.y1 for r in group),
                )
            )
    return out


def dark_fraction(data: bytes, region: Region, scale: float = 2.0) -> float:
    """Share of near-black pixels inside ``region`` of the rendered (redacted) page."""
    doc = pdfium.PdfDocument(data)
    page = doc[region.page - 1]
    image = page.render(scale=scale).to_pil().convert("L")
    page.close()
    doc.close()
    box = (
        int(region.x0 * scale),
        int(region.y0 * scale),
        int(region.x1 * scale + 0.999),
        int(region.y1 * scale + 0.999),
    )
    histogram = image.crop(box).histogram()
    return sum(histogram[:60]) / max(1, sum(histogram))


def ink_fraction(data: bytes, region: Region, scale: float = 2.0) -> float:
    """Share of pixels inside ``region`` that are not (nearly) white."""
    doc = pdfium.PdfDocument(data)
    page = doc[region.page - 1]
    image = page.render(scale=scale).to_pil().convert("L")
    page.close()
    doc.close()
    box = (
        int(region.x0 * scale),
        int(region.y0 * scale),
        int(region.x1 * scale + 0.999),
        int(region.y1 * scale + 0.999),
    )
    histogram = image.crop(box).histogram()
    return sum(histogram[:200]) / max(1, sum(histogram))


def assert_clean_redaction(
    redacted: bytes,
    phrases: Sequence[str],
    *,
    page_count: int,
    blacked: Sequence[Region] = (),
    untouched: Sequence[Region] = (),
    original_info: Sequence[str] = (),
) -> None:
    """The checks every redacted PDF must pass (see tests/test_attachments_pdf.py)."""
    assert redacted.startswith(b"%PDF-")
    texts = {"pdfium": pdfium_text(redacted), "pdfminer": pdfminer_text(redacted)}
    for tool, text in texts.items():
        assert text.strip() == "", f"{tool} found a text layer: {text[:80]!r}"
    dump = list(object_dump(redacted))
    for phrase in phrases:
        rx = phrase_rx(phrase)
        for tool, text in texts.items():
            assert not rx.search(text.casefold()), f"{tool} text still has {phrase!r}"
        for chunk in dump:
            assert not rx.search(chunk.casefold()), f"an object still has {phrase!r}"
        for decoded in (redacted.decode("latin-1"), redacted.decode("utf-16-le", "ignore")):
            assert not rx.search(decoded.casefold()), f"the raw bytes still have {phrase!r}"
    with pikepdf.open(io.BytesIO(redacted)) as pdf:
        assert len(pdf.pages) == page_count
        assert "/Metadata" not in pdf.Root, "XMP metadata in the output"
        assert "/Names" not in pdf.Root, "a name tree (embedded files) in the output"
        assert "/Outlines" not in pdf.Root and "/AcroForm" not in pdf.Root
        info = pdf.trailer.get("/Info")
        assert info is None or len(info.keys()) == 0, f"Info entries: {list(info.keys())}"
        for page in pdf.pages:
            assert "/Annots" not in page.obj
            xobjects = page.Resources.get("/XObject", {})
            assert "/Font" not in page.Resources, "fonts in the output: a text layer"
            for xobj in xobjects.values():
                assert xobj.Subtype == pikepdf.Name.Image
        for obj in pdf.objects:
            if isinstance(obj, pikepdf.Dictionary):
                assert obj.get("/Type") not in (pikepdf.Name.EmbeddedFile, pikepdf.Name.Annot)
                assert obj.get("/Type") != pikepdf.Name.Filespec
    for value in original_info:
        for chunk in dump:
            assert value not in chunk, f"original metadata {value!r} in the output"
    for region in blacked:
        share = dark_fraction(redacted, region)
        assert share > 0.97, f"only {share:.0%} black where the text was: {region}"
    for region in untouched:
        share = dark_fraction(redacted, region)
        assert share < 0.6, f"{share:.0%} black over text that should be readable: {region}"
        ink = ink_fraction(redacted, region)
        assert ink > 0.08, f"the text that should be readable is gone ({ink:.0%} ink): {region}"
