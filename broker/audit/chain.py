"""The hash chain, as pure functions: canonical encoding, hashing, verification.

Each event's hash covers its own fields and the previous event's hash, so changing,
deleting or reordering any row breaks every hash after it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

GENESIS = "0" * 64


@dataclass(frozen=True)
class Event:
    seq: int
    at: str  # ISO 8601 UTC, microseconds
    child: str
    record_id: int | None
    actor: str
    actor_role: str
    action: str
    recipients: tuple[str, ...]
    description: dict
    prev_hash: str


def canonical(event: Event) -> bytes:
    """The exact bytes that are hashed: sorted keys, no spaces, UTF-8."""
    body = {
        "seq": event.seq,
        "at": event.at,
        "child": event.child,
        "record": event.record_id,
        "actor": event.actor,
        "actor_role": event.actor_role,
        "action": event.action,
        "recipients": list(event.recipients),
        "description": event.description,
        "prev_hash": event.prev_hash,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def event_hash(event: Event) -> str:
    return hashlib.sha256(canonical(event)).hexdigest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""


def verify(events: Iterable[tuple[Event, str]], head: tuple[int, str] | None = None) -> Verdict:
    """Walk (event, stored_hash) pairs in seq order. `head` is the stored (seq, hash)
    of the last event, which catches deleting events from the end."""
    prev = GENESIS
    expected_seq = 1
    checked = 0
    for event, stored in events:
        if event.seq != expected_seq:
            return Verdict(False, checked, expected_seq, f"event {expected_seq} is missing")
        if event.prev_hash != prev:
            return Verdict(False, checked, event.seq, "prev_hash does not match the event before")
        if event_hash(event) != stored:
            return Verdict(False, checked, event.seq, "hash does not match the event's content")
        prev = stored
        expected_seq += 1
        checked += 1
    return check_head(checked, prev, head) if head is not None else Verdict(True, checked)


def check_head(checked: int, last_hash: str, head: tuple[int, str]) -> Verdict:
    """The verdict once `checked` events chained up to `last_hash`: the stored head
    (seq, hash) must name that last event, or events were deleted from the end."""
    head_seq, head_hash = head
    if head_seq != checked:
        return Verdict(
            False, checked, checked + 1, f"log ends at {checked} but head says {head_seq}"
        )
    if checked and head_hash != last_hash:
        return Verdict(False, checked, checked, "last hash does not match the head")
    return Verdict(True, checked)


# -- Fast path -------------------------------------------------------------------------
# Verifying a long log spent its time building an Event and a dict per event, parsing
# the stored JSON columns and serialising them again. The functions below write the
# same bytes from the column values; tests/test_audit_fast.py checks them against
# canonical with generated events.

# The encoder canonical uses, built once (json.dumps builds a new one on every call).
encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_QUOTE = json.encoder.encode_basestring  # how that encoder writes a str (ensure_ascii off)


def canonical_parts(
    seq: int,
    at: str,
    child: str,
    record_id: int | None,
    actor: str,
    actor_role: str,
    action: str,
    recipients_json: str,
    description_json: str,
    prev_hash: str,
) -> bytes:
    """canonical() of an event whose recipients and description are given already
    encoded (as `encode` writes them): no Event, no dict, no re-encoding."""
    record = "null" if record_id is None else int.__repr__(record_id)
    return (
        f'{{"action":{_QUOTE(action)},"actor":{_QUOTE(actor)},'
        f'"actor_role":{_QUOTE(actor_role)},"at":{_QUOTE(at)},"child":{_QUOTE(child)},'
        f'"description":{description_json},"prev_hash":{_QUOTE(prev_hash)},'
        f'"recipients":{recipients_json},"record":{record},"seq":{int.__repr__(seq)}}}'
    ).encode()


def compact(text: str) -> str | None:
    """`text` (JSON as json.dumps writes it, default separators) with the spaces after
    its separators removed, or None when that is not safe without parsing: a backslash,
    or a string that itself holds ", " or ": ". Only whitespace outside strings is
    removed, so the result always decodes to exactly what `text` decodes to."""
    if ", " not in text and ": " not in text:
        return text  # e.g. a list of one address: nothing to remove
    if "\\" in text:
        return None
    strings = "".join(text.split('"')[1::2])  # no backslash: every quote delimits a string
    if ", " in strings or ": " in strings:
        return None
    return text.replace(", ", ",").replace(": ", ":")
