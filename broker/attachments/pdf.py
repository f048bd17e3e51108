"""PDF attachments: numbered paragraphs per page, a search of the whole file, real redaction.

``read_pdf`` gives the parent each page's paragraphs, numbered the way ``redact_pdf`` numbers
them (both use ``_page_layout``). ``pdf_contains`` answers "is this phrase anywhere in the
file?", looking well beyond the page text: metadata, annotations, form fields, embedded
files, bookmarks, every object and decoded stream, and the revisions an incremental update
left behind. It fails closed: a file it cannot search "contains" every phrase.

``redact_pdf`` never edits the original. It builds a new PDF out of page images: each page is
rendered by PDFium without annotations or form fields, black boxes are painted over the
paragraphs and phrases to remove, whole pages become a white page that says it was removed,
and the images are the only content of the new file (no text layer, no metadata, nothing
copied from the original).

Paragraph rule (``_page_layout``), in display coordinates (the page as it is shown, rotation
applied): PDFium's text is cut into lines at its line breaks; a new paragraph starts at an
empty line, at a line that lies wholly above the previous one (a new column or text box), at
a line whose font height differs from the previous one's by more than a quarter (a heading),
or when the distance from the previous line's baseline is more than 1.5 times the line height
(a blank line or paragraph spacing). Lines that overlap vertically continue the paragraph.

PDFium is not thread-safe, so every use of it here holds one module lock.
"""

from __future__ import annotations

import base64
import ctypes
import html
import io
import re
import statistics
import threading
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import pikepdf
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image, ImageChops, ImageDraw, ImageFont

from broker.attachments import bytes_contain, find_spans, phrase_regex, text_contains

ENCRYPTED = "encrypted (password-protected)"
DAMAGED = "damaged: cannot be read"
TRUNCATED = "damaged: the file is incomplete (cut short)"
NOT_PDF = "damaged: cannot be read (not a PDF file)"

_PASSWORD_ERRORS = (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY)
# PDFium keeps global state and is not thread-safe: one call at a time in this process.
# Other code in the broker that calls pypdfium2 should hold this lock too.
PDFIUM_LOCK = threading.RLock()

# A page counts as scanned when it has fewer visible text characters than this and draws
# at least one image.
_SCANNED_MAX_CHARS = 10
# Layout thresholds (see the module docstring).
_PARAGRAPH_PITCH = 1.5
_HEADING_RATIO = 0.25
# Rendering: never make a page bitmap larger than this many pixels (huge page sizes).
_MAX_PIXELS = 20_000_000
_JPEG_QUALITY = 85
# Searching: stop (and answer "contains") past these amounts of work.
_MAX_REVISIONS = 32
_MAX_STREAM = 64 * 1024 * 1024
_MAX_DECODED = 512 * 1024 * 1024
_MAX_OTHER_FILTER_RAW = 256 * 1024
_MAX_DEPTH = 3


class PdfRedactionError(Exception):
    """The PDF cannot be redacted (encrypted or damaged), or the request names no such part."""


@dataclass(frozen=True)
class PdfPage:
    number: int  # 1-based
    paragraphs: tuple[str, ...]  # reading order, whitespace-normalised inside a paragraph
    scanned: bool  # no text layer, but the page draws something (images)


@dataclass(frozen=True)
class PdfReading:
    pages: tuple[PdfPage, ...]
    problem: str | None  # words for the parent; then pages is ()


# --- opening -------------------------------------------------------------------------------


