"""Redaction: what recipients get never contains what the parent removed."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker.mail.document import Attachment, Document, Draft, Paragraph, ReleaseContent
from broker.redact.text import MARKER, apply_draft, split_paragraphs

SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")


# --- helpers --------------------------------------------------------------------------------


def norm(text: str) -> str:
    """Independent oracle: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def present(phrase: str, text: str) -> bool:
    """Phrase in text, ignoring our own markers (their letters are not the sender's text)."""
    needle = norm(phrase)
    return bool(needle) and any(needle in norm(piece) for piece in text.split(MARKER))


def decodings(data: bytes) -> list[str]:
    out = [data.decode("utf-8", errors="ignore"), data.decode("latin-1")]
    for codec in ("utf-16-le", "utf-16-be"):
        out += [data.decode(codec, errors="ignore"), data[1:].decode(codec, errors="ignore")]
    return out


def everything_sent(content: ReleaseContent, document: Document) -> list[str]:
    """Every string a recipient could see, including bytes read every plausible way."""
    originals = {a.label: a.data for a in document.attachments}
    texts = [content.subject, content.note, *(p.text for p in content.paragraphs)]
    texts.append("\n\n".join([content.note, *(p.text for p in content.paragraphs)]))
    texts.append("\n\n".join(p.text for p in content.paragraphs))
    for att in content.attachments:
        texts += [att.note, *(p.text for p in att.paragraphs or ())]
        texts.append("\n\n".join(p.text for p in att.paragraphs or ()))
        if att.data == originals[att.label]:
            texts.append(att.filename)
            texts += decodings(att.data)  # released as received: read it every way
        else:
            assert att.content_type == "text/plain"
            # The ".txt" we add, like the marker, is ours and not the sender's text.
            name = att.filename[:-4] if att.filename.lower().endswith(".txt") else att.filename
            texts.append(name)
            texts.append(att.data.decode("utf-8"))  # rebuilt by us as UTF-8 text
    return texts


def text_attachment(label: str, filename: str, text: str) -> Attachment:
    data = text.encode("utf-8")
    return Attachment(
        label=label,
        filename=filename,
        content_type="application/pdf",
        size=len(data),
        data=data,
        paragraphs=split_paragraphs(text, prefix=f"{label}."),
    )


def binary_attachment(label: str, filename: str, data: bytes) -> Attachment:
    return Attachment(label, filename, "image/png", len(data), data)


REPORT = """Progress report for Sam, March.

Sam attended 6 of 8 sessions.
Mood was variable; Sam talked about the Family
  conflict at home and about sleeping badly.

Fine-motor goals: handwriting legibility improved from 2/5 to 3/5.

Recommendation: continue weekly OT; share handwriting goals with school OT.
SSN on file: 123-45-6789"""


def report_document() -> Document:
    return Document(
        subject="Sam - progress report (family conflict discussed)",
        sender="therapist@clinic.example",
        sender_name="Dr. Lee",
        date="Mon, 3 Mar 2025 10:00:00 +0000",
        paragraphs=split_paragraphs(REPORT),
        attachments=(
            text_attachment(
                "A1", "session notes.pdf", "Session 1 notes.\n\nDiscussed FAMILY CONFLICT.\n\nOK."
            ),
            binary_attachment("A2", "drawing.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
            binary_attachment(
                "A3", "scan.tiff", b"II*\x00" + "family conflict".encode("utf-16-le")
            ),
        ),
    )


# --- split_paragraphs -----------------------------------------------------------------------


def test_split_paragraphs_numbers_blocks_and_keeps_single_breaks() -> None:
    paras = split_paragraphs("First line\r\nsecond line\r\n\r\n\r\n   \r\n  Third  \n\n")
    assert paras == (
        Paragraph("1", "First line\nsecond line"),
        Paragraph("2", "Third"),
    )


def test_split_paragraphs_prefix_for_attachments() -> None:
    assert [p.id for p in split_paragraphs("a\n\nb\n\nc", prefix="A2.")] == ["A2.1", "A2.2", "A2.3"]


def test_split_paragraphs_empty_text() -> None:
    assert split_paragraphs("") == ()
    assert split_paragraphs(" \n\t\n \r\n") == ()


line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")), min_size=1, max_size=30
).filter(lambda s: s.strip() != "")


