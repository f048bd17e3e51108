"""REDACT on pages of a PDF attachment: parsing, checking against the document, and the
draft surviving the content store (pure)."""

from __future__ import annotations

import pytest

from broker.content.codec import (
    document_from_bytes,
    document_to_bytes,
    draft_from_bytes,
    draft_to_bytes,
)
from broker.mail.document import Attachment, Document, Draft, Paragraph
from broker.review.commands import Redact, parse_commands
from broker.review.decisions import Invalid, Preview, Team, apply_commands

PDF = Attachment(
    label="A1", filename="report.pdf", content_type="application/pdf", size=100,
    data=b"%PDF-1.4 ...", kind="pdf", pages=3, scanned=(2,),
    paragraphs=(Paragraph("A1.1", "Page one.", 1), Paragraph("A1.2", "More on one.", 1),
                Paragraph("A1.3", "Page three.", 3)),
)
TEXT = Attachment(label="A2", filename="goals.txt", content_type="text/plain", size=5,
                  data=b"Goals", kind="text", paragraphs=(Paragraph("A2.1", "Goals"),))
DOC = Document(subject="Report", sender="lee@clinic.example", sender_name="Dr. Lee",
               date="", paragraphs=(Paragraph("1", "See attached."),),
               attachments=(PDF, TEXT))


def test_page_syntax() -> None:
    for line, pages in (("REDACT A1 p.2", ("A1 p.2",)), ("redact a1 p2", ("A1 p.2",)),
                        ("REDACT A1 page 3", ("A1 p.3",)),
                        ("REDACT A1 p.1-2", ("A1 p.1", "A1 p.2")),
                        ("REDACT A1 p.1\u20132", ("A1 p.1", "A1 p.2"))):
        parsed = parse_commands(line)
        assert parsed.problems == (), line
        assert parsed.commands == (Redact(pages=pages),), line
    mixed = parse_commands('REDACT 1, A1 p.3 and "Sam"').commands
    assert mixed == (Redact(ids=("1",), phrases=("Sam",), pages=("A1 p.3",)),)
    assert parse_commands("REDACT A1 p.3-1").problems


def test_pages_are_checked_against_the_attachment() -> None:
    ok = apply_commands(DOC, Draft(), parse_commands("REDACT A1 p.2").commands, Team())
    assert isinstance(ok, Preview)
    assert ok.draft.redact_pages == frozenset({"A1 p.2"})
    assert "Remove page 2 of attachment A1 (blacked out)" in ok.summary
    for line, problem in (("REDACT A1 p.4", "has 3 pages; there is no page 4"),
                          ("REDACT A2 p.1", "has no pages"),
                          ("REDACT A9 p.1", "There is no attachment A9")):
        bad = apply_commands(DOC, Draft(), parse_commands(line).commands, Team())
        assert isinstance(bad, Invalid) and problem in " ".join(bad.problems), line


def test_a_large_attachment_is_stored_apart_and_read_back_the_same() -> None:
    """A big attachment is stored as content of its own (its bytes would otherwise be
    copied four times over inside the document's JSON); reading needs the store."""
    import base64
    import dataclasses
    import json

    from broker.content.codec import SEPARATE_ABOVE

    big = bytes(range(256)) * (SEPARATE_ABOVE // 256 + 1)
    first = DOC.attachments[0]
    doc = dataclasses.replace(DOC, attachments=(
        dataclasses.replace(first, data=big, size=len(big)), *DOC.attachments[1:]))
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        blobs[f"ref{len(blobs)}"] = data
        return f"ref{len(blobs) - 1}"

    stored = document_to_bytes(doc, put_blob=put)
    assert list(blobs.values()) == [big]  # only the big one; small ones stay inline
    assert base64.b64encode(big[:300]) not in stored
    assert json.loads(stored)["attachments"][0]["data_ref"] == "ref0"
    assert document_from_bytes(stored, get_blob=blobs.__getitem__) == doc
    with pytest.raises(ValueError, match="get_blob"):
        document_from_bytes(stored)
    # Documents written with everything inline (as before) read the same either way.
    assert document_from_bytes(document_to_bytes(doc), get_blob=blobs.__getitem__) == doc


def test_document_and_draft_round_trip_with_pages() -> None:
    assert document_from_bytes(document_to_bytes(DOC)) == DOC
    draft = Draft(redact_ids=frozenset({"A1.1"}), redact_pages=frozenset({"A1 p.2"}))
    assert draft_from_bytes(draft_to_bytes(draft)) == draft
    # Drafts stored before pages existed still read.
    old = b'{"v": 1, "redact_ids": [], "phrases": [], "dropped": [], "recipients": null, ' \
          b'"note": ""}'
    assert draft_from_bytes(old) == Draft()