class _Unreadable(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _check_envelope(data: bytes) -> None:
    """Cheap checks PDFium's recovery would paper over: a PDF header and an end marker."""
    if b"%PDF-" not in data[:1024]:
        raise _Unreadable(NOT_PDF)
    if b"%%EOF" not in data.rstrip(b" \t\r\n\x00")[-1024:]:
        raise _Unreadable(TRUNCATED)


def _open(data: bytes) -> pdfium.PdfDocument:
    """Open with PDFium (caller holds the lock); _Unreadable says why it cannot be read."""
    _check_envelope(data)
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if exc.err_code in _PASSWORD_ERRORS:
            raise _Unreadable(ENCRYPTED) from exc
        raise _Unreadable(DAMAGED) from exc


# --- page layout: characters, lines, paragraphs --------------------------------------------

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display points, y downwards


@dataclass
class _Line:
    start: int  # first character index (into the page text)
    end: int  # one past the last character (line break excluded)
    box: Box  # union of the visible characters, display space (for painting)
    frame: Box  # the same in the reading frame (for layout)
    height: float  # median character height


@dataclass
class _Layout:
    text: str  # one character per PDFium character index
    boxes: list[Box | None]  # display-space box per character (None: whitespace)
    line_of: list[int]  # line index per character (-1: line break)
    lines: list[_Line]
    paragraphs: list[list[int]]  # line indexes per paragraph
    visible: int  # count of visible (non-whitespace) characters

    def reading(self) -> tuple[str, list[int]]:
        """The page text in reading order, lines joined by line breaks, and for each of its
        characters the PDFium character index (-1 for the line breaks)."""
        chars: list[str] = []
        index: list[int] = []
        for line in self.lines:
            if chars:
                chars.append("\n")
                index.append(-1)
            chars.append(self.text[line.start : line.end])
            index.extend(range(line.start, line.end))
        return "".join(chars), index

    def paragraph_text(self, index: int) -> str:
        parts = (self.text[self.lines[i].start : self.lines[i].end] for i in self.paragraphs[index])
        return " ".join(" ".join(parts).split())


def _display_transform(page: pdfium.PdfPage) -> tuple[float, float, float, float, float, float]:
    """Affine map page space -> display points (rotation and crop box applied, y downwards).

    Read off PDFium's own FPDF_PageToDevice at a fine virtual resolution, so it agrees with
    rendering by construction.
    """
    width, height = page.get_size()
    fine = 256.0
    sx, sy = max(1, round(width * fine)), max(1, round(height * fine))
    dx, dy = ctypes.c_int(), ctypes.c_int()

    def to_device(x: float, y: float) -> tuple[float, float]:
        pdfium_c.FPDF_PageToDevice(page, 0, 0, sx, sy, 0, x, y, dx, dy)
        return dx.value / fine, dy.value / fine

    ox, oy = to_device(0.0, 0.0)
    ax, ay = to_device(1000.0, 0.0)
    bx, by = to_device(0.0, 1000.0)
    return (ax - ox) / 1000, (ay - oy) / 1000, (bx - ox) / 1000, (by - oy) / 1000, ox, oy


def _char(code: int) -> str:
    if code == 0x02:  # PDFium's mark for a hyphen at a line end
        return "-"
    if code < 0x20 and code not in (0x0A, 0x0D):
        return " "
    if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        return "\ufffd"
    return chr(code)


def _page_layout(page: pdfium.PdfPage) -> _Layout:
    """The page's characters, lines and paragraphs: the one numbering read and redact share."""
    textpage = page.get_textpage()
    try:
        a, b, c, d, e, f = _display_transform(page)
        count = pdfium_c.FPDFText_CountChars(textpage)
        chars: list[str] = []
        boxes: list[Box | None] = []
        rect = pdfium_c.FS_RECTF()
        left, right, bottom, top = (ctypes.c_double() for _ in range(4))
        for i in range(max(count, 0)):
            ch = _char(pdfium_c.FPDFText_GetUnicode(textpage, i))
            chars.append(ch)
            if ch.isspace():
                boxes.append(None)
                continue
            pdfium_c.FPDFText_GetLooseCharBox(textpage, i, rect)
            x0, y0, x1, y1 = rect.left, rect.bottom, rect.right, rect.top
            if y1 - y0 <= 0.01 or x1 - x0 < 0:
                pdfium_c.FPDFText_GetCharBox(textpage, i, left, right, bottom, top)
                x0, y0, x1, y1 = left.value, bottom.value, right.value, top.value
            px = (a * x0 + c * y0 + e, a * x1 + c * y1 + e)
            py = (b * x0 + d * y0 + f, b * x1 + d * y1 + f)
            boxes.append((min(px), min(py), max(px), max(py)))
    finally:
        textpage.close()
    text = "".join(chars)
    lines, line_of = _lines(text, boxes)
    return _Layout(
        text=text,
        boxes=boxes,
        line_of=line_of,
        lines=lines,
        paragraphs=_paragraphs(lines),
        visible=sum(1 for box in boxes if box is not None),
    )


def _reading_frame(text: str, boxes: list[Box | None]) -> Callable[[Box], Box]:
    """A map of display boxes into a frame where the page's text runs left to right and lines
    follow downwards, whatever the rotation (text drawn sideways, /Rotate, scans turned)."""
    sum_x = sum_y = 0.0
    prev: Box | None = None
    for ch, box in zip(text, boxes, strict=True):
        if ch == "\n":
            prev = None
            continue
        if box is None:
            continue
        if prev is not None:
            sum_x += (box[0] + box[2] - prev[0] - prev[2]) / 2
            sum_y += (box[1] + box[3] - prev[1] - prev[3]) / 2
        prev = box
    if abs(sum_x) >= abs(sum_y):
        if sum_x >= 0:
            return lambda box: box
        return lambda box: (-box[2], -box[3], -box[0], -box[1])  # upside down
    if sum_y > 0:  # reading downwards: the next line is to the left
        return lambda box: (box[1], -box[2], box[3], -box[0])
    return lambda box: (-box[3], box[0], -box[1], box[2])  # reading upwards


def _union(boxes: Sequence[Box]) -> Box:
    return (
        min(v[0] for v in boxes),
        min(v[1] for v in boxes),
        max(v[2] for v in boxes),
        max(v[3] for v in boxes),
    )


def _lines(text: str, boxes: list[Box | None]) -> tuple[list[_Line], list[int]]:
    """Cut the character stream at PDFium's line breaks; blank lines become empty _Lines.

    PDFium lists the lines of some rotated pages last line first; when most steps from one
    line to the next go up the page, the lines are put back in reading order.
    """
    frame = _reading_frame(text, boxes)
    lines: list[_Line] = []
    start = 0
    for pos in range(len(text) + 1):
        if pos < len(text) and text[pos] != "\n":
            continue
        end = pos
        while end > start and text[end - 1] == "\r":
            end -= 1
        visible = [box for box in boxes[start:end] if box is not None]
        if visible:
            framed = [frame(box) for box in visible]
            box, rbox = _union(visible), _union(framed)
            height = statistics.median(v[3] - v[1] for v in framed)
        else:
            box = rbox = (0.0, 0.0, 0.0, 0.0)
            height = 0.0
        lines.append(_Line(start=start, end=end, box=box, frame=rbox, height=height))
        start = pos + 1
    shown = [line for line in lines if line.height > 0]
    steps = [b.frame[1] + b.frame[3] - a.frame[1] - a.frame[3] for a, b in pairwise(shown)]
    if sum(1 for s in steps if s < 0) > sum(1 for s in steps if s > 0):
        lines.reverse()
    line_of = [-1] * len(text)
    for index, line in enumerate(lines):
        for i in range(line.start, line.end):
            line_of[i] = index
    return lines, line_of


def _new_paragraph(prev: _Line, line: _Line) -> bool:
    if line.frame[3] <= prev.frame[1]:  # wholly above the previous line: a new column or box
        return True
    if line.frame[1] < prev.frame[3]:  # overlaps the previous line vertically: the same row
        return False
    tall = max(prev.height, line.height)
    if tall > 0 and abs(prev.height - line.height) > _HEADING_RATIO * tall:
        return True
    pitch = line.frame[3] - prev.frame[3]  # bottom to bottom: baseline to baseline
    return pitch > _PARAGRAPH_PITCH * tall


def _paragraphs(lines: list[_Line]) -> list[list[int]]:
    paragraphs: list[list[int]] = []
    prev: _Line | None = None
    for index, line in enumerate(lines):
        if line.height <= 0:  # a blank line ends the paragraph
            prev = None
            continue
        if prev is None or _new_paragraph(prev, line):
            paragraphs.append([])
        paragraphs[-1].append(index)
        prev = line
    return paragraphs


def _has_images(page: pdfium.PdfPage) -> bool:
    for _ in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE]):
        return True
    return False


