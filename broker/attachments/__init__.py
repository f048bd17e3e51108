"""Readers and redactors for the attachment types families actually get: PDF and Word.

``broker.attachments.pdf`` numbers a PDF's paragraphs per page, searches every corner of the
file for a phrase, and rebuilds redacted PDFs from page images. ``broker.attachments.docx``
does the reading and searching for Word files and renders approved text as a new PDF.

Phrases match here exactly as in ``broker.redact.text``: case-insensitively under Unicode
case folding, and across any run of whitespace or line breaks. The helpers below are that
rule applied to text whose characters must map back to positions (PDF characters on a page).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

Span = tuple[int, int]


def phrase_regex(phrases: Sequence[str]) -> re.Pattern[str] | None:
    """One regex over case-folded text matching any of ``phrases``; None when all are blank.

    The same rule as ``broker.redact.text``: each phrase is split into words, the words are
    case-folded and escaped, and any run of whitespace may stand between them.
    """
    sources = {
        r"\s+".join(re.escape(word) for word in words)
        for words in (phrase.casefold().split() for phrase in phrases)
        if words
    }
    if not sources:
        return None
    return re.compile("|".join(sorted(sources, key=len, reverse=True)))


def fold(text: str) -> tuple[str, list[int] | None]:
    """Case-fold ``text``; also map folded index -> original index when lengths differ."""
    folded = text.casefold()
    if len(folded) == len(text):
        return folded, None
    index: list[int] = []
    for i, ch in enumerate(text):
        index.extend([i] * len(ch.casefold()))
    return folded, index


def find_spans(text: str, rx: re.Pattern[str]) -> list[Span]:
    """Every (start, end) of ``rx`` in ``text``, in original-character indexes."""
    folded, index = fold(text)
    spans: list[Span] = []
    for m in rx.finditer(folded):
        if m.end() <= m.start():
            continue
        if index is None:
            spans.append((m.start(), m.end()))
        else:
            spans.append((index[m.start()], index[m.end() - 1] + 1))
    return spans


def text_contains(text: str, rx: re.Pattern[str]) -> bool:
    return rx.search(text.casefold()) is not None


def decodings(data: bytes) -> Iterable[str]:
    """The readings of raw bytes a phrase could hide in: UTF-8, Latin-1, UTF-16 both ways."""
    yield data.decode("utf-8", errors="ignore")
    yield data.decode("latin-1")
    for codec in ("utf-16-le", "utf-16-be"):
        yield data.decode(codec, errors="ignore")
        yield data[1:].decode(codec, errors="ignore")


# Large inputs are searched in overlapping windows, so memory stays a small multiple of the
# window rather than of the file (six decodings, each case-folded).
_WINDOW = 4 * 1024 * 1024
_OVERLAP = 64 * 1024


def bytes_contain(data: bytes, rx: re.Pattern[str]) -> bool:
    """True if ``rx`` matches any reading of ``data`` (see ``decodings``)."""
    if len(data) <= _WINDOW + _OVERLAP:
        return any(text_contains(text, rx) for text in decodings(data))
    for start in range(0, len(data), _WINDOW):
        piece = data[start : start + _WINDOW + _OVERLAP]
        if any(text_contains(text, rx) for text in decodings(piece)):
            return True
    return False
