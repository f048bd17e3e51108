"""Paragraph splitting and text redaction: turns (Document, Draft) into what recipients get.

Pure functions over plain data. The release is always rebuilt from the original Document and
the parent's Draft, so every preview and every release can be recomputed and audited.

Matching rules (promise 2: a redacted phrase appears in no part of what is sent):

- phrases match case-insensitively under Unicode case folding ("STRASSE" matches "Straße")
  and across any run of whitespace or line breaks ("family conflict" matches "Family\\n conflict");
- body text (the parent's note and the kept paragraphs) and each attachment's kept paragraphs are
  matched as one sequence joined by blank lines, because that is how they are rendered: a phrase
  split over two paragraphs, or over the gap left by a removed paragraph, is still caught;
- files we cannot rewrite (binary attachments) are searched byte-wise and withheld on a hit;
- a final check re-searches the output and raises ``RedactionError`` rather than leak.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from broker.mail.document import Attachment, Document, Draft, Paragraph, ReleaseContent

MARKER = "[redacted]"
# Lines broker.attachments.docx.read_docx lists after a Word file's text.
DOCX_SIDE_NOTES = ("Comment by ", "Comment:", "Deleted text (tracked change):",
                   "Document property (")
# Blocks of text are joined with this when they are matched (and rendered) as one sequence.
_JOIN = "\n\n"

_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")

Span = tuple[int, int]


class RedactionError(RuntimeError):
    """The output still contains a phrase the parent removed; nothing may be released."""


def split_paragraphs(text: str, prefix: str = "") -> tuple[Paragraph, ...]:
    """Number the blank-line separated blocks of ``text`` so the parent can name them.

    Ids are ``"1"``, ``"2"``... or, with ``prefix="A1."``, ``"A1.1"``, ``"A1.2"``...
    Single line breaks stay inside a paragraph; trailing spaces on lines are dropped.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: list[Paragraph] = []
    for block in _BLANK_LINES.split(text):
        cleaned = "\n".join(line.rstrip() for line in block.strip().split("\n")).strip()
        if cleaned:
            out.append(Paragraph(id=f"{prefix}{len(out) + 1}", text=cleaned))
    return tuple(out)


# --- matching -------------------------------------------------------------------------------


def normalize_phrase(phrase: str) -> str:
    """Collapse whitespace so phrases compare and display the same however they were typed."""
    return " ".join(phrase.split())


def _phrase_source(phrase: str) -> str | None:
    """Regex source matching ``phrase`` in case-folded text, across any whitespace run."""
    words = phrase.casefold().split()
    if not words:
        return None
    return r"\s+".join(re.escape(w) for w in words)


def _fold(text: str) -> tuple[str, list[int] | None]:
    """Case-fold ``text``; also return folded-index -> original-index when lengths differ."""
    folded = text.casefold()
    if len(folded) == len(text):
        return folded, None  # every character folded to exactly one character
    index: list[int] = []
    for i, ch in enumerate(text):
        index.extend([i] * len(ch.casefold()))
    return folded, index


def _merge(spans: Iterable[Span]) -> list[Span]:
    """Sort and merge overlapping spans so each region is replaced once."""
    out: list[Span] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _replace_spans(text: str, spans: Sequence[Span]) -> str:
    """Replace each (merged, sorted) span of ``text`` with the marker."""
    parts: list[str] = []
    pos = 0
    for start, end in spans:
        parts.append(text[pos:start])
        parts.append(MARKER)
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


