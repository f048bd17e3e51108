"""Parsing the parent's reply: strict, and garbage never approves."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    show_hidden,
    summarize,
)

APPROVE_LINE = re.compile(r"approve[.!]*", re.I)


def test_approve_alone() -> None:
    for text in ["APPROVE", "approve", "Approve.", "  Approve!  \r\n", "\ufeffApprove"]:
        result = parse_commands(text)
        assert result.commands == (Approve(),), text
        assert result.problems == ()


@pytest.mark.parametrize(
    "text",
    [
        "don't approve",
        "approve?",
        "APPROVED but not to x",
        "Approved",
        "approve later",
        "Approve, thanks",
        "I approve",
        "approve 3",
        "- approve",
        "ＡＰＰＲＯＶＥ",
        "not approve",
        "appr0ve",
        "Approve: yes",
    ],
)
def test_lookalikes_never_approve(text: str) -> None:
    result = parse_commands(text)
    assert Approve() not in result.commands
    assert result.problems
    assert any(text.strip() in p for p in result.problems)


def test_empty_reply_is_a_problem() -> None:
    assert parse_commands("").problems == ("I found no command in your reply.",)
    assert parse_commands("\n \n").problems == ("I found no command in your reply.",)


def test_redact_ids_ranges_and_phrases() -> None:
    result = parse_commands('REDACT 3 "family conflict" A1.2\nredact 2-4, a1.2–4 “school stuff”')
    assert result.problems == ()
    assert result.commands == (
        Redact(ids=("3", "A1.2"), phrases=("family conflict",)),
        Redact(ids=("2", "3", "4", "A1.2", "A1.3", "A1.4"), phrases=("school stuff",)),
    )


def test_redact_accepts_friendly_forms() -> None:
    result = parse_commands('Redact: [2], paragraph 4 and A1.2-A1.3 "two" "three  words"')
    assert result.commands == (
        Redact(ids=("2", "4", "A1.2", "A1.3"), phrases=("two", "three words")),
    )


@pytest.mark.parametrize(
    "line",
    [
        "REDACT",
        "REDACT 4-2",
        "REDACT A1.2-A2.3",
        "REDACT 1-100000",
        'REDACT "unterminated',
        'REDACT ""',
        "REDACT two",
        "REDACT 2 x",
        "REDACT2",
    ],
)
def test_bad_redact_lines(line: str) -> None:
    result = parse_commands(line)
    assert result.commands == ()
    assert any(line in p for p in result.problems)


def test_drop_to_note() -> None:
    text = (
        "DROP A2 a3, [A4]\n"
        "TO Park@School.example, tag:OT tag: teacher <mailto:park@school.example>\n"
        "NOTE: The date in paragraph 2 is wrong.\n"
        "note Please call me first."
    )
    result = parse_commands(text)
    assert result.problems == ()
    assert result.commands == (
        Drop(("A2", "A3", "A4")),
        To(addresses=("park@school.example",), tags=("ot", "teacher")),
        Note("The date in paragraph 2 is wrong.\nPlease call me first."),
    )


@pytest.mark.parametrize(
    "line", ["DROP", "DROP 2", "DROP A1.2", "TO", "TO Ms Park", "TO tag:", "TO a@", "NOTE", "NOTE:"]
)
def test_bad_argument_lines(line: str) -> None:
    result = parse_commands(line)
    assert result.commands == ()
    assert any(line in p for p in result.problems)


def test_help_alone_and_conflicts() -> None:
    assert parse_commands("help").commands == (Help(),)
    assert parse_commands("help").problems == ()
    assert parse_commands("HELP\nAPPROVE").problems
    assert parse_commands("DENY\nREDACT 2").problems
    assert parse_commands("APPROVE\nDENY").problems
    assert parse_commands("DENY.").problems == ()
    assert parse_commands("DENY").commands == (Deny(),)


def test_repeated_bare_commands_collapse() -> None:
    assert parse_commands("APPROVE\napprove.").commands == (Approve(),)


def test_story_reply_with_sign_off() -> None:
    reply = 'REDACT 3 "family conflict"\nDROP A2\nAPPROVE\n\nThanks,\nDana\n'
    result = parse_commands(reply)
    assert result.problems == ()
    assert result.ignored == ("Thanks,", "Dana")
    assert result.commands == (
        Redact(ids=("3",), phrases=("family conflict",)),
        Drop(("A2",)),
        Approve(),
    )


@pytest.mark.parametrize(
    "reply",
    [
        "APPROVE\nThanks",  # no blank line before the sign-off
        "APPROVE\n\nThanks\nDana\nMom of Sam\nSchool board",  # too many lines
        "APPROVE\n\nThis is a very long line that is not a sign-off at all",
        "APPROVE\n\nbut not to the school",  # an instruction, not a sign-off
        "APPROVE\n\nDon't send the drawing",
        "APPROVE\n\nApproved",
        "APPROVE\n\nDenied after all",
        "APPROVE\n\nTo the OT only",
        "Thanks\n\nAPPROVE",  # text before the commands is never a sign-off
        "Hi,\nAPPROVE",
        "APPROVE\nwhatever\nREDACT 2",
    ],
)
def test_stray_text_is_a_problem(reply: str) -> None:
    result = parse_commands(reply)
    assert result.problems
    assert not result.ignored


def test_sign_off_needs_a_command() -> None:
    result = parse_commands("\n\nThanks,\nDana")
    assert result.commands == ()
    assert result.ignored == ()
    assert len(result.problems) == 2


def test_summarize() -> None:
    lines = summarize(
        (
            Redact(ids=("2",), phrases=("family conflict",)),
            Redact(ids=("3", "A1.2")),
            Drop(("A2",)),
            To(addresses=("park@school.example",), tags=("ot",)),
            Note("Line one\nline two"),
            Approve(),
        )
    )
    assert lines == [
        "Remove paragraph 2",
        'Remove "family conflict" everywhere it appears',
        "Remove paragraphs 3 and A1.2",
        "Leave out attachment A2",
        "Send only to park@school.example and everyone tagged ot",
        'Add your note: "Line one / line two"',
        "Release as shown",
    ]


# --- properties -----------------------------------------------------------------------------


def _is_approve_line(line: str) -> bool:
    return (
        APPROVE_LINE.fullmatch(line.strip().replace("\ufeff", "").replace("\u200b", "")) is not None
    )


lines = st.text(max_size=60).map(lambda s: s.replace("\r", "").replace("\n", " "))
noisy_lines = st.one_of(
    lines,
    st.tuples(st.sampled_from(["approve", "APPROVE", "Approve", "approved"]), lines).map("".join),
    st.tuples(lines, st.sampled_from(["approve", "APPROVE."])).map(" ".join),
)


@given(st.lists(noisy_lines, max_size=8), st.sampled_from(["\n", "\r\n", "\n\n"]))
def test_garbage_never_approves(reply_lines: list[str], sep: str) -> None:
    """Approve only ever comes from a line that is exactly APPROVE (plus . or !)."""
    result = parse_commands(sep.join(reply_lines))
    if Approve() in result.commands:
        assert any(_is_approve_line(line) for line in reply_lines)


@given(st.text(max_size=200))
def test_arbitrary_text_never_approves_unless_it_says_so(text: str) -> None:
    result = parse_commands(text)
    if Approve() in result.commands:
        physical = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        assert any(_is_approve_line(line) for line in physical)


@given(st.integers(min_value=0, max_value=5), st.text(min_size=41, max_size=80))
def test_long_garbage_anywhere_is_a_problem(where: int, garbage: str) -> None:
    """A line that cannot be a sign-off (over 40 characters) always makes a problem."""
    garbage = "x" + " ".join(garbage.split())[:60].ljust(41, "x")  # one line, not a command
    reply = ["APPROVE", "REDACT 2"]
    reply.insert(min(where, len(reply)), garbage)
    result = parse_commands("\n".join(reply))
    assert any(show_hidden(garbage[:40]) in p for p in result.problems)


ids = st.one_of(
    st.integers(1, 40).map(str),
    st.tuples(st.integers(1, 5), st.integers(1, 20)).map(lambda t: f"A{t[0]}.{t[1]}"),
)
phrases = (
    st.text(
        alphabet=st.characters(blacklist_characters='"“”„', blacklist_categories=("Cs", "Cc")),
        min_size=1,
        max_size=20,
    )
    .map(lambda s: " ".join(s.split()))
    .filter(lambda s: bool(s) and show_hidden(s) == s)  # hidden characters are refused
)
labels = st.integers(1, 9).map(lambda n: f"A{n}")
emails = st.from_regex(r"[a-z][a-z0-9.]{0,8}@[a-z]{1,8}\.example", fullmatch=True)
tags = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
commands = st.one_of(
    st.builds(
        lambda i, p: Redact(ids=tuple(dict.fromkeys(i)), phrases=tuple(dict.fromkeys(p))),
        st.lists(ids, min_size=1, max_size=4),
        st.lists(phrases, max_size=2, unique_by=str.casefold),
    ),
    st.lists(labels, min_size=1, max_size=3, unique=True).map(lambda xs: Drop(tuple(xs))),
    st.builds(
        lambda a, t: To(addresses=tuple(dict.fromkeys(a)), tags=tuple(dict.fromkeys(t))),
        st.lists(emails, max_size=2),
        st.lists(tags, max_size=2),
    ).filter(lambda c: c.addresses or c.tags),
)


def _render(c: Command) -> str:
    """How a parent might type the command."""
    if isinstance(c, Redact):
        return "REDACT " + " ".join([*c.ids, *(f'"{p}"' for p in c.phrases)])
    if isinstance(c, Drop):
        return "drop " + ", ".join(c.labels)
    assert isinstance(c, To)
    return "To " + ", ".join([*c.addresses, *(f"tag:{t}" for t in c.tags)])


@given(st.lists(commands, min_size=1, max_size=5))
def test_typed_commands_round_trip(cmds: list[Command]) -> None:
    result = parse_commands("\n".join(_render(c) for c in cmds))
    assert result.problems == ()
    assert result.commands == tuple(cmds)
