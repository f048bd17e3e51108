"""Automatic-mail classification: bounces, auto-replies and list mail never count as decisions.

Corpus: every sisimai bounce/auto-reply/feedback report is automatic (with the
reason we expect, so a reordering of rules is noticed), sisimai's ordinary
message and the twelve talon client replies are not. Then one hand-built
message per rule, and near-misses that must stay human.
"""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from broker.mail.autoreply import RULES, automatic_reasons, classify_automatic

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
SISIMAI = CORPUS / "bounces" / "sisimai-set-of-emails" / "maildir"
TALON = CORPUS / "replies" / "mailgun-talon" / "standard_replies"
NO_CORPUS = f"shared corpus not found at {CORPUS} (checked out next to the repository?)"
NEUTRAL_SENDER = "someone@example.org"

DSN = "delivery status notification (multipart/report)"
# First matching reason per sisimai message, with the envelope sender taken
# from its Return-Path (what the final MTA recorded), or a neutral one.
EXPECTED_BOUNCE_REASONS = {
    "arf-01": "feedback report (multipart/report; report-type=feedback-report)",
    "lhost-amazonses-05": DSN,
    "lhost-exchange2007-01": DSN,
    "lhost-exim-01": "Auto-Submitted: auto-replied",
    "lhost-exim-58": "Auto-Submitted: auto-replied",
    "lhost-gmail-01": "null return path",
    "lhost-gmail-06": "null return path",
    "lhost-googleworkspace-01": DSN,
    "lhost-outlook-04": DSN,
    "lhost-postfix-02": DSN,
    "lhost-postfix-04": DSN,
    "lhost-postfix-39": DSN,
    "lhost-postfix-63": DSN,
    "lhost-postfix-70": DSN,
    "lhost-qmail-06": "From mailer-daemon",
    "lhost-sendmail-01": DSN,
    "lhost-sendmail-05": DSN,
    "lhost-sendmail-15": DSN,
    "rfc3464-06": DSN,
    "rfc3464-07": DSN,
    "rfc3464-10": DSN,
    "rfc3464-28": DSN,
    "rfc3464-35": DSN,
    "rfc3464-43": DSN,
    "rfc3834-01": "Auto-Submitted: auto-replied",
    "rfc3834-02": "X-Auto-Response-Suppress: All",
    "rfc3834-03": "X-Apple-Action: VACATION",
    "rhost-apple-04": DSN,
    "rhost-google-02": DSN,
    "rhost-microsoft-02": DSN,
}


def _read(path: Path) -> EmailMessage:
    msg = email.message_from_bytes(path.read_bytes(), policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _envelope_sender(msg: EmailMessage) -> str:
    """Return-Path as recorded at delivery ("<>" for the null path), else a neutral sender."""
    for key, value in msg.raw_items():
        if key.lower() == "return-path":
            return str(value).strip()
    return NEUTRAL_SENDER


def _names(folder: Path, pattern: str) -> list[str]:
    names = sorted(p.stem for p in folder.glob(pattern))
    return names or [pytest.param("", marks=pytest.mark.skip(reason=NO_CORPUS))]  # type: ignore[list-item]


@pytest.mark.parametrize("name", _names(SISIMAI / "bsd", "*.eml"))
def test_sisimai_bounce_is_automatic(name: str) -> None:
    msg = _read(SISIMAI / "bsd" / f"{name}.eml")
    assert classify_automatic(msg, _envelope_sender(msg)) == EXPECTED_BOUNCE_REASONS[name]


@pytest.mark.parametrize("name", _names(SISIMAI / "bsd", "*.eml"))
def test_sisimai_bounce_detected_from_headers_alone(name: str) -> None:
    """Even relayed with a normal envelope sender, the headers give every one away."""
    assert automatic_reasons(_read(SISIMAI / "bsd" / f"{name}.eml"), NEUTRAL_SENDER)


@pytest.mark.skipif(not SISIMAI.is_dir(), reason=NO_CORPUS)
def test_sisimai_corpus_is_complete() -> None:
    assert sorted(p.stem for p in (SISIMAI / "bsd").glob("*.eml")) == sorted(
        EXPECTED_BOUNCE_REASONS
    )


@pytest.mark.skipif(not SISIMAI.is_dir(), reason=NO_CORPUS)
def test_sisimai_ordinary_message_is_not_automatic() -> None:
    msg = _read(SISIMAI / "not" / "is-not-bounce-01.eml")
    assert classify_automatic(msg, _envelope_sender(msg)) is None
    assert automatic_reasons(msg, _envelope_sender(msg)) == []


@pytest.mark.parametrize("name", _names(TALON, "*.eml"))
def test_talon_client_reply_is_not_automatic(name: str) -> None:
    msg = _read(TALON / f"{name}.eml")
    assert classify_automatic(msg, "parent@example.org") is None


# --------------------------------------------------------------------------
# Hand-built messages, one or more per rule
# --------------------------------------------------------------------------


def _reply(**headers: str) -> EmailMessage:
    """A parent's ordinary reply, plus the given headers (underscores become dashes)."""
    msg = EmailMessage()
    msg["From"] = "Parent <parent@example.org>"
    msg["To"] = "sam@broker.example"
    msg["Subject"] = "Re: Review: OT report"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("APPROVE\n")
    return msg


def test_plain_reply_is_not_automatic() -> None:
    assert classify_automatic(_reply(), "parent@example.org") is None


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Auto_Submitted": "auto-replied"}, "Auto-Submitted: auto-replied"),
        ({"Auto_Submitted": "auto-generated (failure)"}, "Auto-Submitted: auto-generated"),
        (
            {"Auto_Submitted": "auto-notified; owner-email=x@example.org"},
            "Auto-Submitted: auto-notified",
        ),
        ({"Precedence": "bulk"}, "Precedence: bulk"),
        ({"Precedence": "Junk"}, "Precedence: junk"),
        ({"Precedence": "list"}, "Precedence: list"),
        ({"Precedence": "auto_reply"}, "Precedence: auto_reply"),
        ({"List_Id": "Parents <parents.school.example>"}, "List-Id present"),
        ({"List_Unsubscribe": "<mailto:leave@school.example>"}, "List-Unsubscribe present"),
        ({"List_Post": "<mailto:list@school.example>"}, "List-Post present"),
        ({"X_Autoreply": "yes"}, "X-Autoreply"),
        ({"X_Autorespond": "Away"}, "X-Autorespond"),
        ({"X_Auto_Response_Suppress": "All"}, "X-Auto-Response-Suppress: All"),
        (
            {"X_Auto_Response_Suppress": "DR, OOF, AutoReply"},
            "X-Auto-Response-Suppress: DR, OOF, AutoReply",
        ),
        ({"X_Apple_Action": "VACATION"}, "X-Apple-Action: VACATION"),
        ({"X_Failed_Recipients": "kid@school.example"}, "X-Failed-Recipients present"),
        ({"X_Loop": "vacation@example.org"}, "X-Loop: vacation@example.org"),
    ],
)
def test_header_rules(headers: dict[str, str], reason: str) -> None:
    assert classify_automatic(_reply(**headers), "parent@example.org") == reason


