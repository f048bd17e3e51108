"""Decisions: only APPROVE alone releases; edits preview; anything doubtful changes nothing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.mail.document import Attachment, Document, Draft, Paragraph
from broker.redact.text import apply_draft, split_paragraphs
from broker.review.commands import (
    Approve,
    Command,
    Deny,
    Drop,
    Help,
    Note,
    Redact,
    To,
    parse_commands,
)
from broker.review.decisions import (
    Decision,
    Invalid,
    Preview,
    Refuse,
    Release,
    ShowHelp,
    Team,
    TeamMember,
    apply_commands,
    decide,
)

TEAM = Team(
    members=(
        TeamMember("lee@clinic.example", "Dr. Lee", "provider", ("therapy",)),
        TeamMember("Park@School.example", "Ms Park", "school", ("teacher",)),
        TeamMember("ot@school.example", "Mr Otis", "school", ("ot", "teacher")),
    )
)

DOC = Document(
    subject="Progress report",
    sender="lee@clinic.example",
    sender_name="Dr. Lee",
    date="Mon, 3 Mar 2025 10:00:00 +0000",
    paragraphs=split_paragraphs(
        "Hello team.\n\nSam spoke about the family conflict.\n\nHandwriting improved."
    ),
    attachments=(
        Attachment(
            "A1",
            "goals.txt",
            "text/plain",
            9,
            b"Goal one.\n\nGoal two.",
            split_paragraphs("Goal one.\n\nGoal two.", "A1."),
        ),
        Attachment("A2", "drawing.png", "image/png", 4, b"\x89PNG"),
    ),
)


def reply(text: str, draft: Draft | None = None) -> Decision:
    return decide(DOC, draft or Draft(), parse_commands(text), TEAM)


def test_approve_alone_releases_the_current_draft() -> None:
    draft = Draft(redact_ids=frozenset({"2"}))
    assert reply("Approve.", draft) == Release(draft)


def test_deny_refuses() -> None:
    assert reply("DENY") == Refuse()


def test_help_alone() -> None:
    assert reply("help") == ShowHelp()


def test_parse_problems_make_the_reply_invalid() -> None:
    decision = reply("APPROVE\nbut not the school")
    assert isinstance(decision, Invalid)
    assert any("but not the school" in p for p in decision.problems)


def test_story_redact_drop_to_note_then_approve() -> None:
    decision = reply(
        'REDACT 2 "handwriting"\nDROP A2\nTO tag:ot, lee@clinic.example\nNOTE Please call me.\n'
        "\nThanks,\nDana"
    )
    assert isinstance(decision, Preview)
    assert not decision.also_approved
    draft = decision.draft
    assert draft == Draft(
        redact_ids=frozenset({"2"}),
        phrases=("handwriting",),
        dropped=frozenset({"A2"}),
        recipients=("lee@clinic.example", "ot@school.example"),  # team order
        note="Please call me.",
    )
    assert decision.summary == (
        "Remove paragraph 2",
        'Remove "handwriting" everywhere it appears',
        "Leave out attachment A2 (drawing.png)",
        "Send only to Dr. Lee <lee@clinic.example> and Mr Otis <ot@school.example>",
        'Add your note: "Please call me."',
    )
    # The parent confirms the preview: exactly that draft is released.
    final = reply("APPROVE", draft)
    assert final == Release(draft)
    content = apply_draft(DOC, draft)
    assert [p.id for p in content.paragraphs] == ["1", "3"]
    assert "family" not in " ".join(p.text for p in content.paragraphs)
    assert [a.label for a in content.attachments] == ["A1"]


def test_edits_accumulate_across_previews() -> None:
    first = reply("REDACT 1\nTO tag:teacher")
    assert isinstance(first, Preview)
    second = reply('REDACT A1.2 "goal"\nNOTE new note', first.draft)
    assert isinstance(second, Preview)
    assert second.draft.redact_ids == {"1", "A1.2"}
    assert second.draft.phrases == ("goal",)
    assert second.draft.recipients == ("park@school.example", "ot@school.example")
    assert second.draft.note == "new note"
    third = reply('REDACT "GOAL"\nTO park@school.example', second.draft)
    assert isinstance(third, Preview)
    assert third.draft.phrases == ("goal",)  # not repeated
    assert third.draft.recipients == ("park@school.example",)  # TO replaces


def test_approve_with_edits_previews_and_does_not_release() -> None:
    decision = reply("REDACT 2\nAPPROVE")
    assert isinstance(decision, Preview)
    assert decision.also_approved
    assert decision.draft.redact_ids == {"2"}


def test_invalid_references() -> None:
    cases = {
        "REDACT 9": "no paragraph 9",
        "REDACT A1.7": "no paragraph A1.7",
        "DROP A5": "no attachment A5",
        "TO mom@home.example": "not a member of the team",
        "TO tag:nurse": "No team member has the tag nurse",
    }
    for text, expected in cases.items():
        decision = reply(text)
        assert isinstance(decision, Invalid), text
        assert any(expected in p for p in decision.problems), (text, decision.problems)


def test_one_bad_command_invalidates_the_whole_reply() -> None:
    draft = Draft(note="keep")
    decision = reply("REDACT 2\nDROP A9\nNOTE changed", draft)
    assert isinstance(decision, Invalid)


def test_redacting_everything_is_allowed_but_said() -> None:
    decision = reply("REDACT 1-3 A1.1-2\nDROP A2")
    assert isinstance(decision, Preview)
    assert decision.summary[-1] == "Every paragraph is removed and nothing else is left to send"
    decision = reply("REDACT 1-3")
    assert isinstance(decision, Preview)
    assert "only the rest is sent" in decision.summary[-1]


def test_to_resolving_to_nobody() -> None:
    decision = apply_commands(DOC, Draft(), (To(),), TEAM)
    assert isinstance(decision, Invalid)
    assert decision.problems == ("TO names nobody on the team.",)
    decision = apply_commands(DOC, Draft(), (To(addresses=("lee@clinic.example",)),), Team())
    assert isinstance(decision, Invalid)


def test_direct_calls_recheck_conflicts() -> None:
    assert isinstance(apply_commands(DOC, Draft(), (Deny(), Approve()), TEAM), Invalid)
    assert isinstance(apply_commands(DOC, Draft(), (Help(), Approve()), TEAM), Invalid)
    assert isinstance(apply_commands(DOC, Draft(), (), TEAM), Invalid)
    assert isinstance(apply_commands(DOC, Draft(), (Note("  "),), TEAM), Invalid)
    assert isinstance(apply_commands(DOC, Draft(), (Redact(phrases=(" ",)),), TEAM), Invalid)


# --- properties -----------------------------------------------------------------------------

any_command = st.one_of(
    st.just(Approve()),
    st.just(Deny()),
    st.just(Help()),
    st.builds(
        Redact,
        ids=st.lists(st.sampled_from(["1", "2", "3", "4", "A1.1", "A1.3", "a1.2"])).map(tuple),
        phrases=st.lists(st.text(max_size=10)).map(tuple),
    ),
    st.builds(Drop, labels=st.lists(st.sampled_from(["A1", "A2", "A3", "a2"])).map(tuple)),
    st.builds(
        To,
        addresses=st.lists(
            st.sampled_from(["lee@clinic.example", "park@school.example", "mom@home.example"])
        ).map(tuple),
        tags=st.lists(st.sampled_from(["ot", "teacher", "nurse"])).map(tuple),
    ),
    st.builds(Note, text=st.text(max_size=10)),
)
drafts = st.builds(
    Draft,
    redact_ids=st.sets(st.sampled_from(["1", "A1.2"])).map(frozenset),
    phrases=st.lists(st.sampled_from(["goal", "family"]), unique=True).map(tuple),
    dropped=st.sets(st.just("A2")).map(frozenset),
    recipients=st.one_of(st.none(), st.just(("park@school.example",))),
    note=st.sampled_from(["", "old"]),
)


@given(drafts, st.lists(any_command, max_size=5))
def test_only_approve_alone_releases(draft: Draft, commands: list[Command]) -> None:
    decision = apply_commands(DOC, draft, tuple(commands), TEAM)
    kinds = {type(c) for c in commands}
    assert isinstance(decision, Release) == (kinds == {Approve})
    if isinstance(decision, Release):
        assert decision.draft == draft  # releases what was last shown, nothing new
    if Deny in kinds:
        assert isinstance(decision, Refuse | Invalid)
        assert isinstance(decision, Refuse) == (kinds == {Deny})


@given(drafts, st.lists(any_command, min_size=1, max_size=5))
def test_previews_only_ever_narrow_and_stay_valid(draft: Draft, commands: list[Command]) -> None:
    """A preview keeps everything already removed and only names real paragraphs, files, people."""
    decision = apply_commands(DOC, draft, tuple(commands), TEAM)
    if not isinstance(decision, Preview):
        return
    new = decision.draft
    assert draft.redact_ids <= new.redact_ids
    assert {p.casefold() for p in draft.phrases} <= {p.casefold() for p in new.phrases}
    assert draft.dropped <= new.dropped
    assert new.redact_ids <= DOC.paragraph_ids()
    assert new.dropped <= {a.label for a in DOC.attachments}
    if new.recipients is not None:
        team = [m.email.lower() for m in TEAM.members]
        assert new.recipients
        assert list(new.recipients) == [e for e in team if e in new.recipients]
    assert decision.also_approved == any(isinstance(c, Approve) for c in commands)


def test_paragraph_ids_are_matched_case_insensitively() -> None:
    decision = apply_commands(DOC, Draft(), (Redact(ids=("a1.2",)),), TEAM)
    assert isinstance(decision, Preview)
    assert decision.draft.redact_ids == {"A1.2"}


def test_body_only_document_with_no_paragraphs() -> None:
    empty = Document("s", "a@b.c", "A", "d", (Paragraph("1", "only"),))
    decision = apply_commands(empty, Draft(), (Redact(ids=("1",)),), TEAM)
    assert isinstance(decision, Preview)
    assert decision.summary[-1] == "Every paragraph is removed and nothing else is left to send"