@given(st.lists(st.lists(line_text, min_size=1, max_size=3), max_size=6), st.booleans())
def test_split_paragraphs_round_trip(blocks: list[list[str]], crlf: bool) -> None:
    """Joining blocks with blank lines and splitting gives the blocks back, in order."""
    expected = ["\n".join(line.strip() for line in block) for block in blocks]
    nl = "\r\n" if crlf else "\n"
    text = (nl + nl).join(nl.join(line.strip() for line in block) for block in blocks)
    paras = split_paragraphs(text)
    assert [p.text for p in paras] == expected
    assert [p.id for p in paras] == [str(i) for i in range(1, len(expected) + 1)]


# --- stories --------------------------------------------------------------------------------


def test_story_parent_redacts_a_phrase_and_a_paragraph() -> None:
    doc = report_document()
    draft = Draft(redact_ids=frozenset({"2"}), phrases=("family conflict",), dropped=frozenset())
    content = apply_draft(doc, draft, always_redact=(SSN,))

    assert content.subject == f"Sam - progress report ({MARKER} discussed)"
    assert [p.id for p in content.paragraphs] == ["1", "3", "4"]
    assert "123-45-6789" not in content.paragraphs[-1].text
    assert MARKER in content.paragraphs[-1].text
    # A1 had a phrase: rebuilt as text, never the original bytes.
    a1 = next(a for a in content.attachments if a.label == "A1")
    assert a1.content_type == "text/plain"
    assert a1.filename == "session notes.pdf.txt"
    assert a1.data == f"Session 1 notes.\n\nDiscussed {MARKER}.\n\nOK.\n".encode()
    assert a1.size == len(a1.data)
    # A2 is binary without the phrase: released whole. A3 hides it in UTF-16: withheld.
    assert [a.label for a in content.attachments] == ["A1", "A2"]
    assert content.attachments[1] == doc.attachments[1]
    assert any("Withheld attachment A3" in c and "DROP A3" in c for c in content.changes)
    assert "Removed paragraph 2" in content.changes
    for change in content.changes:
        assert not present("family conflict", change)
        assert "6 of 8" not in change
    for text in everything_sent(content, doc):
        assert not present("family conflict", text)


def test_dropped_attachments_are_left_out_and_said_so() -> None:
    doc = report_document()
    content = apply_draft(doc, Draft(dropped=frozenset({"A2", "a3"})))
    assert [a.label for a in content.attachments] == ["A1"]
    assert content.attachments[0] == doc.attachments[0]  # untouched text attachment: as received
    assert any("A2" in c and "Left out" in c for c in content.changes)
    assert any("A3" in c and "Left out" in c for c in content.changes)


def test_default_draft_releases_everything_unchanged() -> None:
    doc = report_document()
    content = apply_draft(doc, Draft())
    assert content.subject == doc.subject
    assert content.paragraphs == doc.paragraphs
    assert content.attachments == doc.attachments
    assert content.changes == ()


def test_removing_an_attachment_paragraph_rebuilds_it() -> None:
    doc = report_document()
    content = apply_draft(doc, Draft(redact_ids=frozenset({"a1.2"})))
    a1 = content.attachments[0]
    assert [p.id for p in a1.paragraphs or ()] == ["A1.1", "A1.3"]
    assert a1.data == b"Session 1 notes.\n\nOK.\n"
    assert "Removed paragraph A1.2" in content.changes


def test_attachment_with_every_paragraph_removed_is_left_out() -> None:
    doc = report_document()
    content = apply_draft(doc, Draft(redact_ids=frozenset({"A1.1", "A1.2", "A1.3"})))
    assert "A1" not in [a.label for a in content.attachments]
    assert any("all of its paragraphs were removed" in c for c in content.changes)


