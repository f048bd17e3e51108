"""OpenPGP for the broker's outbound mail: every message it sends goes through :func:`protect`.

- recipient with a usable key: PGP/MIME encrypted to that key (and to nobody else), signed by
  the broker, with the Subject protected (the outer Subject is ``...``; clients show the
  inner one);
- otherwise: PGP/MIME signed by the broker (multipart/signed), when the home has a key;
- a member with ``require_encryption`` and no usable key gets nothing: :func:`withheld`
  says why, and callers must not queue (``protect`` raises :class:`EncryptionRequired`).

Routing headers, including Message-ID, stay on the outer message, so a resend after a
crash still carries the same Message-ID.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.crypto import pgpmime
from broker.crypto.keys import person_key
from broker.db.models import Person


class EncryptionRequired(Exception):
    """A member who must never receive plaintext has no usable key."""


@dataclass(frozen=True)
class Protected:
    data: bytes
    encrypted: bool
    signed: bool
    fingerprint: str | None = None  # the recipient key encrypted to
    # ``data`` is the message as composed: the outbox signs it before it first sends it.
    sign_on_send: bool = False


def withheld(person: Person | None) -> str | None:
    """Why nothing may be sent to ``person`` (require_encryption, no usable key), or None."""
    if person is None or not person.require_encryption:
        return None
    state = person_key(person.pgp_key, person.pgp_key_revoked)
    return None if state.usable else f"requires encryption and {state.problem}"


def protect(data: bytes, person: Person | None, signer: str | None) -> Protected:
    """The bytes to queue for ``person`` (None: an address that is not on a team).

    A copy that is only to be signed (no usable key to encrypt to) is queued as composed,
    marked ``sign_on_send``, and the outbox signs it (broker.release.sender): the
    signature is the largest part of queueing a message that needs no database, and the
    outbox runs in a process of its own. Encryption stays here, in the transaction: it is
    what decides whether plaintext may be queued at all."""
    state = person_key(person.pgp_key, person.pgp_key_revoked) if person is not None else None
    if state is None or not state.usable:
        if person is not None and person.require_encryption:
            raise EncryptionRequired(f"{person.email} {withheld(person)}")
        if signer is None:
            return Protected(data, False, False)
        return Protected(data, False, True, sign_on_send=True)
    assert state.key is not None
    out = pgpmime.encrypt_bytes(data, signer, [state.key], protect_subject=True)
    return Protected(out, True, signer is not None, state.key.fingerprint)