@dataclass
class _Redactor:
    """Finds and replaces phrases and always-redact patterns; records where it did."""

    phrases: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    phrase_res: tuple[re.Pattern[str] | None, ...] = ()
    combined: re.Pattern[str] | None = None
    phrase_places: list[str] = field(default_factory=list)
    pattern_places: list[str] = field(default_factory=list)
    phrase_hits: int = 0
    pattern_hits: int = 0
    found: set[int] = field(default_factory=set)  # indexes into phrases that matched anywhere

    def __post_init__(self) -> None:
        sources = [_phrase_source(p) for p in self.phrases]
        self.phrase_res = tuple(re.compile(s) if s else None for s in sources)
        alts = sorted({s for s in sources if s}, key=len, reverse=True)
        self.combined = re.compile("|".join(alts)) if alts else None

    @property
    def active(self) -> bool:
        return self.combined is not None or bool(self.patterns)

    def _phrase_spans(self, text: str) -> list[Span]:
        if self.combined is None:
            return []
        folded, index = _fold(text)
        for i, rx in enumerate(self.phrase_res):
            if i not in self.found and rx is not None and rx.search(folded):
                self.found.add(i)
        spans: list[Span] = []
        for m in self.combined.finditer(folded):
            if m.end() > m.start():
                if index is None:
                    spans.append((m.start(), m.end()))
                else:
                    spans.append((index[m.start()], index[m.end() - 1] + 1))
        return spans

    def _pattern_spans(self, text: str) -> list[Span]:
        return [m.span() for p in self.patterns for m in p.finditer(text) if m.end() > m.start()]

    def segments(self, texts: Sequence[str], places: Sequence[str]) -> list[str]:
        """Redact a sequence of blocks that is rendered joined by blank lines.

        Patterns run first (so a phrase cannot break up, say, an ID number before the
        pattern sees it), then phrases on the result.
        """
        texts = list(texts)
        for finder, where, kind in (
            (self._pattern_spans, self.pattern_places, "pattern"),
            (self._phrase_spans, self.phrase_places, "phrase"),
        ):
            joined = _JOIN.join(texts)
            spans = _merge(finder(joined))
            if not spans:
                continue
            out: list[str] = []
            pos = 0
            for text, place in zip(texts, places, strict=True):
                start, end = pos, pos + len(text)
                local = _merge(
                    (max(s, start) - start, min(e, end) - start)
                    for s, e in spans
                    if s < end and e > start
                )
                if local:
                    if place not in where:
                        where.append(place)
                    if kind == "phrase":
                        self.phrase_hits += len(local)
                    else:
                        self.pattern_hits += len(local)
                out.append(_replace_spans(text, local))
                pos = end + len(_JOIN)
            texts = out
        return texts

    def text(self, text: str, place: str) -> str:
        """Redact one stand-alone string (subject, filename, note)."""
        return self.segments([text], [place])[0]

    def bytes_contain(self, data: bytes) -> tuple[bool, bool]:
        """(phrase found, pattern found) in ``data`` under the usual text encodings.

        Best effort for files we cannot rewrite: compressed streams (most PDFs, images)
        cannot be searched, which is why such files are only released whole when the
        parent approved them whole.
        """
        phrase = pattern = False
        for decoded in _decodings(data):
            if not phrase and self.combined is not None:
                folded = decoded.casefold()
                for i, rx in enumerate(self.phrase_res):
                    if rx is not None and rx.search(folded):
                        self.found.add(i)
                        phrase = True
            if not pattern and any(p.search(decoded) for p in self.patterns):
                pattern = True
        return phrase, pattern


def _decodings(data: bytes) -> Iterable[str]:
    """The readings of raw bytes a phrase could hide in: UTF-8, Latin-1, UTF-16 both ways."""
    yield data.decode("utf-8", errors="ignore")
    yield data.decode("latin-1")
    for codec in ("utf-16-le", "utf-16-be"):
        yield data.decode(codec, errors="ignore")
        yield data[1:].decode(codec, errors="ignore")


def contains_phrase(text: str, phrase: str) -> bool:
    """True if ``phrase`` occurs in ``text`` (folded, whitespace-flexible) outside our markers.

    The marker's own letters are not a leak ("REDACT red" is legal), and a marker never joins
    two halves of a phrase, so each stretch between markers is searched on its own.
    """
    source = _phrase_source(phrase)
    if source is None:
        return False
    rx = re.compile(source)
    return any(rx.search(piece.casefold()) for piece in text.split(MARKER))