def test_phrase_split_over_paragraphs_and_a_removed_gap() -> None:
    """Rendered with blank lines between them, 'family' + 'conflict' would read as the phrase."""
    doc = Document("s", "a@b.c", "A", "d", split_paragraphs("We saw family\n\nsecret\n\nconflict."))
    content = apply_draft(doc, Draft(redact_ids=frozenset({"2"}), phrases=("family conflict",)))
    joined = "\n\n".join(p.text for p in content.paragraphs)
    assert not present("family conflict", joined)
    assert [p.text for p in content.paragraphs] == [f"We saw {MARKER}", f"{MARKER}."]


def test_note_is_redacted_too() -> None:
    doc = report_document()
    content = apply_draft(doc, Draft(phrases=("sleeping badly",), note="Sleeping  badly is old."))
    assert content.note == f"{MARKER} is old."


def test_case_folding_and_filenames() -> None:
    doc = Document(
        "STRASSE",
        "a@b.c",
        "A",
        "d",
        (Paragraph("1", "Die Straße ist lang"),),
        (binary_attachment("A1", "Straße.png", b"\x89PNG"),),
    )
    content = apply_draft(doc, Draft(phrases=("strasse",)))
    assert content.subject == MARKER
    assert content.paragraphs[0].text == f"Die {MARKER} ist lang"
    assert content.attachments[0].filename == f"{MARKER}.png"


@pytest.mark.parametrize(
    ("phrase", "text"),
    [("Straße", "STRASSE"), ("STRASSE", "straße"), ("ΣΟΦΊΑ", "σοφία"), ("İstanbul", "i̇stanbul")],
)
def test_case_folding_both_ways(phrase: str, text: str) -> None:
    doc = Document("s", "a@b.c", "A", "d", (Paragraph("1", f"in {text} now"),))
    content = apply_draft(doc, Draft(phrases=(phrase,)))
    assert content.paragraphs[0].text == f"in {MARKER} now"


def test_phrase_not_found_is_reported_without_quoting_it() -> None:
    content = apply_draft(report_document(), Draft(phrases=("famly conflict",)))
    assert "Phrase 1 of 1 you asked to remove was not found in what will be sent" in content.changes
    assert not any("famly" in c for c in content.changes)


def test_always_redact_withholds_binary_that_contains_it() -> None:
    doc = Document(
        "s",
        "a@b.c",
        "A",
        "d",
        (Paragraph("1", "x"),),
        (binary_attachment("A1", "f.bin", b"SSN 123-45-6789"),),
    )
    content = apply_draft(doc, Draft(), always_redact=(SSN,))
    assert content.attachments == ()
    assert any("always redacted" in c for c in content.changes)


# --- properties -----------------------------------------------------------------------------

# Text biased towards what breaks naive matching: case pairs, folding oddities, whitespace.
tricky = st.one_of(
    st.sampled_from(list("aAbBcC ßSsİiIıΣσς\n\t\u00a0  ")),
    st.characters(blacklist_categories=("Cs",)),
)
texts = st.text(alphabet=tricky, max_size=60)


def _mangle(phrase: str, case: int, spaces: list[str]) -> str:
    """The parent's typing: different case, different whitespace."""
    phrase = [phrase, phrase.upper(), phrase.lower(), phrase.swapcase()][case]
    words = phrase.split()
    out = words[0] if words else ""
    for i, w in enumerate(words[1:]):
        out += spaces[i % len(spaces)] + w
    return out


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=texts,
    body=texts,
    att_text=texts,
    filename=texts,
    note=texts,
    source=st.integers(0, 4),
    data=st.data(),
)
def test_no_phrase_survives_anywhere(
    subject: str,
    body: str,
    att_text: str,
    filename: str,
    note: str,
    source: int,
    data: st.DataObject,
) -> None:
    """A phrase taken from anywhere in the record, retyped, appears nowhere in the output."""
    origin = [subject, body, att_text, filename, note][source]
    start = data.draw(st.integers(0, len(origin)))
    end = data.draw(st.integers(start, len(origin)))
    case = data.draw(st.integers(0, 3))
    spaces = data.draw(st.lists(st.sampled_from([" ", "  ", "\n", "\t", "\u00a0"]), min_size=1))
    phrase = _mangle(origin[start:end], case, spaces)
    assume(phrase.strip())
    binary = data.draw(st.sampled_from(["utf-8", "utf-16-le", "utf-16-be", "latin-1"]))
    doc = Document(
        subject=subject,
        sender="p@clinic.example",
        sender_name="P",
        date="d",
        paragraphs=split_paragraphs(body),
        attachments=(
            text_attachment("A1", filename, att_text),
            binary_attachment("A2", filename + ".bin", body.encode(binary, errors="ignore")),
        ),
    )
    content = apply_draft(doc, Draft(phrases=(phrase,), note=note))
    for text in everything_sent(content, doc):
        assert not present(phrase, text), (phrase, text)


