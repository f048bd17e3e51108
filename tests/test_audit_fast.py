"""The fast verification path gives exactly the reference verdict: chain.canonical_parts
and chain.compact against chain.canonical (property-based), and verify_log against
chain.verify(iter_events(...)) on logs altered in many ways, sequentially and split over
worker processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, text

from broker.audit import log
from broker.audit.chain import Event, Verdict, canonical, canonical_parts, compact, encode, verify
from broker.audit.log import iter_events, record_event, verify_log
from broker.db.engine import Database
from broker.db.models import AuditHead

# Strings as they may come: separators, quotes, backslashes, control and non-ASCII.
texts = st.lists(
    st.sampled_from([", ", ": ", ",", ":", " ", '"', "\\", "\n", "\t", "{", "]", "é", "a"])
    | st.characters(codec="utf-8"),
    max_size=8,
).map("".join)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
descriptions = st.dictionaries(texts, json_values, max_size=5)


@given(
    seq=st.integers(min_value=1, max_value=2**53),
    at=texts,
    child=texts,
    record_id=st.none() | st.integers(min_value=-(2**40), max_value=2**40),
    actor=texts,
    actor_role=texts,
    action=texts,
    recipients=st.lists(texts, max_size=3),
    description=descriptions,
    prev_hash=texts,
)
def test_canonical_parts_is_canonical(
    seq: int, at: str, child: str, record_id: int | None, actor: str, actor_role: str,
    action: str, recipients: list[str], description: dict, prev_hash: str,
) -> None:
    event = Event(seq, at, child, record_id, actor, actor_role, action, tuple(recipients),
                  description, prev_hash)
    fast = canonical_parts(seq, at, child, record_id, actor, actor_role, action,
                           encode(recipients), encode(description), prev_hash)
    assert fast == canonical(event)


def _same_value(a: str, b: str) -> bool:
    """Decode to exactly the same JSON (1 and 1.0 differ: compare the encodings)."""
    return encode(json.loads(a)) == encode(json.loads(b))


@given(json_values)
def test_compact_never_changes_a_value(value: Any) -> None:
    for stored in (
        json.dumps(value, sort_keys=True, ensure_ascii=False),  # the description column
        json.dumps(value),  # the recipients column
        json.dumps(value, indent=1),
        encode(value),
    ):
        out = compact(stored)
        if out is not None:
            assert _same_value(out, stored)


@given(descriptions)
def test_compact_of_a_stored_description_is_the_canonical_text(value: dict) -> None:
    """Where it applies (no backslash, no separator inside a string) it is canonical's
    own encoding, so the hash matches without decoding."""
    stored = json.dumps(value, sort_keys=True, ensure_ascii=False)
    out = compact(stored)
    strings_hold_separators = any(
        ", " in s or ": " in s for s in _strings(value)
    )
    if "\\" in stored or strings_hold_separators:
        assert out is None or not _needs(stored)
    else:
        assert out == encode(value)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    return []


def _needs(stored: str) -> bool:
    """Compact has work to do (else it hands the text back as it is)."""
    return ", " in stored or ": " in stored


def test_compact_refuses_separators_inside_strings() -> None:
    assert compact('{"a": "x, y"}') is None
    assert compact('{"a": ": x"}') is None
    assert compact('{"a, b": 1}') is None
    assert compact('{"a": "\\"", "b": 1}') is None
    assert compact('{"a": [1, 2], "b": "c"}') == '{"a":[1,2],"b":"c"}'
    assert compact('["dana@home.example"]') == '["dana@home.example"]'


# -- verify_log against the reference -----------------------------------------------

DESCRIPTIONS: list[dict[str, Any]] = [
    {"subject": "Report", "sha256": "ab" * 32, "attachments": ["a.pdf", "b.docx"]},
    {"from": "received", "to": "held", "reasons": ["needs a decision"]},
    {"note": "a,b:c", "n": 1.5},
    {"name": "Zoë Müller", "quote": 'say "hi"', "tab": "\t"},  # backslashes: decoded
    {},
    {"nested": {"b": [1, 2, {"c": None}], "a": True}, "big": 2**60},
    {"note": "commas, colons: inside"},  # compact refuses: decoded
]
RECIPIENTS: list[list[str]] = [
    [], ["dana@home.example"], ["a@x.example", "b@x.example"], ["zoë@x.example"],
]


def _fill(db: Database, n: int) -> None:
    for i in range(n):
        with db.session() as s:
            record_event(
                s, action="delivered" if i % 3 else "held", actor="lee@clinic.example",
                actor_role="provider", child="sam" if i % 2 else "alex",
                record_id=None if i % 5 == 4 else i + 1,
                recipients=RECIPIENTS[i % len(RECIPIENTS)],
                description=DESCRIPTIONS[i % len(DESCRIPTIONS)],
            )


def _reference(db: Database) -> Verdict:
    with db.read_session() as s:
        head = s.execute(select(AuditHead.seq, AuditHead.hash)).one()
        return verify(iter_events(s), head=(head.seq, head.hash))


def _fast(db: Database, workers: int = 1) -> Verdict:
    with db.read_session() as s:
        return verify_log(s, workers=workers)


def _sql(statement: str, **params: Any) -> Callable[[Database], None]:
    def run(db: Database) -> None:
        with db.session() as s:
            s.execute(text(statement), params)

    return run


ALTERATIONS: dict[str, tuple[Callable[[Database], None], int | None]] = {
    "untouched": (lambda db: None, None),
    "description value": (
        _sql("UPDATE audit_events SET description = :d WHERE seq = 5", d='{"to": "held"}'), 5),
    # Compacting this text would give back the original bytes: compact must refuse.
    "separator inside a string": (
        _sql("UPDATE audit_events SET description = :d WHERE seq = 3",
             d='{"n": 1.5, "note": "a, b: c"}'), 3),
    "description same value, other spelling": (
        _sql("UPDATE audit_events SET description = :d WHERE seq = 2",
             d='{"to":"held","reasons":["needs a decision"],"from":"received"}'), None),
    "description not JSON": (
        _sql("UPDATE audit_events SET description = '{oops' WHERE seq = 6"), 6),
    "recipients": (
        _sql("UPDATE audit_events SET recipients = :r WHERE seq = 8",
             r='["someone@elsewhere.example"]'), 8),
    "recipients respelled": (
        _sql("UPDATE audit_events SET recipients = :r WHERE seq = 3",
             r='["a@x.example","b@x.example"]'), None),
    "time": (_sql("UPDATE audit_events SET at = at + INTERVAL '1 second' WHERE seq = 4"), 4),
    "actor": (_sql("UPDATE audit_events SET actor = 'x@y.example' WHERE seq = 9"), 9),
    "record": (_sql("UPDATE audit_events SET record_id = NULL WHERE seq = 1"), 1),
    "child": (_sql("UPDATE audit_events SET child = 'sam' WHERE seq = 11"), 11),
    "deleted middle": (_sql("DELETE FROM audit_events WHERE seq = 7"), 7),
    "deleted first": (_sql("DELETE FROM audit_events WHERE seq = 1"), 1),
    "deleted last": (_sql("DELETE FROM audit_events WHERE seq = 12"), 12),
    "stored hash": (_sql("UPDATE audit_events SET hash = :h WHERE seq = 10", h="0" * 64), 10),
    "prev_hash": (
        _sql("UPDATE audit_events SET prev_hash = :h WHERE seq = 6", h="f" * 64), 6),
    "head": (_sql("UPDATE audit_head SET hash = :h", h="e" * 64), 12),
    "head seq": (_sql("UPDATE audit_head SET seq = 11"), 13),
}


@pytest.mark.parametrize("name", list(ALTERATIONS))
def test_verdict_is_the_reference_verdict(db: Database, name: str) -> None:
    _fill(db, 12)
    alter, bad_seq = ALTERATIONS[name]
    if name == "time" and not db.is_postgres:
        alter = _sql("UPDATE audit_events SET at = datetime(at, '+1 second') WHERE seq = 4")
    alter(db)
    fast = _fast(db)
    assert fast.first_bad_seq == bad_seq, fast
    assert fast.ok == (bad_seq is None)
    if name == "description not JSON":
        # The reference cannot even decode it; verify_log names the event instead.
        with pytest.raises(json.JSONDecodeError):
            _reference(db)
        assert fast.reason == "the event's content cannot be decoded"
    else:
        assert fast == _reference(db)


def test_usual_events_never_take_the_slow_path(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only events compact refuses are decoded (else the shortcut gained nothing)."""
    _fill(db, 12)
    slow: list[int] = []
    reference = log._reference_hash

    def counting(dialect: Any, row: Any) -> str:
        slow.append(row[0])
        return reference(dialect, row)

    monkeypatch.setattr(log, "_reference_hash", counting)
    assert _fast(db).ok
    # Descriptions 3 (backslashes) and 6 (separators in a string) at seqs 4, 11 and 7,
    # and the non-ASCII recipient (stored \\u-escaped) at seqs 4, 8 and 12.
    assert sorted(set(slow)) == [4, 7, 8, 11, 12]


@pytest.mark.parametrize("name", ["untouched", "deleted middle", "separator inside a string",
                                  "prev_hash", "deleted last"])
def test_split_over_processes_gives_the_same_verdict(
    db: Database, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Three workers over 12 events: spans 1-4 and 5-8 in other processes, 9- here."""
    monkeypatch.setattr(log, "PARALLEL_MIN", 6)
    _fill(db, 12)
    alter, _ = ALTERATIONS[name]
    alter(db)
    assert _fast(db, workers=3) == _reference(db)


def test_a_session_with_a_transaction_verifies_in_process(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other processes cannot see this transaction's changes: it stays in this one."""
    monkeypatch.setattr(log, "PARALLEL_MIN", 2)
    _fill(db, 4)
    s = db._factory()
    try:
        s.execute(text("UPDATE audit_events SET actor = 'x@y.example' WHERE seq = 1"))
        verdict = verify_log(s, workers=4)
    finally:
        s.rollback()
        s.close()
    assert verdict.first_bad_seq == 1, verdict
