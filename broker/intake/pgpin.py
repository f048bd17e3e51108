"""OpenPGP on inbound mail: decrypt what was encrypted to the broker, verify member signatures.

Decrypted plaintext stays in memory: it is parsed from bytes (never written to the spool or
a temporary file) and only the parsed Document reaches the content store.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.message import EmailMessage

from broker.crypto import pgpmime
from broker.crypto.keys import person_key
from broker.crypto.pgp import PGPError
from broker.db.models import Person

_MARK = b"-----BEGIN PGP "


def looks_pgp(raw: bytes, headers: EmailMessage | None = None) -> bool:
    """Cheap test: PGP/MIME content type, or an armored block anywhere in the bytes."""
    if headers is not None:
        ctype = headers.get_content_type()
        if ctype in ("multipart/encrypted", "multipart/signed"):
            return True
    return _MARK in raw


@dataclass(frozen=True)
class InboundPGP:
    """``message``: the opened message as bytes (None when the mail was not PGP at all);
    ``notes``: what the guardians are shown; ``error``: why it could not be opened."""

    message: bytes | None
    notes: tuple[str, ...] = ()
    error: str = ""


def open_record(raw: bytes, private: str | None, sender: Person) -> InboundPGP:
    """Open a member's mail: decrypt with the broker's key, verify with the sender's key."""
    state = person_key(sender.pgp_key, sender.pgp_key_revoked, for_encryption=False)
    keys = [state.key] if state.key is not None else []
    if not looks_pgp(raw):
        return InboundPGP(None, _signature_notes("none", None, (), state.problem, sender))
    try:
        opened = pgpmime.open_message(raw, private, keys)
    except Exception as exc:  # hostile input must end quarantined, never crash the pipeline
        if not isinstance(exc, PGPError):
            return InboundPGP(None, error="OpenPGP mail that could not be opened "
                              f"({type(exc).__name__})")
        if private is None:
            return InboundPGP(None, error="encrypted mail, and this broker has no OpenPGP key "
                              "(`broker key init`)")
        return InboundPGP(None, error=f"OpenPGP mail that could not be opened ({exc})")
    if opened.kind == "plain":
        return InboundPGP(None, _signature_notes("none", None, (), state.problem, sender))
    sig = opened.signature
    notes = list(_signature_notes(sig.status, sig.signer_fingerprint, sig.signer_key_ids,
                                  state.problem, sender))
    if opened.encrypted:
        notes.insert(0, "OpenPGP: the message was encrypted to the broker's key")
    return InboundPGP(opened.message.as_bytes(policy=policy.SMTP), tuple(notes))


def _signature_notes(status: str, fpr: str | None, ids: tuple[str, ...], key_problem: str,
                     sender: Person) -> tuple[str, ...]:
    if status == "good":
        return (f"OpenPGP: signed by {fpr}, good (the sender's registered key)",)
    if status == "bad":
        return ("OpenPGP: bad signature: it does not verify with the sender's registered key "
                "(altered in transit, or forged)",)
    if status == "unknown_key":
        why = (f"; the sender's registered key is not usable: {key_problem}"
               if sender.pgp_key else "; no key is registered for the sender")
        return (f"OpenPGP: signed by an unknown key ({', '.join(ids) or 'no key id'}), "
                f"not verified{why}",)
    if sender.pgp_key:  # unsigned mail from a member who has a key is worth pointing out
        return ("OpenPGP: unsigned (the sender has a registered key but did not sign)",)
    return ("OpenPGP: unsigned",)


def open_reply(raw: bytes, private: str | None) -> EmailMessage | None:
    """A reply encrypted to the broker, decrypted (for reading its commands); else None."""
    if private is None or not looks_pgp(raw):
        return None
    try:
        opened = pgpmime.open_message(raw, private, [])
    except Exception:  # unreadable: the reply is read as it came (and will not parse)
        return None
    return opened.message if opened.encrypted else None