# --- reading -------------------------------------------------------------------------------


def read_pdf(data: bytes, *, max_pages: int = 500) -> PdfReading:
    """Each page's paragraphs in reading order, or a problem in words for the parent.

    Never raises: an encrypted, damaged, or overlong file gives ``pages=()`` and a problem.
    """
    with PDFIUM_LOCK:
        try:
            doc = _open(data)
        except _Unreadable as exc:
            return PdfReading(pages=(), problem=exc.problem)
        except Exception:
            return PdfReading(pages=(), problem=DAMAGED)
        try:
            count = len(doc)
            if count < 1:
                return PdfReading(pages=(), problem=f"{DAMAGED} (it has no pages)")
            if count > max_pages:
                return PdfReading(
                    pages=(),
                    problem=f"too long: {count} pages (at most {max_pages} can be reviewed)",
                )
            pages: list[PdfPage] = []
            for number in range(1, count + 1):
                page = doc[number - 1]
                try:
                    layout = _page_layout(page)
                    scanned = layout.visible < _SCANNED_MAX_CHARS and _has_images(page)
                finally:
                    page.close()
                texts = tuple(layout.paragraph_text(i) for i in _listed_paragraphs(layout))
                pages.append(PdfPage(number=number, paragraphs=texts, scanned=scanned))
            return PdfReading(pages=tuple(pages), problem=None)
        except Exception:
            return PdfReading(pages=(), problem=DAMAGED)
        finally:
            doc.close()


