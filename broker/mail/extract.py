"""Text extraction per attachment type: the seam where PDF and Word readers plug in.

Each extractor takes the decoded bytes and returns the text (paragraphs separated by
blank lines) or None when the type cannot be read; the caller numbers paragraphs.
"""

from __future__ import annotations

from collections.abc import Callable

Extractor = Callable[[bytes], str | None]


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


def extract_text(content_type: str, data: bytes) -> str | None:
    extractor = EXTRACTORS.get(content_type.lower().split(";")[0].strip())
    return extractor(data) if extractor else None