def test_auto_submitted_no_is_human() -> None:
    assert classify_automatic(_reply(Auto_Submitted="no"), "parent@example.org") is None


def test_near_misses_stay_human() -> None:
    msg = _reply(Precedence="first-class", X_Auto_Response_Suppress="RN, NRN")
    assert classify_automatic(msg, "parent@example.org") is None


@pytest.mark.parametrize("mail_from", ["", "<>", "  "])
def test_null_return_path(mail_from: str) -> None:
    assert classify_automatic(_reply(), mail_from) == "null return path"


@pytest.mark.parametrize(
    ("mail_from", "reason"),
    [
        ("MAILER-DAEMON@mx.example.org", "envelope sender mailer-daemon"),
        ("<postmaster@mx.example.org>", "envelope sender postmaster"),
    ],
)
def test_daemon_envelope_sender(mail_from: str, reason: str) -> None:
    assert classify_automatic(_reply(), mail_from) == reason


def test_daemon_from_header() -> None:
    msg = _reply()
    msg.replace_header("From", "Mail Delivery System <Mailer-Daemon@mx.example.org>")
    assert classify_automatic(msg, "bounce-handler@mx.example.org") == "From mailer-daemon"


def _report(report_type: str, part_type: str) -> EmailMessage:
    msg = _reply()
    msg.clear_content()
    msg.make_mixed()
    text = EmailMessage()
    text.set_content("This is an automatically generated notification.")
    msg.attach(text)
    status = EmailMessage()
    status.set_content(b"Reporting-MTA: dns; mx.example.org\r\n", "application", "octet-stream")
    status.replace_header("Content-Type", part_type)
    msg.attach(status)
    msg.replace_header(
        "Content-Type", f'multipart/report; report-type="{report_type}"; boundary="b1"'
    )
    msg.set_boundary("b1")
    return msg


@pytest.mark.parametrize(
    ("report_type", "part_type", "reason"),
    [
        ("delivery-status", "message/delivery-status", DSN),
        (
            "feedback-report",
            "message/feedback-report",
            "feedback report (multipart/report; report-type=feedback-report)",
        ),
        (
            "disposition-notification",
            "message/disposition-notification",
            "read receipt (multipart/report; report-type=disposition-notification)",
        ),
    ],
)
def test_multipart_report(report_type: str, part_type: str, reason: str) -> None:
    assert classify_automatic(_report(report_type, part_type), "parent@example.org") == reason


def test_delivery_status_part_without_multipart_report() -> None:
    msg = _report("delivery-status", "message/delivery-status")
    msg.replace_header("Content-Type", 'multipart/mixed; boundary="b1"')
    assert classify_automatic(msg, "parent@example.org") == (
        "delivery status notification (message/delivery-status part)"
    )


@pytest.mark.parametrize(
    "subject",
    [
        "Automatic reply: Review: OT report",
        "Out of Office: back Monday",
        "=?utf-8?q?Abwesenheitsnotiz=3A_Review?=",
        "Undeliverable: Review: OT report",
    ],
)
def test_subject_rule(subject: str) -> None:
    msg = _reply()
    msg.replace_header("Subject", subject)
    reason = classify_automatic(msg, "parent@example.org")
    assert reason is not None and reason.startswith("subject ")


def test_reply_subject_mentioning_office_is_human() -> None:
    msg = _reply()
    msg.replace_header("Subject", "Re: Out of office note in the report")
    assert classify_automatic(msg, "parent@example.org") is None


def test_all_reasons_are_recorded_in_rule_order() -> None:
    msg = _reply(Auto_Submitted="auto-replied", Precedence="bulk", List_Id="<l.example>")
    names = [name for name, _ in automatic_reasons(msg, "<>")]
    assert names == ["auto-submitted", "precedence", "mailing-list", "null-return-path"]
    assert len({rule.name for rule in RULES}) == len(RULES)


def test_malformed_headers_do_not_raise() -> None:
    raw = (
        b"From: <<<@@@\r\nSubject: =?x-bogus?q?=FF?=\r\nAuto-Submitted:\r\n"
        b"Content-Type: multipart/report; report-type\r\n\r\nbody\r\n"
    )
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    classify_automatic(msg, "parent@example.org")  # any answer, but no exception