# --- redacting -----------------------------------------------------------------------------


def redact_pdf(
    data: bytes,
    *,
    paragraphs: Mapping[int, Collection[int]] = {},
    pages: Collection[int] = (),
    phrases: Sequence[str] = (),
    dpi: int = 150,
) -> bytes:
    """A new PDF made only of page images, with the named parts blacked out.

    ``paragraphs`` maps a page number (1-based) to paragraph indexes (0-based, exactly as
    ``read_pdf`` lists them on that page). Every occurrence of each phrase in the text of the
    whole document (pages joined, so a phrase running over a page break is found too) gets a
    black box on every line it touches. Pages in ``pages`` become white pages that say they
    were removed. Phrases on scanned pages (no text layer) cannot be found: check
    ``read_pdf(...).pages[i].scanned`` and ask the parent to remove such pages whole.

    Raises PdfRedactionError for encrypted or damaged input, and for a page or paragraph
    that does not exist (the request was made against another reading of the file).
    """
    if not 36 <= dpi <= 600:
        raise ValueError("dpi must be between 36 and 600")
    rx = phrase_regex(phrases)
    with PDFIUM_LOCK:
        try:
            doc = _open(data)
        except _Unreadable as exc:
            raise PdfRedactionError(exc.problem) from exc
        try:
            return _redact(doc, paragraphs, set(pages), rx, dpi)
        except PdfRedactionError:
            raise
        except Exception as exc:  # PDFium, qpdf or Pillow gave up on this file
            raise PdfRedactionError(DAMAGED) from exc
        finally:
            doc.close()


def _redact(
    doc: pdfium.PdfDocument,
    paragraphs: Mapping[int, Collection[int]],
    removed: set[int],
    rx: re.Pattern[str] | None,
    dpi: int,
) -> bytes:
    count = len(doc)
    for number in sorted(removed | set(paragraphs)):
        if not 1 <= number <= count:
            raise PdfRedactionError(f"page {number} does not exist (the file has {count})")

    # Pass 1: layouts (text and boxes only) of every page, to number paragraphs and to find
    # phrases in the text of the whole document.
    layouts: list[_Layout] = []
    for index in range(count):
        page = doc[index]
        try:
            layouts.append(_page_layout(page))
        finally:
            page.close()
    for number, indexes in paragraphs.items():
        # Indexes count the paragraphs read_pdf lists, which drops paragraphs of no text.
        listed = _listed_paragraphs(layouts[number - 1])
        for i in indexes:
            if not 0 <= i < len(listed):
                raise PdfRedactionError(
                    f"page {number} has no paragraph {i + 1} (it has {len(listed)})"
                )

    hits = _phrase_hits(layouts, rx) if rx is not None else [[] for _ in layouts]

    out = pikepdf.new()
    for index in range(count):
        number = index + 1
        page = doc[index]
        try:
            width, height = page.get_size()
            scale = dpi / 72.0
            pixels = width * scale * height * scale
            if pixels > _MAX_PIXELS:
                scale *= 0.995 * (_MAX_PIXELS / pixels) ** 0.5  # ceil() may add a pixel
            if number in removed:
                image = _removed_page(number, width, height, scale)
            else:
                layout = layouts[index]
                listed = _listed_paragraphs(layout)
                chosen = [listed[i] for i in sorted(set(paragraphs.get(number, ())))]
                boxes = _paragraph_boxes(layout, chosen) + _char_group_boxes(layout, hits[index])
                image = _render(page, scale)
                _paint(image, boxes, scale)
        finally:
            page.close()
        _add_image_page(out, image, width, height)
        image.close()
    buffer = io.BytesIO()
    out.save(buffer, deterministic_id=True, compress_streams=True)
    return buffer.getvalue()


