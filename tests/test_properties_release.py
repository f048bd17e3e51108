"""Property tests (hypothesis) for the release builder and the command parser.

Release: for random documents - paragraphs of random text with the phrase dropped in at
random places, in random case and with random whitespace (line breaks included) between its
words, random text and binary attachments, the phrase in the subject and filenames -
``apply_draft`` with the phrase redacted leaves it nowhere in the ``ReleaseContent``, and
the message composed from it (``render_release`` + ``compose_release``) holds it in no
reading: raw bytes, quoted-printable or base64 undone, headers and filenames decoded.

Parser: random lines built from the command keywords, look-alike letters (Cyrillic,
Greek, fullwidth), invisible and bidi characters never give Approve unless a line is
exactly APPROVE (any case, surrounding whitespace, trailing '.' or '!').
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.mail.compose import compose_release
from broker.mail.document import Attachment, Document, Draft, ReleaseContent
from broker.redact.text import RedactionError, apply_draft, contains_phrase, split_paragraphs
from broker.review.commands import Approve, Deny, is_hidden, parse_commands
from broker.review.render import ReleaseContext, render_release
from tests.test_redaction_leaks import PHRASE, readings

WORDS = ("family", "conflict")
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- documents with the phrase in random places ---------------------------------------------

# Letters that make near-misses ("famil", "conflic", "families"), other scripts, and
# characters whose case folding changes length (ß, ﬀ).
filler = st.lists(
    st.sampled_from(
        [*"abcdefilmnotyFACLIT .,;:-'\"()ßéü中ﬀ\n\t", "  ", "\n\n", "famil", "conflic"]
    ),
    max_size=30,
).map("".join)


@st.composite
def phrase_variant(draw: st.DrawFn) -> str:
    """The phrase in random case, with random whitespace (spaces, tabs, line breaks)."""
    words = ["".join(c.upper() if draw(st.booleans()) else c for c in w) for w in WORDS]
    gap = draw(st.sampled_from([" ", "  ", "\n", " \n ", "\t", "\u00a0", "\r\n", "\n\n"]))
    return words[0] + gap + words[1]


@st.composite
def text_with_phrase(draw: st.DrawFn, max_pieces: int = 6) -> str:
    pieces = draw(st.lists(st.one_of(filler, phrase_variant()), max_size=max_pieces))
    return "".join(pieces)


@st.composite
def attachments(draw: st.DrawFn) -> tuple[Attachment, ...]:
    out: list[Attachment] = []
    for i in range(draw(st.integers(0, 3))):
        label = f"A{i + 1}"
        name = draw(st.one_of(filler, text_with_phrase(2))).replace("\n", " ") + ".txt"
        if draw(st.booleans()):
            text = draw(text_with_phrase())
            data = text.encode(draw(st.sampled_from(["utf-8", "utf-16"])))
            paragraphs = split_paragraphs(text, prefix=f"{label}.")
            out.append(Attachment(label, name, "text/plain", len(data), data, paragraphs))
        else:
            blob = draw(st.binary(max_size=64))
            if draw(st.booleans()):  # the phrase inside a binary file, in some encoding
                enc = draw(st.sampled_from(["utf-8", "latin-1", "utf-16-le", "utf-16-be"]))
                blob += draw(phrase_variant()).encode(enc) + draw(st.binary(max_size=16))
            out.append(Attachment(label, name, "application/octet-stream", len(blob), blob))
    return tuple(out)


@st.composite
def documents(draw: st.DrawFn) -> Document:
    body = draw(text_with_phrase(10))
    return Document(
        subject=" ".join(draw(text_with_phrase(3)).split()),
        sender="lee@clinic.example",
        sender_name="Dr. Lee",
        date="Mon, 2 Mar 2026 09:00:00 +0000",
        paragraphs=split_paragraphs(body),
        attachments=draw(attachments()),
    )


def _content_texts(content: ReleaseContent) -> list[str]:
    texts = [content.subject, content.note, *(p.text for p in content.paragraphs)]
    texts.append("\n\n".join([content.note, *(p.text for p in content.paragraphs)]))
    for att in content.attachments:
        texts.append(att.filename)
        texts.append(att.note)
        texts.extend(p.text for p in att.paragraphs or ())
        texts.append("\n\n".join(p.text for p in att.paragraphs or ()))
        for enc in ("utf-8", "latin-1", "utf-16-le", "utf-16-be"):
            texts.append(att.data.decode(enc, errors="ignore"))
            texts.append(att.data[1:].decode(enc, errors="ignore"))
    return texts


def _draft(draw_note: str, draw_phrase_case: str) -> Draft:
    return Draft(phrases=(draw_phrase_case,), note=draw_note)


phrase_as_typed = st.sampled_from(["family conflict", "Family Conflict", "FAMILY  CONFLICT"])


@FAST
@given(documents(), phrase_as_typed, st.one_of(st.just(""), text_with_phrase(3)))
def test_apply_draft_leaves_no_phrase(doc: Document, typed: str, note: str) -> None:
    try:
        content = apply_draft(doc, _draft(note, typed))
    except RedactionError:  # fail closed is allowed, never a leak; but it should not happen
        raise AssertionError("apply_draft refused its own output") from None
    for text in _content_texts(content):
        # Our own marker is not the sender's text: search between markers, as the broker does.
        assert not contains_phrase(text, "family conflict"), text
        for piece in text.split("[redacted]"):
            assert not PHRASE.search(piece), piece


@FAST
@given(documents(), st.one_of(st.just(""), text_with_phrase(3)))
def test_composed_release_holds_no_phrase_in_any_reading(doc: Document, note: str) -> None:
    content = apply_draft(doc, _draft(note, "family conflict"))
    text = render_release(
        ReleaseContext(
            record_id=7,
            child_name="Sam Rivera",
            content=content,
            released_by="Dana Rivera",
            released_at=datetime(2026, 3, 2, 10, 0, tzinfo=UTC),
        )
    )
    data = compose_release(
        child_name="Sam Rivera",
        slug="sam",
        domain="records.example",
        record_id=7,
        to="park@school.example",
        subject=content.subject or "(no subject)",
        text=text,
        attachments=content.attachments,
    )
    for reading in readings(data):
        for piece in reading.split("[redacted]"):
            m = PHRASE.search(piece)
            assert m is None, piece[max(0, m.start() - 60) : m.end() + 60]


# --- the parser -----------------------------------------------------------------------------

LOOKALIKES = [*"АаРрОоЕеСсВНКМТХΑΡΟΕΝΤΥνορＡＰＲＯＶＥＤＮＹａｐｒｏｖｅ", "𝐀", "𝐏", "ı", "ɑ"]
INVISIBLE = [
    "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\u034f",
    "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069",
    "\u200e", "\u200f", "\u061c", "\ufe0f", "\U000e0041", "\u3164", "\x00", "\x1b",
]  # fmt: skip
PIECES = [
    "APPROVE", "approve", "Approve", "APP", "ROVE", "A", "P", "R", "O", "V", "E",
    "DENY", "deny", "NOTE", "REDACT", "HELP", "TO", " ", "  ", "\t", "\u00a0", ".", "!", ":",
    '"', "2", "A1", "thanks",
]  # fmt: skip
APPROVE_LINE = re.compile(r"approve[.!]*", re.IGNORECASE)

piece = st.one_of(st.sampled_from(PIECES), st.sampled_from(LOOKALIKES), st.sampled_from(INVISIBLE))
line = st.lists(piece, max_size=8).map("".join)
reply = st.lists(line, min_size=1, max_size=6)


def _plain_approve(text_line: str) -> bool:
    return text_line.strip().isascii() and APPROVE_LINE.fullmatch(text_line.strip()) is not None


def _lines(text: str) -> list[str]:
    text = text.removeprefix("\ufeff")  # a byte order mark opening the text is not content
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


@settings(max_examples=1000, deadline=None)
@given(reply, st.sampled_from(["\n", "\r\n", "\n\n"]))
def test_confusables_never_approve(lines: list[str], sep: str) -> None:
    text = sep.join(lines)
    result = parse_commands(text)
    if Approve() in result.commands:
        assert any(_plain_approve(x) for x in _lines(text)), text
    if Deny() in result.commands:
        assert any(
            x.strip().isascii() and re.fullmatch(r"deny[.!]*", x.strip(), re.I)
            for x in _lines(text)
        )


@settings(max_examples=500, deadline=None)
@given(line, st.sampled_from(INVISIBLE), st.integers(0, 100))
def test_a_line_with_a_hidden_character_is_a_problem(text: str, hidden: str, at: int) -> None:
    at = at % (len(text) + 1)
    poisoned = text[:at] + hidden + text[at:]
    if not poisoned.strip(" \t\u00a0" + "".join(INVISIBLE)):
        return  # nothing but invisible characters and spaces: a blank line
    result = parse_commands("REDACT 2\n" + poisoned + "\nDENY")
    assert result.problems, poisoned
    assert Approve() not in result.commands


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["APPROVE", "DENY", "HELP", "NOTE x", "TO tag:ot", "DROP A1"]), st.data())
def test_one_lookalike_letter_spoils_the_command(command: str, data: st.DataObject) -> None:
    swaps = {"A": "АΑＡ", "P": "РΡＰ", "O": "ОΟＯ", "E": "ЕΕＥ", "N": "ΝＮ", "T": "ТΤＴ",
             "H": "НΗＨ", "D": "ＤᎠ", "R": "ＲᏒ", "V": "ＶᏙ", "Y": "ҮΥＹ", "L": "ＬᏞ"}  # fmt: skip
    positions = [i for i, c in enumerate(command) if c in swaps]
    i = data.draw(st.sampled_from(positions))
    fake = command[:i] + data.draw(st.sampled_from(swaps[command[i]])) + command[i + 1 :]
    assert not all(is_hidden(c) for c in fake)
    result = parse_commands(fake)
    assert result.commands == () or not result.ok, fake
    assert any("look like letters" in p for p in result.problems), (fake, result.problems)
