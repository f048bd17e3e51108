"""HTML to plain text for mail bodies.

Used for HTML-only replies from parents and for HTML-only provider mail, so the
result must keep the document's paragraph structure: every block (``<p>``,
``<div>``, headings, list items) starts a new line and paragraphs are separated
by a blank line, which is what the paragraph numbering of a held record needs.
inscriptis does the layout (it follows the CSS display model, unlike a tag
stripper); we only pick its profile and tidy the whitespace.
"""

from __future__ import annotations

import re

from inscriptis.css_profiles import CSS_PROFILES
from inscriptis.html_engine import Inscriptis
from inscriptis.model.config import ParserConfig
from lxml.etree import ParserError
from lxml.html import HtmlElement, document_fromstring

# The "strict" profile mirrors browser defaults: <div> is a plain block. The
# "relaxed" default indents every <div> by two spaces, which would turn the
# nested <div>s that webmail produces into ever deeper indentation.
_CONFIG = ParserConfig(css=CSS_PROFILES["strict"].copy())

_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def parse_html(html: str) -> HtmlElement | None:
    """Parse a mail's HTML into an lxml tree, or None when there is nothing to parse.

    lxml refuses ``str`` input that still carries an ``<?xml encoding=...?>``
    declaration (Hotmail sends one), so it is dropped; the text is already decoded.
    """
    html = _XML_DECLARATION.sub("", html or "", count=1).strip()
    if not html:
        return None
    try:
        return document_fromstring(html)
    except ParserError:  # e.g. only a comment: nothing lxml can root a tree on
        return None


# Inline styles that make an element invisible in a mail client although its text is in the
# document. inscriptis drops display:none itself; these are the other ways.
_HIDING_STYLE = re.compile(
    r"(?:^|[;{\s])(?:"
    r"display\s*:\s*none"
    r"|visibility\s*:\s*(?:hidden|collapse)"
    r"|opacity\s*:\s*[0.]+(?:%)?\s*(?:!important\s*)?(?:[;}]|$)"
    r"|font-size\s*:\s*[0.]+(?:[a-z%]+)?\s*(?:!important\s*)?(?:[;}]|$)"
    r"|mso-hide\s*:\s*all"
    r"|color\s*:\s*transparent"
    r")",
    re.IGNORECASE,
)
_CLIPPED = re.compile(
    r"(?:^|[;{\s])(?:max-)?(?:height|width)\s*:\s*[0.]+(?:[a-z%]+)?\s*(?:!important\s*)?(?:[;}]|$)",
    re.IGNORECASE,
)
_OVERFLOW_HIDDEN = re.compile(r"overflow(?:-[xy])?\s*:\s*hidden", re.IGNORECASE)


def _hides(style: str) -> bool:
    return bool(_HIDING_STYLE.search(style)) or bool(
        _CLIPPED.search(style) and _OVERFLOW_HIDDEN.search(style)
    )


def remove_hidden(tree: HtmlElement) -> bool:
    """Remove the elements a reader cannot see (``hidden``, ``<template>``, inline styles
    such as display:none, visibility:hidden, font-size:0, opacity:0, mso-hide:all).

    Returns True when a ``<style>`` sheet holds hiding rules: which elements they hide
    cannot be told without a CSS engine, so a caller that needs the *visible* text (the
    parent's reply) must not trust the result.
    """
    doomed = [
        el
        for el in tree.iter()
        if isinstance(el.tag, str)
        and (
            el.tag.lower() == "template"
            or el.get("hidden") is not None
            or _hides(el.get("style") or "")
        )
    ]
    for el in doomed:
        if el.getparent() is not None:
            el.drop_tree()  # keeps the element's tail text, which is outside it
    return any(_hides(style.text_content()) for style in tree.iter("style"))


def tree_to_text(tree: HtmlElement | None) -> str:
    """Render a parsed tree as text (see :func:`html_to_text`)."""
    if tree is None:
        return ""
    text = Inscriptis(tree, _CONFIG).get_text()
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip("\n")


def html_to_text(html: str) -> str:
    """Render ``html`` as text: blocks on their own lines, paragraphs split by a blank line.

    Trailing spaces are dropped and runs of blank lines collapse to one, so the
    paragraph boundaries are unambiguous for whoever splits the text later.
    An empty or whitespace-only document gives ``""``.
    """
    return tree_to_text(parse_html(html))