# --- applying a draft -----------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _attachment_name(att: Attachment, red: _Redactor) -> str:
    """Label and (redacted) filename for change lines; never shows removed text."""
    probe = _Redactor(red.phrases, red.patterns)
    return f"{att.label} ({probe.text(att.filename, '')})"


_TXT = ".txt"


def _rendered_filename(att: Attachment, filename: str) -> str:
    """Rebuilt attachments are plain text: say so in the name unless it already does."""
    if att.content_type.lower().startswith("text/plain") or filename.lower().endswith(_TXT):
        return filename
    return filename + _TXT


def _strip_txt(filename: str) -> str:
    return filename[: -len(_TXT)] if filename.lower().endswith(_TXT) else filename


def apply_draft(
    document: Document,
    draft: Draft,
    always_redact: tuple[re.Pattern[str], ...] = (),
) -> ReleaseContent:
    """Compute exactly what recipients get for ``draft``: the only way release content is made.

    Removes paragraphs by id, drops attachments, replaces phrases and ``always_redact``
    matches with ``[redacted]`` everywhere, rebuilds redacted text attachments as plain text,
    and withholds binary attachments that contain a removed phrase. ``changes`` says what
    happened, by paragraph id and attachment label, never quoting removed text.
    Raises ``RedactionError`` if a removed phrase could still be found in the result.
    """
    phrases = tuple(p for p in (normalize_phrase(x) for x in draft.phrases) if p)
    red = _Redactor(phrases, tuple(always_redact))
    ids = {i.upper() for i in draft.redact_ids}
    dropped = {d.upper() for d in draft.dropped}
    changes: list[str] = []

    subject = red.text(document.subject, "the subject")

    # Body: the note and the kept paragraphs are rendered together, so redact them together.
    kept = [p for p in document.paragraphs if p.id.upper() not in ids]
    changes.extend(f"Removed paragraph {p.id}" for p in document.paragraphs if p.id.upper() in ids)
    texts = ([draft.note] if draft.note else []) + [p.text for p in kept]
    places = (["your note"] if draft.note else []) + [f"paragraph {p.id}" for p in kept]
    redacted = red.segments(texts, places)
    note = redacted.pop(0) if draft.note else ""
    paragraphs = tuple(Paragraph(p.id, t) for p, t in zip(kept, redacted, strict=True))

    attachments: list[Attachment] = []
    for att in document.attachments:
        name = _attachment_name(att, red)
        if att.label.upper() in dropped:
            changes.append(f"Left out attachment {name}, as you asked")
            continue
        result = _apply_attachment(att, ids, red, name, changes,
                                   pages={int(ref.partition(" p.")[2]) for ref in draft.redact_pages
                                          if ref.partition(" p.")[0].upper() == att.label.upper()})
        if result is not None:
            attachments.append(result)

    if red.phrase_hits:
        changes.append(
            f"Replaced {_plural(red.phrase_hits, 'occurrence')} of the phrases you asked to "
            f"remove with {MARKER} in: {', '.join(red.phrase_places)}"
        )
    for i in range(len(phrases)):
        if i not in red.found:
            changes.append(
                f"Phrase {i + 1} of {len(phrases)} you asked to remove was not found in what "
                "will be sent"
            )
    if red.pattern_hits:
        changes.append(
            f"Replaced {_plural(red.pattern_hits, 'match')} of the always-redacted patterns "
            f"with {MARKER} in: {', '.join(red.pattern_places)}"
        )

    content = ReleaseContent(
        subject=subject,
        note=note,
        paragraphs=paragraphs,
        attachments=tuple(attachments),
        changes=tuple(changes),
    )
    _verify(content, phrases, document)
    return content


