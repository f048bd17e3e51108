"""Reply extraction against real client replies (shared corpus) and the broker's own stories.

The corpus rules are in ``shared/corpus/README.md``. Every corpus case is its own
test, so a regression names the file; the few known failures are listed by name
below with the reason and marked ``xfail(strict=True)``, so a fix is noticed too.
The accuracy floors catch a broad slide even if someone edits the lists.
"""

from __future__ import annotations

import email
import json
import re
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from broker.mail.html import html_to_text
from broker.mail.reply import (
    ReplyText,
    extract_reply,
    extract_reply_from_html,
    extract_reply_from_message,
    remove_html_quote,
)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
DISCOURSE = CORPUS / "replies" / "discourse-email_reply_trimmer"
TALON = CORPUS / "replies" / "mailgun-talon"
NO_CORPUS = f"shared corpus not found at {CORPUS} (checked out next to the repository?)"

# Known failures, by design. Keep the reason: it is the broker's policy, not a bug.
DISCOURSE_KNOWN_FAILURES = {
    "quote_only": "a reply that is only a quote carries no decision: we return '' "
    "(Discourse keeps the quote)",
}
TALON_STANDARD_KNOWN_FAILURES = {
    "iphone": "we strip 'Sent from my iPhone' (talon keeps signatures)",
    "sparrow": "we cut at the '-- ' signature separator (talon keeps signatures)",
}
TALON_HTML_KNOWN_FAILURES: dict[str, str] = {}

# Measured with bench/reply_accuracy.py: discourse 63/64, talon 10/12 + 9/9.
# Floors are the measurement minus a margin of one case.
DISCOURSE_FLOOR = 62
TALON_STANDARD_FLOOR = 9
TALON_HTML_FLOOR = 8


