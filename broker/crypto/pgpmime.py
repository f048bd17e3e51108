"""PGP/MIME (RFC 3156) and inline PGP over :mod:`broker.crypto.pgp`, with the stdlib email package.

Building (outbound):

- :func:`encrypt_message` turns an :class:`~email.message.EmailMessage` into
  ``multipart/encrypted; protocol="application/pgp-encrypted"`` whose two parts are
  ``application/pgp-encrypted`` ("Version: 1") and ``application/octet-stream`` holding one
  armored OpenPGP message that is signed by the broker and encrypted (RFC 3156 section 6.2,
  combined signing and encryption). The encrypted content is the message's full MIME entity:
  its ``Content-*`` headers and body.
- :func:`sign_message` builds ``multipart/signed; micalg=pgp-sha256;
  protocol="application/pgp-signature"`` (sign only). The signature covers the exact bytes of
  the first part as serialized with CRLF line ends (``policy.SMTP``), after the part was made
  7-bit clean (8bit/binary parts re-encoded as quoted-printable or base64), as RFC 3156
  section 5 requires; the builder checks the serialized result still contains those exact bytes.

Routing headers (From, To, Cc, Date, Message-ID, Reply-To, ...) stay on the outer message,
**including Subject, which therefore travels in clear**. With ``protect_subject=True`` the
routing headers are also copied into the encrypted entity (``protected-headers="v1"``, as
Thunderbird and others read them) and the outer Subject becomes ``...``.

Parsing (inbound): :func:`open_message` takes raw bytes and returns the inner message (outer
routing headers + decrypted/unwrapped entity) with the encryption and signature status. It handles
multipart/encrypted, multipart/signed (also nested inside multipart/encrypted, RFC 3156 6.1),
and inline PGP in a text/plain part (encrypted or signed ``PGP MESSAGE``, cleartext signatures).
multipart/signed is verified from the raw bytes of the message, not a re-serialization.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email import encoders, policy
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser

from broker.crypto import pgp
from broker.crypto.pgp import KeyLike, PGPError, Verified
from broker.mail import headers

__all__ = [
    "Opened", "PGPError", "encrypt_bytes", "encrypt_message", "open_message", "sign_bytes",
    "sign_message",
]

_POLICY = headers.SMTP  # CRLF line ends, header objects made once per text
_PROTECTED = ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID")


def _is_content_header(name: str) -> bool:
    n = name.lower()
    return n.startswith("content-") or n == "mime-version"


def _split(data: bytes) -> tuple[list[tuple[str, str]], EmailMessage]:
    """``data`` parsed once: its routing headers (raw, unparsed) and its MIME entity.

    The entity is the parsed message itself with the routing headers removed: nothing else
    holds it, so no copy is needed. Raw header values are carried over as they arrived,
    which is both exact and cheap (parsing every header into objects, only to write it out
    again, was most of the cost of signing).
    """
    msg = BytesParser(policy=_POLICY).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    routing = [(k, v) for k, v in msg.raw_items() if not _is_content_header(k)]
    for name in {k for k, _ in routing} | {"MIME-Version"}:
        del msg[name]
    if msg.get("Content-Type") is None:
        msg["Content-Type"] = "text/plain; charset=us-ascii"
    return routing, msg


def _seven_bit(entity: EmailMessage) -> None:
    """Re-encode 8bit/binary leaves as quoted-printable (text) or base64 (anything else)."""
    for part in entity.walk():
        if part.is_multipart():
            continue
        cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if cte in ("base64", "quoted-printable"):
            continue  # already 7-bit: decoding it only to look would cost a copy
        payload = part.get_payload(decode=True) or b""
        if cte not in ("8bit", "binary") and payload.isascii():
            continue
        del part["Content-Transfer-Encoding"]
        part.set_payload(payload)
        if part.get_content_maintype() == "text":
            encoders.encode_quopri(part)
        else:
            encoders.encode_base64(part)


def _outer(routing: Iterable[tuple[str, str]], content_type: str) -> EmailMessage:
    outer = EmailMessage(policy=_POLICY)
    for name, value in routing:
        outer.set_raw(name, value)
    outer["MIME-Version"] = "1.0"
    outer["Content-Type"] = content_type
    return outer


def _application(data: str, subtype: str, **kw) -> MIMEPart:
    part = MIMEPart(policy=_POLICY)
    part.set_content(data.encode("ascii"), "application", subtype, cte="7bit", **kw)
    return part


def encrypt_bytes(
    data: bytes,
    signer_private: str | bytes | None,
    recipients: KeyLike | Sequence[KeyLike],
    *,
    protect_subject: bool = False,
) -> bytes:
    """RFC 3156 multipart/encrypted of the message ``data``, signed by ``signer_private`` (if
    given) and encrypted; returns the bytes to send (CRLF line ends)."""
    routing, inner = _split(data)
    if protect_subject:
        inner.set_param("protected-headers", "v1")
        for name in _PROTECTED:
            for key, value in routing:
                if key.lower() == name.lower():
                    inner.set_raw(key, value)
    armored = pgp.sign_and_encrypt(inner.as_bytes(policy=_POLICY), signer_private, recipients)

    if protect_subject:
        routing = [(k, "...") if k.lower() == "subject" else (k, v) for k, v in routing]
    outer = _outer(
        routing, 'multipart/encrypted; protocol="application/pgp-encrypted"'
    )
    version = _application("Version: 1\r\n", "pgp-encrypted")
    version["Content-Description"] = "PGP/MIME version identification"
    body = _application(armored, "octet-stream", disposition="inline", filename="encrypted.asc")
    body["Content-Description"] = "OpenPGP encrypted message"
    outer.set_payload([version, body])
    return outer.as_bytes(policy=_POLICY)


def sign_bytes(data: bytes, signer_private: str | bytes, *,
               created: datetime | None = None) -> bytes:
    """RFC 3156 multipart/signed (sign only, micalg=pgp-sha256) of the message ``data``;
    returns the bytes to send (CRLF line ends).

    The message is serialised once for the signature and once inside the result; the
    signed part is then found in the result and compared, byte for byte, with what was
    signed, so a serialisation that is not stable fails here instead of at the reader.

    ``created``: the signature's time, and a boundary made from what it separates instead
    of a random one: the same message, key and time then give the same bytes (the outbox
    signs a copy again when it tries again, see broker.release.sender).
    """
    routing, inner = _split(data)
    _seven_bit(inner)
    signed = inner.as_bytes(policy=_POLICY)
    signature = pgp.sign_detached(signed, signer_private, created=created)

    content_type = (f'multipart/signed; micalg="{pgp.MICALG}"; '
                    'protocol="application/pgp-signature"')
    boundary: str | None = None  # without ``created``: the generator picks a random one
    if created is not None:
        # "=_" appears in neither quoted-printable nor base64 text, and the digest of the
        # two parts cannot stand inside them: the builder's check below would say so.
        # Written into the header at once (set_boundary would parse it again: an eighth
        # of the cost of signing a copy).
        digest = hashlib.sha256(signed + signature.encode("ascii")).hexdigest()
        boundary = f"=_signed_{digest[:40]}"
        content_type += f'; boundary="{boundary}"'
    outer = _outer(routing, content_type)
    sig = _application(signature, "pgp-signature", filename="signature.asc")
    sig.replace_header("Content-Type", 'application/pgp-signature; name="signature.asc"')
    sig["Content-Description"] = "OpenPGP digital signature"
    outer.set_payload([inner, sig])
    raw = outer.as_bytes(policy=_POLICY)
    if _signed_part_bytes(raw, boundary or outer.get_boundary()) != signed:
        raise PGPError("multipart/signed serialization changed the signed bytes")
    return raw


def encrypt_message(
    msg: EmailMessage,
    signer_private: str | bytes | None,
    recipients: KeyLike | Sequence[KeyLike],
    *,
    protect_subject: bool = False,
) -> EmailMessage:
    """:func:`encrypt_bytes` for a message object (tests and tools; the outbox uses bytes)."""
    raw = encrypt_bytes(msg.as_bytes(policy=_POLICY), signer_private, recipients,
                        protect_subject=protect_subject)
    return _reparse(raw)


def sign_message(msg: EmailMessage, signer_private: str | bytes) -> EmailMessage:
    """:func:`sign_bytes` for a message object (tests and tools; the outbox uses bytes)."""
    return _reparse(sign_bytes(msg.as_bytes(policy=_POLICY), signer_private))


def _reparse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=_POLICY).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@dataclass
class Opened:
    """An incoming message after PGP processing.

    ``message``: the inner message (outer routing headers + decrypted or unwrapped entity; the
    input itself when there was no PGP). ``kind``: ``"pgp/mime"``, ``"inline"`` or ``"plain"``.
    ``signature``: see :class:`broker.crypto.pgp.Verified` (status none/good/bad/unknown_key).
    """

    message: EmailMessage
    kind: str
    encrypted: bool
    signature: Verified

    @property
    def signer_fingerprint(self) -> str | None:
        return self.signature.signer_fingerprint


def _canonical(raw: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", raw)


def _signed_part_bytes(raw: bytes, boundary: str | None) -> bytes:
    """Exact bytes of the first body part of the multipart with ``boundary``, CRLF-canonical."""
    if not boundary:
        raise PGPError("multipart/signed without boundary")
    raw = _canonical(raw)
    delim = b"--" + boundary.encode("ascii", "replace")
    start = _after_first_delimiter(raw, delim)
    if start < 0:
        raise PGPError("multipart/signed: first boundary not found")
    end = raw.find(b"\r\n" + delim, start)
    if end < 0:
        raise PGPError("multipart/signed: closing boundary not found")
    return raw[start:end]


def _after_first_delimiter(raw: bytes, delim: bytes) -> int:
    r"""Where the line after the first delimiter line starts, or -1: the first ``delim`` at
    the start of ``raw`` or of a line, then transport padding (spaces, tabs) and CRLF.
    What ``re.search(rb"(?:^|\r\n)" + re.escape(delim) + rb"[ \t]*\r\n", raw)`` finds,
    without compiling a pattern for every boundary (each one is new: a compile per
    message, a fifth of a millisecond)."""
    at = raw.find(delim)
    while at >= 0:
        if at == 0 or (at >= 2 and raw[at - 2:at] == b"\r\n"):
            end = at + len(delim)
            while end < len(raw) and raw[end] in b" \t":
                end += 1
            if raw.startswith(b"\r\n", end):
                return end + 2
        at = raw.find(delim, at + 1)
    return -1


def _parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(raw)


def _merge_headers(outer: EmailMessage, inner: EmailMessage) -> EmailMessage:
    """Outer routing headers onto ``inner``; protected headers in ``inner`` win."""
    protected = "protected-headers" in {k.lower() for k, _ in inner.get_params() or []}
    present = {k.lower() for k in inner}
    for name, value in outer.items():
        if _is_content_header(name):
            continue
        if name.lower() in present and protected:
            continue
        if name.lower() in present:
            del inner[name]
            present.discard(name.lower())
        inner[name] = value
    return inner


def _verify_signed(
    raw: bytes, part: EmailMessage, verify_with: Sequence[KeyLike]
) -> tuple[EmailMessage, Verified]:
    """Verify a multipart/signed ``part`` whose serialized form is somewhere in ``raw``."""
    subparts = part.get_payload()
    if not isinstance(subparts, list) or len(subparts) != 2:
        raise PGPError("multipart/signed must have exactly two parts")
    signed = _signed_part_bytes(raw, part.get_boundary())
    sig = subparts[1].get_payload(decode=True) or b""
    result = pgp.verify_detached_any(signed, sig, verify_with)
    return _parse(signed), result


def _find_inline(msg: EmailMessage) -> EmailMessage | None:
    for part in msg.walk():
        if part.get_content_type() == "text/plain" and not part.is_attachment():
            text = part.get_payload(decode=True) or b""
            if (
                b"-----BEGIN PGP MESSAGE-----" in text
                or b"-----BEGIN PGP SIGNED MESSAGE-----" in text
            ):
                return part
    return None


def open_message(
    raw: bytes,
    private: str | bytes | None = None,
    verify_with: Iterable[KeyLike] = (),
) -> Opened:
    """Decrypt/verify an incoming message (PGP/MIME or inline PGP). Raises :class:`PGPError`
    when the message is PGP but cannot be decrypted or is malformed; a signature that does not
    verify is reported in ``signature.status``, not raised."""
    keys = list(verify_with)
    outer = _parse(raw)
    ctype = outer.get_content_type()

    if ctype == "multipart/encrypted":
        parts = outer.get_payload()
        if (
            not isinstance(parts, list)
            or len(parts) != 2
            or parts[0].get_content_type() != "application/pgp-encrypted"
        ):
            raise PGPError("malformed multipart/encrypted")
        if private is None:
            raise PGPError("encrypted message and no private key")
        body = parts[1].get_payload(decode=True) or b""
        dec = pgp.decrypt(body, private, keys)
        inner_raw = _canonical(dec.data)
        inner = _parse(inner_raw)
        signature = dec.signature
        if inner.get_content_type() == "multipart/signed":  # RFC 3156 6.1: sign, then encrypt
            inner, signature = _verify_signed(inner_raw, inner, keys)
        return Opened(_merge_headers(outer, inner), "pgp/mime", True, signature)

    if ctype == "multipart/signed":
        inner, signature = _verify_signed(raw, outer, keys)
        return Opened(_merge_headers(outer, inner), "pgp/mime", False, signature)

    part = _find_inline(outer)
    if part is None:
        return Opened(outer, "plain", False, Verified("none"))
    text = part.get_payload(decode=True) or b""
    if b"-----BEGIN PGP SIGNED MESSAGE-----" in text:
        dec = pgp.verify_inline(text, keys)
    else:
        start = text.index(b"-----BEGIN PGP MESSAGE-----")
        dec = pgp.decrypt(text[start:], private, keys)
    result = copy.deepcopy(outer)
    target = _find_inline(result)
    assert target is not None
    target.set_content(dec.data.decode("utf-8", "replace"))
    return Opened(result, "inline", dec.was_encrypted, dec.signature)
