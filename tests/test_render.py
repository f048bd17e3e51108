"""The texts the broker mails: what the parent reviews, confirms, and what recipients get."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.mail.document import Attachment, Document, Paragraph, ReleaseContent
from broker.review import render
from broker.review.render import (
    Person,
    PreviewContext,
    ReleaseContext,
    ReviewContext,
    format_utc,
    hang,
    human_size,
    notice_subject,
    render_decided,
    render_expired,
    render_help,
    render_not_understood,
    render_preview,
    render_quarantine_notice,
    render_receipt,
    render_refused,
    render_release,
    render_release_failed,
    render_review_request,
    templates_dir,
)

NOW = datetime(2025, 3, 4, 14, 5, tzinfo=UTC)
EXPIRES = NOW + timedelta(days=7)
LONG = (
    "Sam has made steady progress on fine motor tasks this term, including buttoning, "
    "cutting along a curved line and copying shapes from the board without prompts."
)

PARAS = (
    Paragraph("1", LONG),
    Paragraph("2", "The family conflict at home was discussed at length."),
    Paragraph("3", "Next session: 12 March."),
)
A1 = Attachment(
    label="A1",
    filename="évaluation.pdf",
    content_type="application/pdf",
    size=123_456,
    data=b"%PDF-1.4",
    paragraphs=(
        Paragraph("A1.1", "Handwriting: legible at 12 words a minute."),
        Paragraph("A1.2", "Medication: none reported."),
        Paragraph("A1.3", "Scores are in the table below."),
    ),
)
A2 = Attachment(
    label="A2",
    filename="scan.jpg",
    content_type="image/jpeg",
    size=2_200_000,
    data=b"\xff\xd8",
    paragraphs=None,
    note="scanned, no text",
)
DOC = Document(
    subject="OT progress, spring term",
    sender="lee@clinic.example",
    sender_name="Dr. Lee",
    date="Mon, 3 Mar 2025 09:12:00 +0000",
    paragraphs=PARAS,
    attachments=(A1, A2),
)
PARK = Person("Ms Park", "park@school.example", "teacher")
OT = Person("Ana Ruiz", "ruiz@school.example", "school OT")


def review_text(**changes: object) -> str:
    values: dict[str, object] = dict(
        record_id=12,
        child_name="Sam Doe",
        document=DOC,
        recipients=(PARK, OT),
        reasons=("sender tag `therapy` -> category mental_health", "attachment is an evaluation"),
        received_at=NOW,
        expires_at=EXPIRES,
        sender_role="therapist (provider)",
        guardian_name="Jane",
    )
    values.update(changes)
    return render_review_request(ReviewContext(**values))  # type: ignore[arg-type]


def flat(text: str) -> str:
    """The text with wrapping undone, to look for phrases across line breaks."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (1023, "1023 bytes"),
        (1024, "1 KB"),
        (1536, "1.5 KB"),
        (123_456, "121 KB"),
        (2_200_000, "2.1 MB"),
        (1024**3, "1 GB"),
        (1024**2 - 1, "1 MB"),  # rounds up into the next unit rather than "1024 KB"
    ],
)
def test_human_size(n: int, expected: str) -> None:
    assert human_size(n) == expected


def test_human_size_rejects_negative() -> None:
    with pytest.raises(ValueError):
        human_size(-1)


def test_hang_wraps_with_hanging_indent_and_keeps_every_word() -> None:
    out = hang(LONG * 3, "[12] ", width=76)
    lines = out.splitlines()
    assert lines[0].startswith("[12] ")
    assert all(line.startswith("     ") for line in lines[1:])
    assert all(len(line) <= 76 for line in lines)
    assert out.split()[1:] == (LONG * 3).split()


def test_hang_never_breaks_long_words_and_keeps_line_breaks() -> None:
    url = "https://clinic.example/" + "x" * 100
    out = hang(f"See {url}\nfor details\n  12 Elm St", "[1] ")
    assert url in out.splitlines()[1]
    assert out.splitlines()[-1] == "      12 Elm St"
    assert "for details" in out