def _apply_attachment(
    att: Attachment,
    ids: set[str],
    red: _Redactor,
    name: str,
    changes: list[str],
    pages: set[int] | None = None,
) -> Attachment | None:
    """Redact one kept attachment; None when it must not be sent at all."""
    filename = red.text(att.filename, f"the name of attachment {att.label}")
    att_note = red.text(att.note, f"the description of attachment {att.label}")
    if att.problem:
        changes.append(f"Withheld attachment {name}: {att.problem}. It cannot be checked, so "
                       f"it is never sent; DROP {att.label} to confirm")
        return None
    if att.kind in ("pdf", "docx") and att.paragraphs is not None:
        return _apply_document(att, ids, pages or set(), red, name, changes, filename, att_note)
    phrase_in_bytes, pattern_in_bytes = red.bytes_contain(att.data) if red.active else (False,) * 2

    if att.paragraphs is None:
        if phrase_in_bytes or pattern_in_bytes:
            why = (
                "a phrase you asked to remove"
                if phrase_in_bytes
                else "text that is always redacted"
            )
            changes.append(
                f"Withheld attachment {name}: it contains {why} and this kind of file cannot "
                f"be redacted. DROP {att.label} to confirm, or APPROVE to send without it"
            )
            return None
        return replace(att, filename=filename, note=att_note)

    removed = [p for p in att.paragraphs if p.id.upper() in ids]
    changes.extend(f"Removed paragraph {p.id}" for p in removed)
    kept = [p for p in att.paragraphs if p.id.upper() not in ids]
    before_hits = red.phrase_hits + red.pattern_hits
    texts = red.segments([p.text for p in kept], [f"paragraph {p.id}" for p in kept])
    touched = (
        bool(removed)
        or red.phrase_hits + red.pattern_hits > before_hits
        or phrase_in_bytes
        or pattern_in_bytes
    )
    if not touched:
        return replace(att, filename=filename, note=att_note)
    if not kept:
        changes.append(f"Left out attachment {name}: all of its paragraphs were removed")
        return None
    new_paragraphs = tuple(Paragraph(p.id, t) for p, t in zip(kept, texts, strict=True))
    body = _JOIN.join(p.text for p in new_paragraphs) + "\n"
    data = body.encode("utf-8")
    changes.append(
        f"Attachment {name} is sent as plain text rebuilt from its remaining paragraphs, "
        "because parts of it were removed"
    )
    return Attachment(
        label=att.label,
        filename=_rendered_filename(att, filename),
        content_type="text/plain",
        size=len(data),
        data=data,
        paragraphs=new_paragraphs,
        note=att_note,
    )


