"""The outgoing-mail policy with header objects made once per text writes exactly the bytes
the stdlib's ``policy.SMTP`` writes: for every message the broker composes, and for
real-world mail parsed and written out again (the PGP/MIME signer's path). The policy for
reading mail that arrives answers every question about a message as ``policy.default``
does."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email import policy
from email.headerregistry import UnstructuredHeader
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.mail import compose as mc
from broker.mail import headers
from broker.mail.document import Attachment

WHEN = datetime(2026, 11, 23, 9, 30, tzinfo=UTC)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=120)
names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)


def _review(subject: str, name: str, text: str, filename: str) -> bytes:
    random.seed(7)  # the MIME boundary is random
    return mc.compose_review_request(
        child_name=name or "Sam", slug="sam", domain="records.example", token="a" * 32,
        to="dana@home.example", to_name=name, subject=subject, text=text, seq=2,
        date=WHEN, attachments=(Attachment(label="", filename=filename or "note.txt",
                                           content_type="text/plain", size=3, data=b"abc"),))


@settings(max_examples=150, deadline=None)
@given(subject=texts, name=names, text=texts, filename=names)
def test_composed_mail_is_byte_for_byte_what_the_stdlib_policy_writes(
        subject: str, name: str, text: str, filename: str) -> None:
    cached = _review(subject, name, text, filename)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mc, "SMTP", policy.SMTP)
        stock = _review(subject, name, text, filename)
    assert cached == stock
    # ...and again, now that every header of it is in the cache.
    assert _review(subject, name, text, filename) == stock



def test_real_world_mail_parses_and_writes_out_the_same(corpus: Path) -> None:
    files = sorted(p for d in ("mime", "malformed") for p in (corpus / d).rglob("*")
                   if p.is_file() and p.suffix in (".eml", ".txt", ".msg", ""))
    assert len(files) > 50
    compared = 0
    for path in files:
        raw = path.read_bytes()
        outs = []
        for pol in (policy.SMTP, headers.SMTP, headers.SMTP):  # the second: from the cache
            try:
                outs.append(BytesParser(policy=pol).parsebytes(raw).as_bytes(policy=pol))
            except Exception as exc:  # the stdlib itself fails on some broken mail
                outs.append(type(exc).__name__.encode())
        assert outs[0] == outs[1] == outs[2], path.name
        compared += 1
    assert compared == len(files)


def _what_a_reader_sees(msg: object) -> list[object]:
    """Everything the pipeline asks of a parsed message, part by part."""
    seen: list[object] = []
    for part in msg.walk():  # type: ignore[attr-defined]
        seen.append([(k, str(v), type(v).__name__, [type(d).__name__ for d in v.defects])
                     for k, v in part.items()])
        seen.append((part.get_content_type(), part.get_content_disposition(),
                     part.get_filename(), part.get_params(), part.get_content_charset(),
                     part.is_attachment(), part.get_boundary()))
        for name in ("From", "To", "Reply-To", "Subject", "Message-ID", "References",
                     "Auto-Submitted", "Date"):
            value = part.get(name)
            seen.append((name, str(value) if value is not None else None,
                         [str(a) for a in getattr(value, "addresses", ())]))
    return seen


def test_mail_that_arrives_reads_the_same_as_with_the_stdlib_policy(corpus: Path) -> None:
    """Real-world mail, odd and broken: every header, parameter and address the broker
    reads is what ``policy.default`` gives, the first time and from the cache."""
    files = sorted(p for d in ("mime", "malformed", "replies", "bounces")
                   for p in (corpus / d).rglob("*")
                   if p.is_file() and p.suffix in (".eml", ".txt", ".msg", ""))
    assert len(files) > 50
    for path in files:
        raw = path.read_bytes()
        outs = []
        for pol in (policy.default, headers.INBOUND, headers.INBOUND):
            try:
                outs.append(_what_a_reader_sees(BytesParser(policy=pol).parsebytes(raw)))
            except Exception as exc:  # the stdlib itself fails on some broken mail
                outs.append([type(exc).__name__])
        assert outs[0] == outs[1] == outs[2], path.name
    assert headers.INBOUND.header_factory is not headers.SMTP.header_factory


def test_only_short_values_are_kept() -> None:
    registry = headers.SMTP.header_factory
    registry.cached.cache_clear()
    headers.SMTP.header_factory("Subject", "x" * headers.CACHE_LONGEST)
    headers.SMTP.header_factory("Subject", "x" * (headers.CACHE_LONGEST + 1))
    assert registry.cached.cache_info().currsize == 1
    first = headers.SMTP.header_factory("To", "dana@home.example")
    assert headers.SMTP.header_factory("To", "dana@home.example") is first


def test_a_folded_header_is_kept_per_folding_setting() -> None:
    subject = "Review needed: Sam's weekly OT note, with a long tail " * 3
    narrow = headers.SMTP.clone(max_line_length=40)
    stock_narrow = policy.SMTP.clone(max_line_length=40)
    header = headers.SMTP.header_factory("Subject", subject[:200])
    for _ in range(2):  # the second time from the header object's own store
        assert headers.SMTP.fold_binary("Subject", header) == \
            policy.SMTP.fold_binary("Subject", policy.SMTP.header_factory("Subject", subject[:200]))
        assert narrow.fold_binary("Subject", header) == \
            stock_narrow.fold_binary("Subject", header)
    assert len(header.__dict__[headers._FOLDED]) == 2


def test_a_names_header_class_is_made_once_and_a_new_mapping_is_seen() -> None:
    """The stdlib makes a new class on every lookup of a header name; the broker's
    registry keeps one per name (bounded) -> and when a class is mapped to a name
    afterwards, the next header of that name is of the new class, not a kept one."""
    registry = headers.CachedHeaderRegistry()
    assert registry["Subject"] is registry["subject"] is registry["SUBJECT"]
    assert registry["X-Note"] is registry["x-note"]
    before = registry("X-Note", "first")
    assert not isinstance(before, Marked)
    registry.map_to_type("x-note", Marked)
    after = registry("X-Note", "first")
    assert isinstance(after, Marked) and str(after) == "first"
    assert issubclass(registry["X-Note"], Marked)
    assert registry._class_for.cache_info().maxsize == headers.CACHE_NAMES
    assert issubclass(registry["Subject"], UnstructuredHeader)


class Marked(UnstructuredHeader):
    """A header class mapped after use (see above)."""