def _listed_paragraphs(layout: _Layout) -> list[int]:
    """Indexes into layout.paragraphs of the paragraphs read_pdf lists (those with text)."""
    return [i for i in range(len(layout.paragraphs)) if layout.paragraph_text(i)]


def _phrase_hits(layouts: list[_Layout], rx: re.Pattern[str]) -> list[list[list[int]]]:
    """Per page, per phrase occurrence on it, the character indexes the occurrence covers.

    Phrases are found in the text of the whole document (pages in reading order, joined by a
    blank line, as the parent reads them), so one occurrence may cover two pages.
    """
    joiner = "\n\n"
    whole: list[str] = []
    where: list[tuple[int, int]] = []  # (page, character) per position of the joined text
    for page, layout in enumerate(layouts):
        if whole:
            whole.append(joiner)
            where.extend([(page, -1)] * len(joiner))
        text, index = layout.reading()
        whole.append(text)
        where.extend((page, i) for i in index)
    hits: list[list[list[int]]] = [[] for _ in layouts]
    for start, end in find_spans("".join(whole), rx):
        parts: dict[int, list[int]] = {}
        for page, i in where[start:end]:
            if i >= 0:
                parts.setdefault(page, []).append(i)
        for page, chars in parts.items():
            hits[page].append(chars)
    return hits


def _paragraph_boxes(layout: _Layout, chosen: list[int]) -> list[Box]:
    """Boxes over each chosen paragraph: every line, and the gap between consecutive lines."""
    boxes: list[Box] = []
    for para in chosen:
        lines = [layout.lines[i] for i in layout.paragraphs[para]]
        for k, line in enumerate(lines):
            pad = max(1.0, 0.2 * line.height)
            pair = [line.box] if k + 1 == len(lines) else [line.box, lines[k + 1].box]
            x0, y0, x1, y1 = _union(pair)
            boxes.append((x0 - pad, y0 - pad, x1 + pad, y1 + pad))
    return boxes


def _char_group_boxes(layout: _Layout, groups: list[list[int]]) -> list[Box]:
    """For each group of characters (one phrase occurrence), one box per line it is on."""
    out: list[Box] = []
    for chars in groups:
        by_line: dict[int, list[Box]] = {}
        for i in chars:
            box = layout.boxes[i]
            if box is not None and layout.line_of[i] >= 0:
                by_line.setdefault(layout.line_of[i], []).append(box)
        for line_id, boxes in sorted(by_line.items()):
            pad = max(1.0, 0.2 * layout.lines[line_id].height)
            x0, y0, x1, y1 = _union(boxes)
            out.append((x0 - pad, y0 - pad, x1 + pad, y1 + pad))
    return out


def _render(page: pdfium.PdfPage, scale: float) -> Image.Image:
    bitmap = page.render(scale=scale, draw_annots=False, may_draw_forms=False)
    try:
        return bitmap.to_pil().convert("RGB")
    finally:
        bitmap.close()


def _paint(image: Image.Image, boxes: list[Box], scale: float) -> None:
    if not boxes:
        return
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle(
            (int(x0 * scale), int(y0 * scale), int(x1 * scale + 0.999), int(y1 * scale + 0.999)),
            fill=(0, 0, 0),
        )


def _removed_page(number: int, width: float, height: float, scale: float) -> Image.Image:
    """A white page of the same size saying which page the family removed."""
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font_px = max(8, round(11 * scale))
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=font_px)
    except (OSError, TypeError):  # Pillow without FreeType
        font = ImageFont.load_default()
    margin = round(36 * scale)
    label = f"Page {number} removed by the family"
    draw.text((margin, margin), label, fill=(90, 90, 90), font=font)
    return image