paragraph_filler = st.text(alphabet=st.sampled_from(list("abc xyz.\n")), max_size=20).filter(
    lambda s: not re.search(r"\n[^\S\n]*\n", s)  # no blank line: one paragraph each
)


@given(
    bodies=st.lists(paragraph_filler, min_size=1, max_size=6),
    att_bodies=st.lists(paragraph_filler, min_size=1, max_size=4),
    data=st.data(),
)
def test_removed_paragraphs_never_appear(
    bodies: list[str], att_bodies: list[str], data: st.DataObject
) -> None:
    """Each paragraph carries a unique tag; tags of removed paragraphs appear nowhere."""
    body = "\n\n".join(f"<<{i}>> {b}" for i, b in enumerate(bodies))
    att = "\n\n".join(f"<<A{i}>> {b}" for i, b in enumerate(att_bodies))
    doc = Document(
        "s", "a@b.c", "A", "d", split_paragraphs(body), (text_attachment("A1", "a.pdf", att),)
    )
    all_ids = sorted(doc.paragraph_ids())
    removed = data.draw(st.sets(st.sampled_from(all_ids)))
    content = apply_draft(doc, Draft(redact_ids=frozenset(removed)))
    tags = {p.id: p.text.split()[0] for p in doc.paragraphs}
    tags.update({p.id: p.text.split()[0] for p in doc.attachments[0].paragraphs or ()})
    sent = "\n".join(everything_sent(content, doc))
    for pid, tag in tags.items():
        assert (tag in sent) == (pid not in removed), (pid, tag)
    assert [p.id for p in content.paragraphs] == [
        p.id for p in doc.paragraphs if p.id not in removed
    ]
    # Changes name what was removed by id only.
    for pid in removed:
        assert f"Removed paragraph {pid}" in content.changes
        assert not any(tags[pid] in c for c in content.changes)


@given(st.text(max_size=80), st.text(alphabet="0123456789-", min_size=0, max_size=12))
def test_always_redact_pattern_never_survives_in_text(text: str, ssn_like: str) -> None:
    doc = Document(text, "a@b.c", "A", "d", split_paragraphs(text + " 123-45-6789 " + ssn_like))
    content = apply_draft(doc, Draft(), always_redact=(SSN,))
    for t in [content.subject, *(p.text for p in content.paragraphs)]:
        assert not any(SSN.search(piece) for piece in t.split(MARKER))


def test_rebuilt_attachment_bytes_are_never_the_original() -> None:
    doc = report_document()
    content = apply_draft(doc, Draft(phrases=("session",)))
    a1 = content.attachments[0]
    assert a1.data != doc.attachments[0].data
    assert b"session" not in a1.data.lower()


@pytest.mark.parametrize("phrase", ["redacted", "[redacted]", "d] x", "act"])
def test_phrases_that_overlap_the_marker_do_not_loop_or_leak(phrase: str) -> None:
    doc = Document("s", "a@b.c", "A", "d", (Paragraph("1", "[redacted] x redacted act"),))
    content = apply_draft(doc, Draft(phrases=(phrase,)))
    assert not present(phrase, content.paragraphs[0].text)