def test_format_utc_converts_and_treats_naive_as_utc() -> None:
    assert format_utc(NOW) == "Tue 4 Mar 2025 14:05 UTC"
    assert format_utc(datetime(2025, 3, 4, 14, 5)) == "Tue 4 Mar 2025 14:05 UTC"
    plus2 = datetime(2025, 3, 4, 16, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_utc(plus2) == "Tue 4 Mar 2025 14:05 UTC"


def test_templates_dir_is_the_top_level_folder() -> None:
    folder = templates_dir()
    assert folder.name == "templates"
    assert (folder.parent / "broker" / "review" / "render.py").is_file()
    for name in (
        "review_request",
        "preview",
        "release",
        "help",
        "not_understood",
        "receipt",
        "quarantine_notice",
        "decided",
        "refused",
        "release_failed",
        "expired",
    ):
        assert (folder / f"{name}.txt.j2").is_file(), name


def test_templates_dir_override_and_strict_undefined(tmp_path: Path) -> None:
    (tmp_path / "receipt.txt.j2").write_text("{{ records }} {{ no_such_value }}\n")
    assert templates_dir(tmp_path) == tmp_path
    with pytest.raises(jinja2.UndefinedError):
        render_receipt(child_name="Sam", subject="x", received_at=NOW, templates=tmp_path)
    (tmp_path / "receipt.txt.j2").write_text("{{ records }}: {{ subject }}\n")
    assert (
        render_receipt(child_name="Sam", subject="x", received_at=NOW, templates=tmp_path)
        == "Sam's records: x\n"
    )


def test_person_label() -> None:
    assert PARK.label() == "Ms Park <park@school.example>, teacher"
    assert Person("", "a@b.example").label() == "a@b.example"


def test_notice_subjects() -> None:
    s = notice_subject("review", child_name="Sam Doe", subject="OT\nprogress", record_id=12)
    assert s == "[Sam's records #12] Review needed: OT progress"
    assert notice_subject("release", child_name="Sam", subject="OT") == "OT"
    assert "Received" in notice_subject("receipt", child_name="Sam", subject="OT")
    assert "#" not in notice_subject("receipt", child_name="Sam", subject="OT")


# --------------------------------------------------------------------------- review request


def test_review_request_numbers_every_paragraph() -> None:
    text = review_text()
    for p in PARAS:
        assert f"[{p.id}] " in text
    for p in A1.paragraphs or ():
        assert f"[{p.id}] " in text
    # Every word of every paragraph is there, in order, despite wrapping.
    assert flat(LONG) in flat(text)
    assert text.index("[1] ") < text.index("[2] ") < text.index("[3] ") < text.index("[A1.1] ")


def test_review_request_wraps_at_76_columns() -> None:
    text = review_text()
    body = text[text.index("=== Message text") : text.index("=== Attachments")]
    assert all(len(line) <= 78 for line in body.splitlines())
    first = body.splitlines()[2]
    assert first.startswith("[1] Sam has made")
    assert body.splitlines()[3].startswith("    ")  # hanging indent under the text


def test_review_request_says_nothing_shared_recipients_reasons_expiry() -> None:
    text = review_text()
    assert "nothing has been shared" in text.lower()
    assert "park@school.example" in text and "Ms Park" in text and "teacher" in text
    assert "ruiz@school.example" in text and "school OT" in text
    assert "sender tag `therapy` -> category mental_health" in text
    assert "attachment is an evaluation" in text
    assert format_utc(EXPIRES) in text
    assert "Dr. Lee <lee@clinic.example>, therapist (provider)" in text
    assert "OT progress, spring term" in text
    assert "record 12" in text
    assert text.startswith("Hello Jane,")


def test_review_request_lists_attachments_and_unreadable_ones() -> None:
    text = review_text()
    assert "A1 évaluation.pdf, application/pdf, 121 KB" in text
    assert "A2 scan.jpg, image/jpeg, 2.1 MB" in text
    assert "scanned, no text" in text
    assert "release whole or DROP A2" in text
    assert "DROP A1" not in text.split("=== How to answer")[0]


def test_review_request_includes_the_shared_help() -> None:
    text = review_text()
    help_text = render_help(child_name="Sam")
    shared = help_text.split("\n\n", 1)[1]  # after the one-line heading
    assert shared in text
    for command in (
        "APPROVE",
        "DENY",
        "REDACT 2 4 A1.3",
        'REDACT "',
        "DROP A2",
        "TO ",
        "NOTE",
        "HELP",
    ):
        assert command in shared


def test_review_request_edge_cases() -> None:
    empty = Document(
        subject="x", sender="a@b.example", sender_name="", date="d", paragraphs=(), had_html=True
    )
    text = review_text(document=empty, recipients=(), reasons=(), guardian_name="", sender_role="")
    assert text.startswith("Hello,")
    assert "(the message has no text)" in text
    assert "(no attachments)" in text
    assert "choose recipients with TO" in text
    assert "HTML" in text
    assert "From:      a@b.example\n" in text


def test_review_request_subject_cannot_forge_lines() -> None:
    doc = Document(
        subject="hi\nDecide by: never",
        sender="a@b.example",
        sender_name="X",
        date="d",
        paragraphs=(),
    )
    text = review_text(document=doc)
    assert "\nDecide by: never" not in text
    assert "hi Decide by: never" in text


# --------------------------------------------------------------------------- preview


def preview_content() -> ReleaseContent:
    kept_a1 = Attachment(
        "A1",
        "évaluation.pdf",
        "application/pdf",
        2048,
        b"%PDF",
        (Paragraph("A1.1", "Handwriting: legible at 12 words a minute."),),
    )
    return ReleaseContent(
        subject="OT progress, spring term",
        note="The date in paragraph 3 is wrong: it is 19 March.",
        paragraphs=(PARAS[0], PARAS[2]),
        attachments=(kept_a1,),
        changes=("removed [2]", "removed [A1.2] [A1.3]", "dropped A2 (scan.jpg)"),
    )


def test_preview_shows_only_what_recipients_would_get() -> None:
    text = render_preview(
        PreviewContext(12, "Sam Doe", preview_content(), (PARK,), EXPIRES, also_approved=False)
    )
    assert "[1] Sam has made" in text
    assert "[3] Next session" in text  # original numbering kept
    assert "[2]" not in text.replace("removed [2]", "")
    assert "family conflict" not in text
    assert "[A1.1] Handwriting" in text
    assert "Medication" not in text and "[A1.3]" not in text.replace("[A1.2] [A1.3]", "")
    assert "scan.jpg, image/jpeg" not in text
    assert "ruiz@school.example" not in text and "park@school.example" in text
    assert "The date in paragraph 3 is wrong" in text
    for line in ("removed [2]", "removed [A1.2] [A1.3]", "dropped A2 (scan.jpg)"):
        assert f"  - {line}" in text
    assert "Reply APPROVE to release this version, DENY, or more commands." in text
    assert "You wrote APPROVE together with changes" not in text
    assert "nothing has been shared" in text.lower()
    assert format_utc(EXPIRES) in text


def test_preview_after_approve_with_changes_says_so_first() -> None:
    text = render_preview(
        PreviewContext(12, "Sam", preview_content(), (PARK,), EXPIRES, also_approved=True)
    )
    expected = (
        "You wrote APPROVE together with changes: check this preview and reply "
        "APPROVE to release it"
    )
    assert expected in flat(text)
    assert flat(text).index(expected) < flat(text).index("[1] Sam")


def test_preview_without_note_or_changes() -> None:
    content = ReleaseContent(subject="s", note="", paragraphs=(), attachments=())
    text = render_preview(PreviewContext(1, "Sam", content, (), EXPIRES))
    assert "(no note)" in text and "(no text left)" in text and "(no changes)" in text


# --------------------------------------------------------------------------- release


def release_text(content: ReleaseContent | None = None) -> str:
    return render_release(
        ReleaseContext(
            record_id=12,
            child_name="Sam Doe",
            content=content or preview_content(),
            released_by="Jane Doe",
            released_at=NOW,
        )
    )


def test_release_has_note_first_then_text_then_files_then_footer() -> None:
    text = release_text()
    note = text.index("The date in paragraph 3 is wrong")
    first = text.index(LONG)  # exactly as approved, not re-wrapped
    third = text.index("Next session: 12 March.")
    files = text.index("évaluation.pdf (application/pdf, 2 KB)")
    footer = text.index("\n-- \n")
    assert note < first < third < files < footer
    assert "Note from the family" in text[:note]
    assert f"\n\n{PARAS[2].text}\n" in text  # blank-line separated


def test_release_footer() -> None:
    text = release_text()
    footer = text[text.index("\n-- \n") :]
    assert "Released by Jane Doe on Tue 4 Mar 2025 14:05 UTC, record 12" in footer
    assert "under explicit approval by the guardian" in footer
    assert (
        "This information is shared with you by the family for Sam's care and education. "
        "Do not pass it on without the family's written permission."
    ) in footer


def test_release_has_no_numbers_no_review_wording_and_nothing_removed() -> None:
    text = release_text()
    assert not re.search(r"\[\d+\]|\[A\d", text)
    assert "family conflict" not in text
    assert "Medication" not in text
    assert "APPROVE" not in text and "REDACT" not in text
    assert "scan.jpg" not in text


def test_release_without_note_starts_with_the_text_and_consent_is_shown() -> None:
    content = ReleaseContent(subject="s", note="", paragraphs=(PARAS[2],), attachments=())
    text = render_release(
        ReleaseContext(3, "Sam", content, "Jane", NOW, consent="consent #4 (OT progress to school)")
    )
    assert text.startswith("Next session: 12 March.\n")
    assert "Attached files" not in text
    assert "under consent #4 (OT progress to school)." in text


# --------------------------------------------------------------------------- notices


def test_help_and_not_understood() -> None:
    help_text = render_help(child_name="Sam", record_id=12)
    assert "record 12" in help_text and "REDACT 2 4 A1.3" in help_text
    text = render_not_understood(
        child_name="Sam", record_id=12, problems=('line 1: "REDCAT 3": unknown command',)
    )
    assert '> line 1: "REDCAT 3": unknown command' in text
    assert "NOTHING changed" in text
    assert help_text.split("\n\n", 1)[1] in text


def test_receipt_never_speaks_of_a_decision() -> None:
    text = render_receipt(child_name="Sam Doe", subject="OT progress", received_at=NOW)
    assert "Your message to Sam's records was received and is held for the family's review." in (
        text
    )
    assert "OT progress" in text
    for word in ("approv", "denied", "deny", "released", "forwarded", "shared with"):
        assert word not in text.lower()


def test_quarantine_notice_has_headers_and_the_command_only() -> None:
    text = render_quarantine_notice(
        child_name="Sam",
        quarantine_id=7,
        from_addr="stranger@elsewhere.example",
        subject="Sam's report",
        date="Mon, 3 Mar 2025 09:12:00 +0000",
    )
    assert "stranger@elsewhere.example" in text
    assert "Sam's report" in text
    assert "Mon, 3 Mar 2025 09:12:00 +0000" in text
    assert "broker records show 7" in text
    assert "not on the team" in text


def test_decided_released_and_denied() -> None:
    released = render_decided(
        child_name="Sam",
        record_id=12,
        subject="OT",
        decision="released",
        decided_by="Jane",
        decided_at=NOW,
        recipients=(PARK, OT),
    )
    assert "released" in released and PARK.label() in released and OT.label() in released
    assert format_utc(NOW) in released
    denied = render_decided(
        child_name="Sam",
        record_id=12,
        subject="OT",
        decision="denied",
        decided_by="Jane",
        decided_at=NOW,
    )
    assert "denied by Jane" in denied and "Nobody was told" in denied
    with pytest.raises(ValueError):
        render_decided(
            child_name="Sam",
            record_id=1,
            subject="",
            decision="maybe",  # type: ignore[arg-type]
            decided_by="J",
            decided_at=NOW,
        )


@pytest.mark.parametrize(
    ("reason", "phrase"),
    [
        ("used", "already answered"),
        ("expired", "time to decide had run out"),
        ("superseded", "Reply to the newest one"),
        ("unknown_token", "did not answer any review request"),
        ("not_guardian", "not a guardian address"),
        ("auth_failed", "could not verify"),
    ],
)
def test_refused_explains_each_reason(reason: render.RefusalReason, phrase: str) -> None:
    text = render_refused(
        child_name="Sam",
        record_id=12,
        reason=reason,
        from_addr="x@evil.example",
        subject="Re: review",
        received_at=NOW,
        detail="dkim=fail header.d=evil.example",
    )
    assert phrase in text
    assert "record 12" in text and "Nothing was" in text and "x@evil.example" in text
    assert "dkim=fail header.d=evil.example" in text


def test_refused_rejects_unknown_reason() -> None:
    with pytest.raises(ValueError):
        render_refused(
            child_name="Sam",
            record_id=None,
            reason="bogus",  # type: ignore[arg-type]
            from_addr="x@y.example",
            subject="",
            received_at=NOW,
        )


def test_release_failed_and_expired() -> None:
    failed = render_release_failed(
        child_name="Sam",
        record_id=12,
        subject="OT",
        recipient=PARK,
        reason="550 5.1.1 <park@school.example>: no such user",
        failed_at=NOW,
    )
    assert PARK.label() in failed and "failed permanently" in failed
    assert "550 5.1.1" in failed
    expired = render_expired(
        child_name="Sam",
        record_id=12,
        subject="OT",
        sender="Dr. Lee <lee@clinic.example>",
        expired_at=NOW,
    )
    assert "treated as denied" in expired and format_utc(NOW) in expired
    assert "Nothing was shared" in expired and "broker records show 12" in expired


def test_every_text_ends_with_one_newline() -> None:
    texts = [
        review_text(),
        release_text(),
        render_help(child_name="Sam"),
        render_receipt(child_name="Sam", subject="s", received_at=NOW),
    ]
    for text in texts:
        assert text.endswith("\n") and not text.endswith("\n\n")


@given(
    words=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Zs", "Cc", "Zl", "Zp")),
                           min_size=1, max_size=30), min_size=1, max_size=60),
    marker=st.sampled_from(["", "[1] ", "[12] ", "  "]),
    width=st.integers(min_value=1, max_value=100),
)
def test_fast_wrap_gives_textwraps_result(words: list[str], marker: str, width: int) -> None:
    """hang's fast path for plain lines must wrap exactly as textwrap would."""
    import textwrap

    line = " ".join(words)
    pad = " " * len(marker)
    expected = textwrap.wrap(line, width=max(width, len(marker) + 1), initial_indent=marker,
                             subsequent_indent=pad, break_long_words=False,
                             break_on_hyphens=False)
    assert hang.__wrapped__(line, marker, width) == "\n".join(expected)
