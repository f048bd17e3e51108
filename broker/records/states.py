"""A record's life (DESIGN.md section 3) as data: the states and the legal arrows."""

from __future__ import annotations

RECEIVED = "received"
HELD = "held"
AWAITING_REVIEW = "awaiting_review"
APPROVED = "approved"
RELEASING = "releasing"
RELEASED = "released"
RELEASE_FAILED = "release_failed"
DENIED = "denied"
EXPIRED = "expired"
QUARANTINED = "quarantined"
# Every queued copy was cancelled (its consent revoked) before any left: nothing was sent.
STOPPED = "stopped"

ALLOWED: dict[str, frozenset[str]] = {
    RECEIVED: frozenset({HELD, QUARANTINED}),
    # held -> approved: released at once under an automatic consent (no review needed).
    HELD: frozenset({AWAITING_REVIEW, APPROVED, DENIED, EXPIRED}),
    # awaiting_review -> awaiting_review is a preview: a new draft, a fresh token.
    AWAITING_REVIEW: frozenset({AWAITING_REVIEW, APPROVED, DENIED, EXPIRED}),
    APPROVED: frozenset({RELEASING}),
    RELEASING: frozenset({RELEASED, RELEASE_FAILED, STOPPED}),
    RELEASED: frozenset(),
    RELEASE_FAILED: frozenset(),
    DENIED: frozenset(),
    EXPIRED: frozenset(),
    QUARANTINED: frozenset(),
    STOPPED: frozenset(),
}

FINAL = frozenset(s for s, nxt in ALLOWED.items() if not nxt)
OPEN = frozenset({HELD, AWAITING_REVIEW})


class IllegalTransition(Exception):
    """A state change the life cycle does not allow: a bug, never silently applied."""


def check(current: str, new: str) -> None:
    if new not in ALLOWED.get(current, frozenset()):
        raise IllegalTransition(f"a record cannot go from {current!r} to {new!r}")