def _apply_document(
    att: Attachment,
    ids: set[str],
    pages: set[int],
    red: _Redactor,
    name: str,
    changes: list[str],
    filename: str,
    att_note: str,
) -> Attachment:
    """A PDF or Word file: passed as it came when nothing in it is removed; otherwise
    rebuilt by the broker. A PDF becomes a new PDF made of images of its pages with the
    removed parts blacked out (no text layer, metadata, annotations or embedded files are
    carried over); a Word file becomes a PDF the broker renders from the approved text."""
    from broker.attachments.docx import docx_contains, render_text_pdf
    from broker.attachments.pdf import pdf_contains, redact_pdf

    paragraphs = att.paragraphs or ()
    removed = [p for p in paragraphs if p.id.upper() in ids]
    kept = [p for p in paragraphs if p.id.upper() not in ids and (p.page not in pages)]
    texts = red.segments([p.text for p in kept], [f"paragraph {p.id}" for p in kept])
    kept_paragraphs = tuple(Paragraph(p.id, t, p.page) for p, t in zip(kept, texts, strict=True))
    contains = pdf_contains if att.kind == "pdf" else docx_contains
    phrase_inside = bool(red.phrases) and contains(att.data, red.phrases)
    if phrase_inside:
        # Found where the paragraphs do not show it too (metadata, annotations...).
        for i, rx in enumerate(red.phrase_res):
            if rx is not None and i not in red.found and contains(att.data, (red.phrases[i],)):
                red.found.add(i)
    if not removed and not pages and not phrase_inside:
        return replace(att, filename=filename, note=att_note)
    changes.extend(f"Removed paragraph {p.id}" for p in removed)
    changes.extend(f"Removed page {n} of attachment {att.label}" for n in sorted(pages))
    if att.kind == "pdf":
        by_page: dict[int, list[int]] = {}
        for p in removed:
            if p.page is not None:
                on_page = att.page_paragraphs(p.page)
                by_page.setdefault(p.page, []).append(on_page.index(p))
        data = redact_pdf(att.data, paragraphs=by_page, pages=sorted(pages),
                          phrases=red.phrases)
        changes.append(
            f"Attachment {name} is sent as a new PDF the broker rebuilt from pictures of its "
            f"{att.pages} page{'s' if att.pages != 1 else ''}, with what was removed blacked "
            "out: it has no text layer, no document properties, no comments or annotations "
            "and no attached files")
        new_name = filename
    else:
        # What the Word file carries outside its text (comments, tracked deletions, document
        # properties) was shown to the parent, but a broker-made PDF has no place for it:
        # it is left out (sending less is always safe), and the preview says so.
        side = [p for p in kept_paragraphs if p.text.startswith(DOCX_SIDE_NOTES)]
        kept_paragraphs = tuple(p for p in kept_paragraphs if p not in side)
        if side:
            changes.append(f"Comments, tracked deletions and document properties of {name} "
                           f"({len(side)} item{'s' if len(side) != 1 else ''}) are left out "
                           "of the PDF")
        data = render_text_pdf([p.text for p in kept_paragraphs], heading=filename)
        new_name = (filename[:-5] if filename.lower().endswith(".docx") else filename) + ".pdf"
        changes.append(
            f"Attachment {name} is sent as a PDF the broker made from the approved text, "
            "because parts of it were removed (the Word file itself is not sent)")
    if red.phrases and pdf_contains(data, red.phrases):
        raise RedactionError(f"a removed phrase survived in the rebuilt {att.label}")
    return Attachment(
        label=att.label, filename=new_name, content_type="application/pdf", size=len(data),
        data=data, paragraphs=kept_paragraphs, note=att_note, kind="pdf",
        pages=att.pages, scanned=att.scanned,
    )


def _verify(content: ReleaseContent, phrases: tuple[str, ...], document: Document) -> None:
    """Fail closed: re-search everything that will be sent for every removed phrase.

    Bytes we rebuilt are UTF-8 text and are read as such; original bytes are read every way
    ``bytes_contain`` reads them.
    """
    if not phrases:
        return
    originals = {a.label: a.data for a in document.attachments}
    texts = [content.subject, content.note, *(p.text for p in content.paragraphs)]
    texts.append(_JOIN.join([content.note, *(p.text for p in content.paragraphs)]))
    for att in content.attachments:
        texts.extend([att.note, *(p.text for p in att.paragraphs or ())])
        texts.append(_JOIN.join(p.text for p in att.paragraphs or ()))
        if att.data == originals.get(att.label):
            texts.append(att.filename)
            texts.extend(_decodings(att.data))
        elif att.content_type == "application/pdf" and att.kind == "pdf":
            # Rebuilt by the broker (pictures of pages): checked with the PDF reader,
            # which sees every string and stream in it, in _apply_document.
            texts.append(att.filename)
        else:
            # Our ".txt" suffix is, like the marker, not the sender's text.
            texts.append(_strip_txt(att.filename))
            texts.append(att.data.decode("utf-8", errors="ignore"))
    for text in texts:
        for i, phrase in enumerate(phrases):
            if contains_phrase(text, phrase):
                raise RedactionError(f"phrase {i + 1} survived redaction")
