"""Redaction leak suite (promise 2): the provider's mail hides "family conflict" behind a
transfer or header encoding - a quoted-printable soft line break inside the phrase, a
quoted-printable or base64 body, RFC 2047 subject words (B, Q, and the phrase split over
two words), HTML entities in an HTML part, RFC 2231 attachment filenames. The parent
replies REDACT "family conflict", gets a preview, APPROVEs; no byte the school receives,
raw or decoded in any way a mail client would decode it, contains the phrase.

The inputs are written as raw bytes by hand so each encoding is exactly the one named.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email
import html
import quopri
import re
from collections.abc import Iterator
from email import policy
from email.header import decode_header, make_header
from pathlib import Path

import pytest

from tests.harness import DOMAIN, GUARDIAN, SCHOOL, Received, World, reply_to

PHRASE = re.compile(r"family\s+conflict", re.IGNORECASE)
PROVIDER = "lee@clinic.example"
KEEP = "Recommend a slant board in class."


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


# --- building raw input ---------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _raw(subject: str, mime: tuple[str, bytes]) -> bytes:
    """A provider's message: ``mime`` is (top-level MIME headers, CRLF ended; body)."""
    content_headers, body = mime
    head = (
        f"From: Dr. Lee <{PROVIDER}>\r\n"
        f"To: sam@{DOMAIN}\r\n"
        f"Subject: {subject}\r\n"
        "Message-ID: <leak.%d@clinic.example>\r\n"
        "Date: Mon, 2 Mar 2026 09:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        f"{content_headers}\r\n"
    )
    return head.encode("ascii") + body


def _plain(body: str, cte: str = "7bit") -> tuple[str, bytes]:
    return (
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n",
        body.replace("\n", "\r\n").encode("utf-8"),
    )


def _cte(cte: str) -> str:
    return f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n"


def _multipart(parts: list[tuple[str, bytes]], subtype: str = "mixed") -> tuple[str, bytes]:
    boundary = "==leak-boundary=="
    out = b""
    for headers, body in parts:
        out += f"--{boundary}\r\n{headers}\r\n".encode("ascii") + body + b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n', out


INTRO = "Sam worked on handwriting this month."
PLAIN_BODY = f"{INTRO}\n\nSam mentioned family conflict at home.\n\n{KEEP}\n"
CLEAN_BODY = f"{INTRO}\n\nThe session went well.\n\n{KEEP}\n"


def _soft_break_body() -> bytes:
    # Quoted-printable with soft line breaks inside the phrase, in both words and between.
    return (
        f"{INTRO}\r\n\r\n"
        "Sam mentioned fam=\r\nily conflict at home.\r\n\r\n"
        "Also the family=20=\r\nconflict came up, and the FAMILY CONF=\r\nLICT again.\r\n\r\n"
        f"{KEEP}\r\n"
    ).encode("ascii")


def _qp_letters_body() -> bytes:
    # Every letter of the phrase written as an =XX escape.
    hexed = "".join(f"={ord(c):02X}" for c in "family conflict")
    return (f"{INTRO}\r\n\r\nSam mentioned {hexed} at home.\r\n\r\n{KEEP}\r\n").encode("ascii")


def _b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


