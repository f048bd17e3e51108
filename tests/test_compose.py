"""Composed messages parse back to exactly what was put in; address helpers round-trip."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest

from broker.mail.compose import (
    bounce_address,
    compose,
    compose_notice,
    compose_release,
    compose_review_request,
    delivery_id_from_bounce_address,
    is_token,
    list_address,
    new_message_id,
    records_name,
    release_message_id,
    review_address,
    review_message_id,
    token_from_address,
    tokens_from_references,
)
from broker.mail.document import Attachment, Paragraph, ReleaseContent
from broker.review.render import ReleaseContext, render_release

DOMAIN = "records.example"
TOKEN = "abcdefghijklmnopqrstuvwxyz234567"
TOKEN2 = "a" * 32
WHEN = datetime(2025, 3, 4, 14, 5, tzinfo=UTC)


def parse(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def body_text(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")  # wire CRLF, as parsed


def basic(**changes: object) -> bytes:
    values: dict[str, object] = dict(
        from_addr="sam@records.example",
        from_name="Sam's records",
        to="park@school.example",
        subject="OT progress",
        text="Hello\n",
        message_id="<x1@records.example>",
        date=WHEN,
    )
    values.update(changes)
    return compose(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- compose


def test_plain_message_headers_and_body() -> None:
    raw = basic(
        reply_to="review+" + TOKEN + "@records.example",
        in_reply_to="<orig@clinic.example>",
        references=("<a@clinic.example>", "<orig@clinic.example>"),
        auto_submitted="auto-generated",
        extra_headers={"X-Broker-Record": "12"},
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg["From"].addresses[0].display_name == "Sam's records"
    assert msg["From"].addresses[0].addr_spec == "sam@records.example"
    assert msg["To"].addresses[0].addr_spec == "park@school.example"
    assert len(msg["To"].addresses) == 1
    assert msg["Reply-To"].addresses[0].addr_spec == f"review+{TOKEN}@records.example"
    assert msg["Subject"] == "OT progress"
    assert msg["Message-ID"] == "<x1@records.example>"
    assert msg["In-Reply-To"] == "<orig@clinic.example>"
    assert msg["References"].split() == ["<a@clinic.example>", "<orig@clinic.example>"]
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["X-Broker-Record"] == "12"
    assert parsedate_to_datetime(msg["Date"]) == WHEN
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert body_text(msg) == "Hello\n"


def test_optional_headers_absent_by_default() -> None:
    msg = parse(basic())
    for name in ("Reply-To", "In-Reply-To", "References", "Auto-Submitted", "Cc", "Bcc"):
        assert name not in msg


def test_default_date_is_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    msg = parse(basic(date=None))
    assert parsedate_to_datetime(msg["Date"]) >= before


def test_non_ascii_and_long_lines_round_trip_within_smtp_limits() -> None:
    text = "Zoë's évaluation: ok\n" + "word " * 400 + "\nend\n"
    raw = basic(text=text, subject="Évaluation de Zoë", to_name="Zoë Park")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.isascii()  # quoted-printable: safe for any relay
    msg = parse(raw)
    assert body_text(msg) == text
    assert msg["Subject"] == "Évaluation de Zoë"
    assert msg["To"].addresses[0].display_name == "Zoë Park"


def test_crlf_text_is_normalised_and_gets_a_final_newline() -> None:
    msg = parse(basic(text="a\r\nb"))
    assert body_text(msg) == "a\nb\n"


def test_header_injection_is_collapsed_or_refused() -> None:
    msg = parse(basic(subject="hi\r\nBcc: victim@example.com"))
    assert "Bcc" not in msg
    assert msg["Subject"] == "hi Bcc: victim@example.com"
    with pytest.raises(ValueError):
        basic(to="park@school.example\r\nBcc: victim@example.com")
    with pytest.raises(ValueError):
        basic(to="park@school.example, other@school.example")
    with pytest.raises(ValueError):
        basic(from_addr="not-an-address")
    with pytest.raises(ValueError):
        basic(message_id="no-angle-brackets@x")
    with pytest.raises(ValueError):
        basic(extra_headers={"Bcc": "victim@example.com"})
    with pytest.raises(ValueError):
        basic(extra_headers={"Bad Name": "x"})


def test_malformed_outside_ids_are_dropped_not_fatal() -> None:
    msg = parse(basic(in_reply_to="garbage", references=("<ok@x.example>", "bad id")))
    assert "In-Reply-To" not in msg
    assert msg["References"] == "<ok@x.example>"


def test_attachments_round_trip_with_non_ascii_filename() -> None:
    pdf = b"%PDF-1.4\n\x00\xff binary"
    atts = (
        Attachment("A1", "évaluation de Zoë – printemps.pdf", "application/pdf", len(pdf), pdf),
        Attachment("A2", "notes.txt", "text/plain", 5, b"hello"),
        Attachment("A3", "../../etc/passwd", "weird", 3, b"abc"),
        Attachment("A4", "fwd.eml", "message/rfc822", 3, b"x: y"),
    )
    raw = basic(text="See attached.\n", attachments=atts)
    assert raw.isascii()
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    assert body_text(msg) == "See attached.\n"
    parts = list(msg.iter_attachments())
    assert [p.get_filename() for p in parts] == [
        "évaluation de Zoë – printemps.pdf",
        "notes.txt",
        "_.._etc_passwd",
        "fwd.eml",
    ]
    assert [p.get_content_type() for p in parts] == [
        "application/pdf",
        "text/plain",
        "application/octet-stream",
        "application/octet-stream",
    ]
    assert [p.get_payload(decode=True) for p in parts] == [pdf, b"hello", b"abc", b"x: y"]
    assert all(p.get_content_disposition() == "attachment" for p in parts)
    assert "filename*" in str(parts[0].get("Content-Disposition").fold(policy=policy.SMTP))
    assert "MIME-Version" not in parts[0]


# --------------------------------------------------------------------------- addresses


def test_names() -> None:
    assert records_name("Sam Doe") == "Sam's records"
    assert records_name("Zoë") == "Zoë's records"


def test_list_address() -> None:
    assert list_address("sam", DOMAIN) == "sam@records.example"
    for bad in ("review", "bounces", "Sam", "sa m", "sam@x", "sam+x", ""):
        with pytest.raises(ValueError):
            list_address(bad, DOMAIN)
    with pytest.raises(ValueError):
        list_address("sam", "records.example>, evil@x")


def test_review_address_round_trip() -> None:
    addr = review_address(TOKEN, DOMAIN)
    assert addr == f"review+{TOKEN}@records.example"
    assert token_from_address(addr, DOMAIN) == TOKEN
    assert token_from_address(f"Sam's records <{addr}>", DOMAIN) == TOKEN
    assert token_from_address(addr.upper(), DOMAIN) == TOKEN  # case-mangling relays


@pytest.mark.parametrize(
    "addr",
    [
        f"review+{TOKEN}@other.example",
        f"review+{TOKEN[:-1]}@records.example",
        f"review+{TOKEN}x@records.example",
        f"review+{TOKEN[:-1]}1@records.example",  # 1 is not base32
        f"reviews+{TOKEN}@records.example",
        f"review{TOKEN}@records.example",
        "review+@records.example",
        "sam@records.example",
        "",
        "not an address",
    ],
)
def test_token_from_address_rejects(addr: str) -> None:
    assert token_from_address(addr, DOMAIN) is None


def test_malformed_tokens_are_refused_when_composing() -> None:
    assert is_token(TOKEN) and not is_token(TOKEN.upper()) and not is_token(TOKEN + "a")
    for bad in ("", "short", TOKEN[:-1] + "8", TOKEN + "a", TOKEN.upper()):
        with pytest.raises(ValueError):
            review_address(bad, DOMAIN)
        with pytest.raises(ValueError):
            review_message_id(bad, DOMAIN)


def test_tokens_from_references() -> None:
    values = [
        f"<abc@mail.example>\r\n <review.{TOKEN}@records.example>",
        f"<review.{TOKEN2}.3@RECORDS.example> <review.{TOKEN}@records.example>",
        f"<review.{TOKEN}@evil.example> <review.{TOKEN[:-1]}@records.example>",
    ]
    assert tokens_from_references(values, DOMAIN) == [TOKEN, TOKEN2]
    assert tokens_from_references([], DOMAIN) == []
    assert tokens_from_references(["<review.x@records.example>"], DOMAIN) == []


def test_review_message_id_round_trip() -> None:
    mid = review_message_id(TOKEN, DOMAIN)
    assert mid == f"<review.{TOKEN}@records.example>"
    assert tokens_from_references([mid], DOMAIN) == [TOKEN]
    again = review_message_id(TOKEN, DOMAIN, seq=2)
    assert again != mid and tokens_from_references([again], DOMAIN) == [TOKEN]


def test_bounce_address_round_trip() -> None:
    addr = bounce_address(42, DOMAIN)
    assert addr == "bounces+42@records.example"
    assert delivery_id_from_bounce_address(addr, DOMAIN) == 42
    assert delivery_id_from_bounce_address("bounces+x@records.example", DOMAIN) is None
    assert delivery_id_from_bounce_address("bounces+42@other.example", DOMAIN) is None
    assert delivery_id_from_bounce_address("bounces@records.example", DOMAIN) is None
    with pytest.raises(ValueError):
        bounce_address(-1, DOMAIN)


def test_release_message_id_is_stable_per_record_and_recipient() -> None:
    a = release_message_id(12, "Park@School.example ", DOMAIN)
    assert a == release_message_id(12, "park@school.example", DOMAIN)
    assert a != release_message_id(13, "park@school.example", DOMAIN)
    assert a != release_message_id(12, "ruiz@school.example", DOMAIN)
    assert a.startswith("<release.12.") and a.endswith("@records.example>")
    assert len(a.split(".")[2].split("@")[0]) == 16


def test_new_message_ids_are_unique() -> None:
    assert new_message_id(DOMAIN) != new_message_id(DOMAIN)
    assert new_message_id(DOMAIN).endswith("@records.example>")


# --------------------------------------------------------------------------- broker mails


def test_review_request_threads_back_to_its_token() -> None:
    raw = compose_review_request(
        child_name="Sam Doe",
        slug="sam",
        domain=DOMAIN,
        token=TOKEN,
        to="jane@home.example",
        to_name="Jane",
        subject="[Sam's records #12] Review needed",
        text="[1] hello\n",
        seq=1,
    )
    msg = parse(raw)
    assert token_from_address(msg["Reply-To"].addresses[0].addr_spec, DOMAIN) == TOKEN
    assert tokens_from_references([msg["Message-ID"]], DOMAIN) == [TOKEN]
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["From"].addresses[0].addr_spec == "sam@records.example"


def test_notice_defaults_and_receipt_style() -> None:
    msg = parse(
        compose_notice(
            child_name="Sam",
            slug="sam",
            domain=DOMAIN,
            to="lee@clinic.example",
            subject="Received",
            text="held\n",
            auto_submitted="auto-replied",
            in_reply_to="<orig@clinic.example>",
        )
    )
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<orig@clinic.example>"
    assert msg["Message-ID"].endswith("@records.example>")
    assert "Reply-To" not in msg


def test_release_round_trip() -> None:
    pdf = b"%PDF-1.4 redacted"
    content = ReleaseContent(
        subject="OT progress",
        note="Please read A1 first.",
        paragraphs=(Paragraph("1", "Progress is steady."), Paragraph("3", "See you in May.")),
        attachments=(Attachment("A1", "rapport é.pdf", "application/pdf", len(pdf), pdf),),
    )
    text = render_release(ReleaseContext(12, "Sam Doe", content, "Jane Doe", WHEN))
    raw = compose_release(
        child_name="Sam Doe",
        slug="sam",
        domain=DOMAIN,
        record_id=12,
        to="park@school.example",
        to_name="Ms Park",
        subject=content.subject,
        text=text,
        attachments=content.attachments,
        date=WHEN,
    )
    msg = parse(raw)
    assert str(msg["From"]) == "Sam's records <sam@records.example>"
    assert msg["Reply-To"].addresses[0].addr_spec == "sam@records.example"
    assert [a.addr_spec for a in msg["To"].addresses] == ["park@school.example"]
    assert msg["Message-ID"] == release_message_id(12, "park@school.example", DOMAIN)
    assert msg["Subject"] == "OT progress"
    body = body_text(msg)
    assert body == text
    assert body.index("Please read A1 first.") < body.index("Progress is steady.")
    assert "Do not pass it on without the family's written permission." in body
    (att,) = list(msg.iter_attachments())
    assert att.get_filename() == "rapport é.pdf"
    assert att.get_payload(decode=True) == pdf
    # The same inputs give the same message (a resend after a crash is recognisable).
    again = compose_release(
        child_name="Sam Doe",
        slug="sam",
        domain=DOMAIN,
        record_id=12,
        to="park@school.example",
        to_name="Ms Park",
        subject=content.subject,
        text=text,
        attachments=content.attachments,
        date=WHEN,
    )
    assert parse(again)["Message-ID"] == msg["Message-ID"]


def test_attachment_payload_is_base64_not_raw() -> None:
    data = bytes(range(256))
    raw = basic(attachments=(Attachment("A1", "b.bin", "application/octet-stream", 256, data),))
    assert base64.b64encode(data)[:40] in raw.replace(b"\r\n", b"")