def _add_image_page(out: pikepdf.Pdf, image: Image.Image, width: float, height: float) -> None:
    """Append a page of ``width`` x ``height`` points showing only ``image``.

    Grey pages (most letters and reports) are stored losslessly (8-bit grey, Flate): smaller
    than JPEG for text, and crisp. Pages with colour are stored as JPEG.
    """
    if _is_gray(image):
        gray = image.convert("L")
        body = zlib.compress(gray.tobytes(), 6)
        gray.close()
        colorspace, codec = pikepdf.Name.DeviceGray, pikepdf.Name.FlateDecode
    else:
        encoded = io.BytesIO()
        image.save(encoded, "JPEG", quality=_JPEG_QUALITY, optimize=True)
        body = encoded.getvalue()
        colorspace, codec = pikepdf.Name.DeviceRGB, pikepdf.Name.DCTDecode
    xobject = pikepdf.Stream(out, body)
    xobject.Type = pikepdf.Name.XObject
    xobject.Subtype = pikepdf.Name.Image
    xobject.Width = image.width
    xobject.Height = image.height
    xobject.ColorSpace = colorspace
    xobject.BitsPerComponent = 8
    xobject.Filter = codec
    content = pikepdf.Stream(out, f"q {width:.3f} 0 0 {height:.3f} 0 0 cm /Im0 Do Q".encode())
    page = pikepdf.Dictionary(
        Type=pikepdf.Name.Page,
        MediaBox=pikepdf.Array([0, 0, round(width, 3), round(height, 3)]),
        Resources=pikepdf.Dictionary(XObject=pikepdf.Dictionary(Im0=xobject)),
        Contents=content,
    )
    out.pages.append(pikepdf.Page(page))


def _is_gray(image: Image.Image) -> bool:
    red, green, blue = image.split()
    return (
        ImageChops.difference(red, green).getbbox() is None
        and ImageChops.difference(green, blue).getbbox() is None
    )


# --- searching -----------------------------------------------------------------------------


class _CannotSearch(Exception):
    """Part of the file cannot be searched: the answer must be "contains"."""


def pdf_contains(data: bytes, phrases: Sequence[str]) -> bool:
    """True if any phrase occurs anywhere in the file, or the file cannot be fully searched.

    Looks at: the raw bytes (UTF-8, Latin-1, UTF-16); every object and decoded stream of
    every revision (each ``%%EOF`` ends one: a prefix of the file up to it is opened as the
    PDF it was before later incremental updates), so document Info, XMP, annotations and
    their appearance streams, form fields, bookmarks and embedded files are all covered
    (embedded PDFs and Office files are searched in turn); the strings shown by content
    streams (kerning-split words joined); the page text of every revision as PDFium extracts
    it; and every ``stream`` in the raw bytes, decompressed, even in objects no cross-reference
    table lists.
    """
    rx = phrase_regex(phrases)
    if rx is None:
        return False
    try:
        return _Search(rx).pdf(data, depth=0)
    except _CannotSearch:
        return True
    except Exception:  # fail closed on anything unexpected
        return True