CASES: dict[str, bytes] = {
    "qp-soft-line-break": _raw(
        "OT progress report", (_cte("quoted-printable"), _soft_break_body())
    ),
    "qp-escaped-letters": _raw(
        "OT progress report", (_cte("quoted-printable"), _qp_letters_body())
    ),
    "base64-body": _raw(
        "OT progress report",
        (_cte("base64"), _b64_lines(PLAIN_BODY.replace("\n", "\r\n").encode("utf-8"))),
    ),
    "subject-rfc2047-b": _raw(
        f"=?utf-8?B?{_b64('Notes on family conflict')}?=", _plain(CLEAN_BODY)
    ),
    "subject-rfc2047-q": _raw("=?utf-8?Q?Notes_on_family_conflict?=", _plain(CLEAN_BODY)),
    "subject-rfc2047-split-words": _raw(
        "=?utf-8?Q?Notes_on_fami?= =?utf-8?B?" + _b64("ly conflict") + "?=",
        _plain(CLEAN_BODY),
    ),
    "subject-rfc2047-split-at-space": _raw(
        "=?utf-8?Q?Notes_on_family?=\r\n =?utf-8?Q?_conflict?=", _plain(CLEAN_BODY)
    ),
    "html-only-nbsp": _raw(
        "OT progress report",
        (
            "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n",
            (
                f"<html><body><p>{INTRO}</p><p>Sam mentioned family&nbsp;conflict at home.</p>"
                f"<p>{KEEP}</p></body></html>\r\n"
            ).encode("ascii"),
        ),
    ),
    "html-only-numeric-entity": _raw(
        "OT progress report",
        (
            "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n",
            (
                f"<html><body><p>{INTRO}</p><p>Sam mentioned &#102;amily conflict and "
                f"&#x46;AMILY&#32;CONFLICT at home.</p><p>{KEEP}</p></body></html>\r\n"
            ).encode("ascii"),
        ),
    ),
    "alternative-html-entity": _raw(
        "OT progress report",
        _multipart(
            [
                _plain(PLAIN_BODY),
                (
                    "Content-Type: text/html; charset=utf-8\r\n"
                    "Content-Transfer-Encoding: quoted-printable\r\n",
                    (
                        f"<p>{INTRO}</p><p>Sam mentioned &#102;amily&nbsp;conf=\r\nlict.</p>"
                        f"<p>{KEEP}</p>"
                    ).encode("ascii"),
                ),
            ],
            "alternative",
        ),
    ),
    "filename-rfc2231": _raw(
        "OT progress report",
        _multipart(
            [
                _plain(CLEAN_BODY),
                (
                    "Content-Type: text/plain; charset=utf-8\r\n"
                    "Content-Disposition: attachment; filename*=utf-8''family%20conflict.txt\r\n"
                    "Content-Transfer-Encoding: base64\r\n",
                    _b64_lines(b"Session notes.\r\n\r\nNothing else to report.\r\n"),
                ),
            ]
        ),
    ),
    "filename-rfc2231-continuations": _raw(
        "OT progress report",
        _multipart(
            [
                _plain(CLEAN_BODY),
                (
                    "Content-Type: application/octet-stream\r\n"
                    "Content-Disposition: attachment;\r\n"
                    " filename*0*=utf-8''Family%20Con;\r\n"
                    " filename*1*=flict%20notes.bin\r\n"
                    "Content-Transfer-Encoding: base64\r\n",
                    _b64_lines(bytes(range(256))),
                ),
            ]
        ),
    ),
    "filename-rfc2047-in-name": _raw(
        "OT progress report",
        _multipart(
            [
                _plain(CLEAN_BODY),
                (
                    "Content-Type: text/plain; charset=utf-8;\r\n"
                    ' name="=?utf-8?Q?family_conflict.txt?="\r\n'
                    'Content-Disposition: attachment; filename="=?utf-8?B?'
                    + _b64("family conflict.txt")
                    + '?="\r\n'
                    "Content-Transfer-Encoding: quoted-printable\r\n",
                    b"Session notes: the fam=\r\nily conflict again.\r\n\r\nOther notes.\r\n",
                ),
            ]
        ),
    ),
    "attachment-base64-text": _raw(
        "OT progress report",
        _multipart(
            [
                _plain(CLEAN_BODY),
                (
                    "Content-Type: text/plain; charset=utf-8\r\n"
                    'Content-Disposition: attachment; filename="notes.txt"\r\n'
                    "Content-Transfer-Encoding: base64\r\n",
                    _b64_lines(b"Session notes.\r\n\r\nThe family\r\nconflict came up.\r\n"),
                ),
            ]
        ),
    ),
}


# --- reading everything a recipient could read ----------------------------------------------


def _decoded_header(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (UnicodeError, LookupError, binascii.Error, ValueError, email.errors.HeaderParseError):
        return value


def readings(data: bytes) -> list[str]:
    """Every reading of a message: raw bytes (as-is, QP-undone, soft breaks joined), each
    header raw and RFC 2047/2231-decoded, each part's payload decoded (QP/base64) and read
    as UTF-8, Latin-1 and its declared charset, each filename and its raw parameters."""
    out = [data.decode("latin-1"), data.replace(b"=\r\n", b"").decode("latin-1")]
    out.append(quopri.decodestring(data).decode("utf-8", "replace"))
    compat = email.message_from_bytes(data, policy=policy.compat32)
    modern = email.message_from_bytes(data, policy=policy.default)
    for part in compat.walk():
        for key, value in part.items():
            out.append(f"{key}: {value}")
            out.append(f"{key}: {_decoded_header(str(value))}")
        for param in ("filename", "name"):
            raw = part.get_param(
                param, header="content-disposition" if param == "filename" else "content-type"
            )
            if raw is not None:
                out.append(email.utils.collapse_rfc2231_value(raw))
        if part.get_filename():
            out.append(part.get_filename())
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        out.append(payload.decode("utf-8", "replace"))
        out.append(payload.decode("latin-1"))
        charset = part.get_content_charset()
        if charset:
            with contextlib.suppress(LookupError):
                out.append(payload.decode(charset, "replace"))
    for part in modern.walk():
        out.extend(f"{k}: {v}" for k, v in part.items())
        if part.get_filename():
            out.append(part.get_filename())
    out.extend([html.unescape(r) for r in out])  # an HTML part would be read this way
    return out


def assert_no_phrase(copy: Received) -> None:
    for reading in readings(copy.data):
        m = PHRASE.search(reading)
        assert m is None, (
            f"leak in {copy.rcpt_tos}: ...{reading[max(0, m.start() - 80) : m.end() + 80]}..."
        )


# --- the suite ------------------------------------------------------------------------------


def _answer(world: World, to: Received, text: str) -> None:
    world.send(reply_to(to, text), GUARDIAN, str(to.msg["Reply-To"]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_encoded_phrase_never_released(world: World, case: str) -> None:
    raw = CASES[case].replace(b"<leak.%d@", f"<leak.{case}@".encode("ascii"))
    world.send(raw, PROVIDER, f"sam@{DOMAIN}")
    review = world.review()
    _answer(world, review, 'REDACT "family conflict"')
    preview = world.notice("Preview, please confirm")
    _answer(world, preview, "APPROVE")
    copies = world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    for copy in copies:
        seen = readings(copy.data)
        assert any(KEEP in r for r in seen)
        # The phrase was found (decoded) and replaced, not merely lost on the way.
        assert any("[redacted]" in r for r in seen), case
        assert_no_phrase(copy)
    world.wait_state("released")