def _read_text(path: Path) -> str:
    """Corpus files are bytes with deliberate CRLF/LF mixes: decode, then normalise."""
    return path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _read_message(path: Path) -> EmailMessage:
    msg = email.message_from_bytes(path.read_bytes(), policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _cases(names: list[str], known: dict[str, str]) -> list[Any]:
    """pytest params, known failures marked strict xfail; one skip when the corpus is absent."""
    if not names:
        return [pytest.param("", marks=pytest.mark.skip(reason=NO_CORPUS))]
    return [
        pytest.param(n, marks=pytest.mark.xfail(reason=known[n], strict=True)) if n in known else n
        for n in names
    ]


def _discourse_names() -> list[str]:
    return sorted(p.stem for p in (DISCOURSE / "emails").glob("*.txt"))


def _talon_spec(section: str) -> dict[str, dict[str, str]]:
    path = TALON / "EXPECTED.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_bytes())[section]["files"]


def _discourse_ok(name: str) -> bool:
    got = extract_reply(_read_text(DISCOURSE / "emails" / f"{name}.txt").strip()).strip()
    return got == _read_text(DISCOURSE / "trimmed" / f"{name}.txt").strip()


def _talon_standard_ok(name: str) -> bool:
    expected = _talon_spec("standard_replies")[f"{name}.eml"]["expected_reply"].strip()
    got = extract_reply_from_message(_read_message(TALON / "standard_replies" / f"{name}.eml"))
    return got.text == expected


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _talon_html_ok(name: str) -> bool:
    expected = _talon_spec("html_replies")[f"{name}.html"]["expected_reply_text"]
    html = (TALON / "html_replies" / f"{name}.html").read_bytes().decode("utf-8", "replace")
    return _squash(extract_reply_from_html(html)) == _squash(expected)


# --------------------------------------------------------------------------
# Corpus, one test per file
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", _cases(_discourse_names(), DISCOURSE_KNOWN_FAILURES))
def test_discourse_pair(name: str) -> None:
    src = _read_text(DISCOURSE / "emails" / f"{name}.txt").strip()
    expected = _read_text(DISCOURSE / "trimmed" / f"{name}.txt").strip()
    assert extract_reply(src).strip() == expected


@pytest.mark.parametrize(
    "name",
    _cases(
        sorted(Path(n).stem for n in _talon_spec("standard_replies")), TALON_STANDARD_KNOWN_FAILURES
    ),
)
def test_talon_standard_reply(name: str) -> None:
    assert _talon_standard_ok(name)


@pytest.mark.parametrize(
    "name",
    _cases(sorted(Path(n).stem for n in _talon_spec("html_replies")), TALON_HTML_KNOWN_FAILURES),
)
def test_talon_html_reply(name: str) -> None:
    assert _talon_html_ok(name)


# The text/html alternative of the same client messages, through the HTML path.
# Expected values read from the fixtures themselves (outlook.eml's HTML part
# really says something else than its text part).
TALON_HTML_ALTERNATIVES = {
    "android": "Hello",
    "aol": "Hello",
    "comcast": "Hello",
    "gmail": "Hello",
    "hotmail": "Hello",
    "outlook": "Allo! Follow up MIME!",
    "sparrow": "Hello",
}


@pytest.mark.skipif(not TALON.is_dir(), reason=NO_CORPUS)
@pytest.mark.parametrize("name", sorted(TALON_HTML_ALTERNATIVES))
def test_talon_html_alternative(name: str) -> None:
    msg = _read_message(TALON / "standard_replies" / f"{name}.eml")
    part = msg.get_body(preferencelist=("html",))
    assert part is not None and part.get_content_type() == "text/html"
    assert extract_reply_from_html(part.get_content()) == TALON_HTML_ALTERNATIVES[name]


# --------------------------------------------------------------------------
# Accuracy floors
# --------------------------------------------------------------------------


@pytest.mark.skipif(not DISCOURSE.is_dir(), reason=NO_CORPUS)
def test_discourse_accuracy_floor() -> None:
    names = _discourse_names()
    passed = [n for n in names if _discourse_ok(n)]
    failed = sorted(set(names) - set(passed))
    assert len(names) == 64
    assert len(passed) >= DISCOURSE_FLOOR, f"{len(passed)}/64, failing: {failed}"
    assert set(failed) <= set(DISCOURSE_KNOWN_FAILURES), f"new failures: {failed}"


@pytest.mark.skipif(not TALON.is_dir(), reason=NO_CORPUS)
def test_talon_accuracy_floor() -> None:
    standard = [Path(n).stem for n in _talon_spec("standard_replies")]
    html = [Path(n).stem for n in _talon_spec("html_replies")]
    assert (len(standard), len(html)) == (12, 9)
    std_ok = sum(_talon_standard_ok(n) for n in standard)
    html_ok = sum(_talon_html_ok(n) for n in html)
    assert std_ok >= TALON_STANDARD_FLOOR, f"standard {std_ok}/12"
    assert html_ok >= TALON_HTML_FLOOR, f"html {html_ok}/9"


# --------------------------------------------------------------------------
# Stories: what a parent's client actually sends back to the broker
# --------------------------------------------------------------------------


def test_approve_above_gmail_quote() -> None:
    body = (
        "APPROVE\r\n\r\n"
        "On Mon, 3 Mar 2025 at 10:02, Sam's records <sam@broker.example> wrote:\r\n\r\n"
        "> [1] Sam worked well this week.\r\n>\r\n> Reply APPROVE, DENY, REDACT ...\r\n"
    )
    assert extract_reply(body) == "APPROVE"


def test_gmail_attribution_wrapped_over_two_lines() -> None:
    body = (
        "APPROVE\n\nOn Mon, 3 Mar 2025 at 10:02, Sam's records via Broker <\n"
        "sam@broker.example> wrote:\n\n> [1] Sam worked well.\n"
    )
    assert extract_reply(body) == "APPROVE"


def test_redact_and_note_above_outlook_block() -> None:
    body = (
        "REDACT 2\nNOTE x\n\n"
        "________________________________\n"
        "From: Sam's records <sam@broker.example>\n"
        "Sent: Monday, March 3, 2025 10:02 AM\n"
        "To: Parent <parent@example.org>\n"
        "Subject: Review: OT report\n\n"
        "[1] Sam worked well this week.\n"
    )
    assert extract_reply(body) == "REDACT 2\nNOTE x"


def test_outlook_block_without_rule_line() -> None:
    body = (
        "REDACT 2\nNOTE x\n"
        "From: Sam's records <sam@broker.example>\n"
        "Sent: Monday, March 3, 2025 10:02 AM\n"
        "To: Parent <parent@example.org>\n"
        "Subject: Review: OT report\n\n[1] Sam worked well this week.\n"
    )
    assert extract_reply(body) == "REDACT 2\nNOTE x"


def test_reply_written_only_as_a_quote_is_empty() -> None:
    body = "> On Mon, 3 Mar 2025, Sam's records <sam@broker.example> wrote:\n> APPROVE\n"
    assert extract_reply(body) == ""


def test_empty_and_blank_bodies() -> None:
    assert extract_reply("") == ""
    assert extract_reply(" \r\n\r\n\t") == ""


def test_german_and_french_attributions() -> None:
    de = "DENY\n\nAm 03.03.2025 um 10:02 schrieb Sam <sam@broker.example>:\n> [1] x\n"
    fr = "DENY\n\nLe lun. 3 mars 2025 à 10:02, Sam <sam@broker.example> a écrit :\n> [1] x\n"
    assert extract_reply(de) == "DENY"
    assert extract_reply(fr) == "DENY"


def test_mobile_signature_and_sig_separator_removed() -> None:
    assert extract_reply("APPROVE\n\nSent from my iPhone\n\n> q") == "APPROVE"
    assert extract_reply("HELP\n-- \nJane Parent\n555 0100") == "HELP"


def test_parent_text_that_mentions_writing_is_kept() -> None:
    """'wrote:' alone, without a date or an address, is the parent's own text."""
    body = "NOTE in 2019 the therapist wrote: wrong diagnosis\nAPPROVE\n"
    assert extract_reply(body) == "NOTE in 2019 the therapist wrote: wrong diagnosis\nAPPROVE"


def test_to_command_with_address_is_not_a_header() -> None:
    body = (
        "TO park@school.example, tag:ot\nOn Mon, 3 Mar 2025, Sam <sam@broker.example> wrote:\n> q"
    )
    assert extract_reply(body) == "TO park@school.example, tag:ot"


def test_reply_below_quote() -> None:
    body = "On 03/03/2025 10:02, Sam wrote:\n> [1] text\n\nAPPROVE\n"
    assert extract_reply(body) == "APPROVE"


def test_many_lines_stay_fast() -> None:
    """The cutting rules are linear: 20,000 attribution-like lines must not stall intake."""
    import time

    start = time.monotonic()
    extract_reply("On 1 2016 wrote\n" * 20000 + "From: a\nTo: b\n" * 5000)
    assert time.monotonic() - start < 15


# --------------------------------------------------------------------------
# Whole messages and HTML
# --------------------------------------------------------------------------


def _message(**parts: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "parent@example.org"
    msg["To"] = "sam@broker.example"
    msg["Subject"] = "Re: Review: OT report"
    if "plain" in parts:
        msg.set_content(parts["plain"])
        if "html" in parts:
            msg.add_alternative(parts["html"], subtype="html")
    else:
        msg.set_content(parts["html"], subtype="html")
    return msg


def test_message_prefers_text_plain() -> None:
    msg = _message(
        plain="APPROVE\n\nOn Mon, 3 Mar 2025, Sam <sam@broker.example> wrote:\n> x\n",
        html="<p>DENY</p>",
    )
    got = extract_reply_from_message(msg)
    assert isinstance(got, ReplyText)
    assert got.text == "APPROVE"
    assert "> x" in got.full


def test_message_html_only_gmail_quote_removed() -> None:
    html = (
        '<div dir="ltr">REDACT 2<br>NOTE wrong date</div><br>'
        '<div class="gmail_quote"><div class="gmail_attr">On Mon, 3 Mar 2025, Sam '
        "&lt;sam@broker.example&gt; wrote:<br></div>"
        '<blockquote class="gmail_quote"><p>[1] APPROVE me</p></blockquote></div>'
    )
    got = extract_reply_from_message(_message(html=html))
    assert got.text == "REDACT 2\nNOTE wrong date"
    assert "APPROVE me" in got.full


@pytest.mark.parametrize(
    "quote",
    [
        '<div id="divRplyFwdMsg"><b>From:</b> Sam<br><b>Sent:</b> Monday</div><p>[1] x</p>',
        '<div class="moz-cite-prefix">On 03.03.2025 10:02, Sam wrote:</div>'
        '<blockquote type="cite">[1] x</blockquote>',
        '<div class="OutlookMessageHeader"><b>From:</b> Sam</div><p>[1] x</p>',
        '<div>03.03.2025, 10:02, "Sam" &lt;sam@broker.example&gt;:</div>'
        "<blockquote>[1] x</blockquote>",
        '<hr id="stopSpelling">Date: Mon<br>From: sam@broker.example<br>[1] x',
    ],
)
def test_html_quote_styles_removed(quote: str) -> None:
    html = f"<html><body><div>APPROVE</div>{quote}</body></html>"
    assert extract_reply_from_html(html) == "APPROVE"
    assert "[1] x" not in remove_html_quote(html)


def test_html_to_text_keeps_paragraphs() -> None:
    html = "<p>First paragraph.</p><p>Second<br>line two.</p><div>Third</div>"
    assert html_to_text(html) == "First paragraph.\n\nSecond\nline two.\n\nThird"


def test_html_to_text_empty() -> None:
    assert html_to_text("") == ""
    assert html_to_text("   ") == ""
    assert extract_reply_from_html("") == ""


def test_unknown_charset_does_not_crash() -> None:
    raw = (
        b"From: parent@example.org\r\nTo: sam@broker.example\r\nSubject: Re: x\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n\r\n"
        b"APPROVE\r\n\r\n> quoted\r\n"
    )
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert extract_reply_from_message(msg).text == "APPROVE"


def test_attached_message_is_not_the_reply() -> None:
    inner = EmailMessage()
    inner["Subject"] = "old"
    inner.set_content("APPROVE")
    outer = EmailMessage()
    outer["Subject"] = "fwd"
    outer.set_content("DENY")
    outer.add_attachment(inner)
    assert extract_reply_from_message(outer).text == "DENY"


def test_reply_after_an_attached_message() -> None:
    inner = EmailMessage()
    inner["Subject"] = "old"
    inner.set_content("APPROVE")
    outer = EmailMessage()
    outer["Subject"] = "fwd"
    outer.make_mixed()
    outer.attach(_as_part(inner))
    body = EmailMessage()
    body.set_content("DENY")
    outer.attach(body)
    assert extract_reply_from_message(outer).text == "DENY"


def _as_part(msg: EmailMessage) -> EmailMessage:
    part = EmailMessage()
    part.set_content(msg)
    return part