class _Search:
    def __init__(self, rx: re.Pattern[str]) -> None:
        self.rx = rx
        self.decoded = 0

    # The whole file ----------------------------------------------------------------------

    def pdf(self, data: bytes, depth: int) -> bool:
        if depth > _MAX_DEPTH:
            raise _CannotSearch
        if bytes_contain(data, self.rx) or self.strings(data):
            return True
        try:
            _check_envelope(data)
        except _Unreadable as exc:
            raise _CannotSearch from exc
        revisions = _revisions(data)
        if len(revisions) > _MAX_REVISIONS:
            raise _CannotSearch
        for end in reversed(revisions):
            latest = end == revisions[-1]
            prefix = data if latest else data[:end]
            if self.objects(prefix, latest, depth) or self.page_text(prefix, latest):
                return True
        return self.raw_streams(data)

    def objects(self, data: bytes, latest: bool, depth: int) -> bool:
        try:
            pdf = pikepdf.open(io.BytesIO(data))
        except pikepdf.PasswordError as exc:
            raise _CannotSearch from exc
        except Exception as exc:
            if latest:
                raise _CannotSearch from exc
            return False  # an earlier revision that does not stand alone: raw scan covers it
        with pdf:
            if self.direct(pdf.trailer):
                return True
            for obj in pdf.objects:
                if self.direct(obj):
                    return True
                if isinstance(obj, pikepdf.Stream) and self.stream(obj, depth):
                    return True
        return False

    def page_text(self, data: bytes, latest: bool) -> bool:
        with PDFIUM_LOCK:
            try:
                doc = pdfium.PdfDocument(data)
            except pdfium.PdfiumError as exc:
                if latest or exc.err_code in _PASSWORD_ERRORS:
                    raise _CannotSearch from exc
                return False
            try:
                texts: list[str] = []
                for index in range(len(doc)):
                    page = doc[index]
                    try:
                        textpage = page.get_textpage()
                        try:
                            texts.append(textpage.get_text_range())
                        finally:
                            textpage.close()
                    finally:
                        page.close()
                return text_contains("\n".join(texts), self.rx)
            finally:
                doc.close()

    def raw_streams(self, data: bytes) -> bool:
        """Every stream body in the raw bytes, decompressed: objects of every revision."""
        for match in re.finditer(rb"stream\r?\n", data):
            head = data[max(0, match.start() - 2048) : match.start()]
            head = head[head.rfind(b"obj") + 1 :]
            if _IMAGE_DICT.search(head):
                continue  # pixels: their raw bytes were searched with the file
            start = match.end()
            end = data.find(b"endstream", start)
            if end < 0:
                end = len(data)
            body = _inflate(data[start:end], partial=True)
            if body is not None and self.blob(body, depth=_MAX_DEPTH):
                return True
        return False

    # Pieces ------------------------------------------------------------------------------

    def direct(self, obj: object, level: int = 0) -> bool:
        """Strings and names in ``obj`` and its direct (not indirect) children."""
        texts: list[str] = []
        self._collect(obj, texts, level)
        return any(text_contains(t, self.rx) for t in texts) or text_contains(
            " ".join(texts), self.rx
        )

    def _collect(self, obj: object, texts: list[str], level: int) -> None:
        if level > 64:
            raise _CannotSearch
        if isinstance(obj, pikepdf.String):
            raw = bytes(obj)
            texts.append(str(obj))
            texts.extend(t for t in (raw.decode("latin-1"), raw.decode("utf-8", "ignore")))
        elif isinstance(obj, pikepdf.Name):
            texts.append(str(obj)[1:])
        elif isinstance(obj, pikepdf.Array):
            for item in obj:
                if not getattr(item, "is_indirect", False):
                    self._collect(item, texts, level + 1)
        elif isinstance(obj, (pikepdf.Dictionary, pikepdf.Stream)):
            for key in obj.keys():  # noqa: SIM118 - pikepdf dictionaries
                texts.append(key[1:])
                value = obj.get(key)
                if value is not None and not getattr(value, "is_indirect", False):
                    self._collect(value, texts, level + 1)

    def stream(self, stream: pikepdf.Stream, depth: int) -> bool:
        if stream.get("/Subtype") == pikepdf.Name.Image:
            return False  # pixels; their raw bytes were searched with the file
        body = self.decode(stream)
        return body is not None and self.blob(body, depth)

    def decode(self, stream: pikepdf.Stream) -> bytes | None:
        raw = stream.read_raw_bytes()
        filters = stream.get("/Filter")
        if filters is None:
            names: list[str] = []
        elif isinstance(filters, pikepdf.Array):
            names = [str(f) for f in filters]
        else:
            names = [str(filters)]
        if any(n in _IMAGE_FILTERS for n in names):
            return None
        body: bytes | None = raw
        for name in names:
            if body is None:
                return None
            if name in ("/FlateDecode", "/Fl"):
                body = _inflate(body, partial=True)
            elif name in ("/ASCIIHexDecode", "/AHx"):
                body = _ascii_hex(body)
            elif name in ("/ASCII85Decode", "/A85"):
                body = _ascii85(body)
            else:  # LZW, RunLength, Crypt: let qpdf decode, if small enough not to explode
                if len(raw) > _MAX_OTHER_FILTER_RAW:
                    raise _CannotSearch
                try:
                    body = stream.read_bytes()
                except Exception:
                    return None
                break
        if body is not None:
            self.decoded += len(body)
            if self.decoded > _MAX_DECODED:
                raise _CannotSearch
        return body

    def blob(self, body: bytes, depth: int) -> bool:
        """A decoded stream or embedded file: its bytes, strings, XML text, nested files."""
        if bytes_contain(body, self.rx) or self.strings(body):
            return True
        head = body[:1024]
        if b"<x:xmpmeta" in body[:4096] or head.lstrip().startswith(b"<?xml"):
            text = html.unescape(re.sub(r"<[^>]*>", " ", body.decode("utf-8", "ignore")))
            if text_contains(text, self.rx):
                return True
        if depth < _MAX_DEPTH and b"%PDF-" in head:
            return self.pdf(body, depth + 1)
        if depth < _MAX_DEPTH and body.startswith(b"PK\x03\x04"):
            from broker.attachments.docx import zip_contains

            return zip_contains(body, self.rx, depth + 1)
        return False

    def strings(self, body: bytes) -> bool:
        """PDF string literals in ``body`` (content streams, objects), read three ways."""
        return any(text_contains(t, self.rx) for t in _string_texts(body))


