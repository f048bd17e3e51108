"""Review tokens: 160 random bits in lower-case base32 (survives MTAs that lower-case
local parts), stored only as SHA-256, bound to one record and one draft version.

A record has at most one live token: issuing a new one (a preview) supersedes the
old; a decision or an expiry kills it. A token is proof of having seen the request,
not proof of identity: the From address and authentication are checked separately.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from broker.db.models import Record, Token, utcnow

TOKEN_BYTES = 20


def new_token() -> str:
    return base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode("ascii").lower()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().lower().encode("ascii", "replace")).hexdigest()


def issue(s: Session, record: Record, expires_at: dt.datetime, purpose: str = "review",
          *, first: bool = False) -> str:
    """A new live token for ``record``; any other live one is superseded. ``purpose``
    "fyi": the token of an automatic release's FYI copy (its only use is REVOKE).
    ``first``: the record was made in this transaction, so it has no token to supersede
    (the intake then spares the UPDATE, and the flush of everything pending it needs)."""
    if not first:
        close_all(s, record, "superseded")
    token = new_token()
    # Written with the transaction's next flush, like the record's other new rows.
    s.add(Token(record_id=record.id, token_hash=token_hash(token), version=record.version,
                status="live", expires_at=expires_at, purpose=purpose))
    return token


def close_all(s: Session, record: Record, status: str) -> None:
    s.execute(
        update(Token)
        .where(Token.record_id == record.id, Token.status == "live")
        .values(status=status, closed_at=utcnow())
    )


def find(s: Session, token: str) -> Token | None:
    return s.scalar(select(Token).where(Token.token_hash == token_hash(token)))
