"""Hand-run fuzzer (atheris) for inbound mail: parsing, reply extraction and redaction.
Not collected by pytest.

Each input is a raw message. Invariants:
- parse_message either returns a Document or raises ParseFailed (nothing else);
- extract_reply_from_message never raises;
- apply_draft with REDACT "family conflict" never raises anything but RedactionError
  (fail closed), and the composed release holds the phrase in no decoded reading.

Run: see tests/fuzz/README.md.
"""

from __future__ import annotations

import email
import os
import re
import sys
import tempfile
from email import policy
from pathlib import Path

PHRASE = re.compile(r"family\s+conflict", re.IGNORECASE)
SEED = (
    b"From: Dr. Lee <lee@clinic.example>\r\nTo: sam@records.example\r\n"
    b"Subject: =?utf-8?Q?family_conflict?=\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
    b"\r\nSam mentioned fam=\r\nily conflict.\r\n"
)


def check(data: bytes) -> None:
    from broker.mail.compose import compose_release
    from broker.mail.document import Draft
    from broker.mail.parse import ParseFailed, parse_message
    from broker.mail.reply import extract_reply_from_message
    from broker.redact.text import RedactionError, apply_draft

    msg = email.message_from_bytes(data, policy=policy.default)
    extract_reply_from_message(msg)  # type: ignore[arg-type]

    fd, name = tempfile.mkstemp(suffix=".eml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            doc = parse_message(Path(name))
        except ParseFailed:
            return
    finally:
        os.unlink(name)
    try:
        content = apply_draft(doc, Draft(phrases=("family conflict",)))
    except RedactionError:
        return
    body = "\n\n".join(p.text for p in content.paragraphs)
    out = compose_release(
        child_name="Sam Rivera",
        slug="sam",
        domain="records.example",
        record_id=1,
        to="park@school.example",
        subject=content.subject or "(no subject)",
        text=body,
        attachments=content.attachments,
    )
    from tests.test_redaction_leaks import readings

    for reading in readings(out):
        for piece in reading.split("[redacted]"):
            assert not PHRASE.search(piece), piece[:200]


def one_input(data: bytes) -> None:
    check(data)


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        import broker.mail.parse
        import broker.mail.reply
        import broker.redact.text  # noqa: F401

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