_IMAGE_DICT = re.compile(rb"/Subtype\s*/Image\b")
_IMAGE_FILTERS = {
    "/DCTDecode",
    "/DCT",
    "/JPXDecode",
    "/JBIG2Decode",
    "/CCITTFaxDecode",
    "/CCF",
}


def _revisions(data: bytes) -> list[int]:
    """End offsets of each revision: just past each %%EOF (and its line break)."""
    ends: list[int] = []
    for match in re.finditer(rb"%%EOF[ \t]*(?:\r\n|\r|\n)?", data):
        ends.append(match.end())
    if not ends or ends[-1] < len(data.rstrip(b" \t\r\n\x00")):
        ends.append(len(data))
    ends[-1] = len(data)
    return ends


def _inflate(raw: bytes, *, partial: bool) -> bytes | None:
    """zlib-inflate at most _MAX_STREAM bytes; what could be read before an error, or None."""
    out: list[bytes] = []
    total = 0
    inflater = zlib.decompressobj()
    try:
        for pos in range(0, len(raw), 65536):
            chunk = inflater.decompress(raw[pos : pos + 65536], _MAX_STREAM - total)
            total += len(chunk)
            out.append(chunk)
            if inflater.unconsumed_tail or total >= _MAX_STREAM:
                raise _CannotSearch
            if inflater.eof:
                break
    except zlib.error:
        if not partial or not out:
            return None
    return b"".join(out) if total else None


def _ascii_hex(raw: bytes) -> bytes | None:
    digits = re.sub(rb"[^0-9A-Fa-f]", b"", raw.split(b">", 1)[0])
    if len(digits) % 2:
        digits += b"0"
    try:
        return bytes.fromhex(digits.decode("ascii"))
    except ValueError:
        return None


def _ascii85(raw: bytes) -> bytes | None:
    body = raw.strip()
    if body.startswith(b"<~"):
        body = body[2:]
    body = body.split(b"~>", 1)[0]
    try:
        return base64.a85decode(re.sub(rb"\s", b"", body))
    except ValueError:
        return None


_STRING_TOKEN = re.compile(rb"\((?:[^()\\]|\\.)*\)|(?<!<)<[0-9A-Fa-f\s]*>(?!>)", re.DOTALL)
_KERN_GAP = re.compile(rb"\s*(-?\d*\.?\d*)\s*")
_ESCAPES = {
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("("): b"(",
    ord(")"): b")",
    ord("\\"): b"\\",
}


_ESCAPE = re.compile(rb"\\([0-7]{1,3}|\r\n|[\s\S])")


def _unescape(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    if code[0] in b"01234567":
        return bytes([int(code, 8) & 0xFF])
    if code in (b"\r\n", b"\r", b"\n"):  # a line continuation
        return b""
    return _ESCAPES.get(code[0], code)


def _literal(body: bytes) -> bytes:
    """The bytes of a PDF literal string body (escapes resolved)."""
    return _ESCAPE.sub(_unescape, body) if b"\\" in body else body


def _string_bytes_to_text(raw: bytes) -> str:
    if raw.startswith(b"\xfe\xff"):
        return raw[2:].decode("utf-16-be", errors="ignore")
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8", errors="ignore")
    return raw.decode("latin-1")


def _string_texts(body: bytes) -> Iterator[str]:
    """The PDF strings in ``body`` joined three ways: as shown (a TJ kerning gap joins the
    pieces of a word, a wide gap or an operator makes a space), all without spaces, all with.
    """
    pieces: list[str] = []
    shown: list[str] = []
    last_end = -1
    for match in _STRING_TOKEN.finditer(body):
        token = match.group()
        if token.startswith(b"("):
            text = _string_bytes_to_text(_literal(token[1:-1]))
        else:
            digits = re.sub(rb"\s", b"", token[1:-1])
            if len(digits) % 2:
                digits += b"0"
            text = _string_bytes_to_text(bytes.fromhex(digits.decode("ascii")))
        if last_end >= 0:
            gap = body[last_end : match.start()]
            kern = _KERN_GAP.fullmatch(gap) if len(gap) < 32 else None
            joined = False
            if kern is not None:
                number = kern.group(1)
                try:
                    joined = not number or float(number) > -200
                except ValueError:
                    joined = False
            shown.append("" if joined else " ")
        shown.append(text)
        pieces.append(text)
        last_end = match.end()
    if pieces:
        yield "".join(shown)
        yield "".join(pieces)
        yield " ".join(pieces)
