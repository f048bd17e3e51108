"""OpenPGP adapter: the only module of the broker that imports pgpy.

Everything else in the broker talks to OpenPGP through the functions here, over bytes, strings
(ASCII-armored keys, messages and signatures) and the small dataclasses below, so that another
backend (python-gnupg, sequoia, ...) could replace pgpy by rewriting this one file.

Keys: Ed25519 primary key (certify + sign) with a Cv25519 (X25519 ECDH) encryption subkey. pgpy is
fast with these (milliseconds) and very slow with RSA private keys.

Armor (RFC 4880 section 6): pgpy's own armoring computes the CRC-24 bit by bit in Python
(about 1.5 MB/s, i.e. ~1.2 s for a 1 MB release). This module never calls pgpy's ``str()``
or armor parser on message-sized data: it asks pgpy for the binary packets (``bytes(obj)``)
and armors/unarmors them itself with ``binascii`` base64 and :func:`crc24`, which computes the
same CRC as a polynomial remainder over GF(2) on Python big integers (a few ms per MB). pgpy
itself is left unpatched. Keys are small, so they go through pgpy's parser as-is.

Trust decisions pgpy does not make, made here:
- pgpy ignores key revocation: callers pass ``revoked=True`` for a key the team file marks
  revoked, and keys that carry a revocation signature are refused as well;
- expired primary keys and expired encryption subkeys are refused;
- a CRC-24 mismatch in the armor is an error (pgpy only warns).

Every failure surfaces as :class:`PGPError` (never a pgpy exception type).
"""

from __future__ import annotations

import binascii
import functools
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

with warnings.catch_warnings():
    # pgpy 0.6 touches cryptography's deprecated ciphers (TripleDES, CAST5, ...) at import time.
    warnings.simplefilter("ignore")
    import pgpy
    from pgpy.constants import (
        CompressionAlgorithm,
        EllipticCurveOID,
        HashAlgorithm,
        KeyFlags,
        PubKeyAlgorithm,
        SignatureType,
        SymmetricKeyAlgorithm,
    )

__all__ = [
    "Decrypted",
    "PGPError",
    "PublicKey",
    "Verified",
    "armor",
    "crc24",
    "decrypt",
    "generate_keypair",
    "is_armored",
    "load_private_key",
    "load_public_key",
    "sign_and_encrypt",
    "sign_detached",
    "unarmor",
    "verify_detached",
    "verify_inline",
]

# pgpy warns on normal operation ("TODO: Self-sigs verification is not yet working", "Selected
# symmetric algorithm not in key preferences", deprecations from cryptography, ...). The checks
# that matter are made explicitly in this module, so those warnings are only noise in logs.
warnings.filterwarnings("ignore", module=r"pgpy(\..*)?$")

HASH = HashAlgorithm.SHA256
#: value of the ``micalg`` parameter of multipart/signed matching :data:`HASH` (RFC 3156).
MICALG = "pgp-sha256"
CIPHER = SymmetricKeyAlgorithm.AES256
COMPRESSION = CompressionAlgorithm.ZLIB


class PGPError(Exception):
    """Any OpenPGP failure: bad key, refused key, bad armor, failed decryption or integrity."""


# --------------------------------------------------------------------------------------------
# Armor (RFC 4880 section 6) with a fast CRC-24
# --------------------------------------------------------------------------------------------

_CRC24_INIT = 0xB704CE
_CRC24_POLY = 0x1864CFB  # generator 0x864CFB with the x^24 term


def _gf2_mulmod(a: int, b: int) -> int:
    r = 0
    while b:
        if b & 1:
            r ^= a
        b >>= 1
        a <<= 1
        if a & 0x1000000:
            a ^= _CRC24_POLY
    return r


# _XPOW2_BITS[k]: exponents of the set bits of x^(2^k) mod P, for folding at bit 2^k.
_xp = 2  # the polynomial x
_XPOW2_BITS: list[tuple[int, ...]] = []
for _ in range(64):
    _XPOW2_BITS.append(tuple(i for i in range(24) if (_xp >> i) & 1))
    _xp = _gf2_mulmod(_xp, _xp)
del _xp


def crc24(data: bytes | bytearray | memoryview) -> int:
    """OpenPGP CRC-24 (init 0xB704CE, generator 0x864CFB), same value as RFC 4880 6.1's loop.

    The bitwise algorithm computes ``(INIT * x^(8n) + M(x) * x^24) mod P(x)`` over GF(2), where
    ``M(x)`` is the data read as one big-endian polynomial. Here ``M`` is one Python integer and
    the remainder is taken by folding: with ``a = h * x^m + l`` (m a power of two),
    ``a mod P = (h * (x^m mod P) + l) mod P``; multiplying ``h`` by the 24-bit constant is a
    handful of big-integer shifts and XORs, each done in C over the whole number, and every fold
    halves the length. Last, the <=128-bit rest is reduced bit by bit.
    """
    n = len(data)
    a = (_CRC24_INIT << (8 * n)) ^ (int.from_bytes(data, "big") << 24)
    nbits = a.bit_length()
    while nbits > 128:
        k = (nbits - 1).bit_length() - 1  # 2^k < nbits
        m = 1 << k
        h = a >> m
        a &= (1 << m) - 1
        for i in _XPOW2_BITS[k]:
            a ^= h << i
        nbits = a.bit_length()
    while nbits > 24:
        a ^= _CRC24_POLY << (nbits - 25)
        nbits = a.bit_length()
    return a


_LINE = 64  # characters per armor line, as gpg writes them (RFC 4880 allows up to 76)
_BLOCK = _LINE * 3 // 4  # 48 bytes per line


def armor(data: bytes, kind: str = "MESSAGE", headers: Sequence[tuple[str, str]] = ()) -> str:
    """ASCII-armor binary OpenPGP packets: ``-----BEGIN PGP <kind>-----`` ... with checksum."""
    b64 = binascii.b2a_base64(data, newline=False).decode("ascii")
    body = "\n".join(b64[i : i + _LINE] for i in range(0, len(b64), _LINE))
    crc = binascii.b2a_base64(crc24(data).to_bytes(3, "big"), newline=False).decode("ascii")
    head = "".join(f"{k}: {v}\n" for k, v in headers)
    return f"-----BEGIN PGP {kind}-----\n{head}\n{body}\n={crc}\n-----END PGP {kind}-----\n"


_ARMOR_RE = re.compile(
    rb"^-----BEGIN PGP (?P<kind>[A-Z0-9 ,]+)-----[ \t]*\r?\n"
    rb"(?P<headers>(?:[^\r\n]+: [^\r\n]*\r?\n)*)"
    rb"[ \t]*\r?\n"
    rb"(?P<body>[A-Za-z0-9+/=\s]*?)"
    rb"(?:^=(?P<crc>[A-Za-z0-9+/]{4})[ \t]*\r?\n)?"
    rb"^-----END PGP (?P=kind)-----",
    re.MULTILINE,
)


def is_armored(text: str | bytes, kind: str | None = None) -> bool:
    raw = text.encode("latin-1") if isinstance(text, str) else bytes(text)
    m = _ARMOR_RE.search(raw)
    return m is not None and (kind is None or m["kind"].decode() == kind)


def unarmor(text: str | bytes, kind: str | None = None) -> bytes:
    """Decode the first armored block (of ``kind``, if given); the checksum, if present, must match.

    Binary input (not starting with ``-----BEGIN``) is returned as is.
    """
    raw = text.encode("latin-1") if isinstance(text, str) else bytes(text)
    m = _ARMOR_RE.search(raw)
    if m is None:
        if raw[:1] and raw[0] & 0x80:  # an OpenPGP packet tag: already binary
            return raw
        raise PGPError("no ASCII-armored OpenPGP block found")
    if kind is not None and m["kind"].decode() != kind:
        raise PGPError(f"expected PGP {kind}, found PGP {m['kind'].decode()}")
    try:
        data = binascii.a2b_base64(re.sub(rb"\s+", b"", m["body"]), strict_mode=False)
    except binascii.Error as ex:
        raise PGPError(f"bad armor: {ex}") from None
    if m["crc"] is not None:
        want = int.from_bytes(binascii.a2b_base64(m["crc"]), "big")
        if crc24(data) != want:
            raise PGPError("armor checksum (CRC-24) mismatch: the message was altered")
    if not data:
        raise PGPError("empty armored block")
    return data


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKey:
    """A public key that passed :func:`load_public_key`'s checks."""

    armored: str
    fingerprint: str  # 40 upper-case hex digits, no spaces
    user_ids: tuple[str, ...]
    created: datetime
    expires_at: datetime | None
    can_encrypt: bool
    can_sign: bool


KeyLike = str | bytes | PublicKey


def _fpr(fp: object) -> str:
    return str(fp).replace(" ", "").upper()


@functools.lru_cache(maxsize=128)
def _parse_key(armored: str | bytes) -> pgpy.PGPKey:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key, _ = pgpy.PGPKey.from_blob(armored)
    except PGPError:
        raise
    except Exception as ex:
        raise PGPError(f"not a usable OpenPGP key: {ex}") from None
    if not isinstance(key, pgpy.PGPKey) or key.fingerprint is None:
        raise PGPError("not an OpenPGP key")
    return key


def _key_text(key: KeyLike) -> str | bytes:
    return key.armored if isinstance(key, PublicKey) else key


def _flags(key: pgpy.PGPKey) -> set:
    try:
        if key.is_primary:
            return set(key._get_key_flags())
        sig = next(iter(key.self_signatures), None)
        return set(sig.key_flags) if sig is not None else set()
    except Exception:
        return set()


def _sub_expires(sub: pgpy.PGPKey) -> datetime | None:
    sig = next(iter(sub.self_signatures), None)
    exp = getattr(sig, "key_expiration", None) if sig is not None else None
    return sub.created + exp if exp else None


def _expires(key: pgpy.PGPKey) -> datetime | None:
    return key.expires_at if key.is_primary else _sub_expires(key)


def _is_expired(key: pgpy.PGPKey, now: datetime) -> bool:
    exp = _expires(key)
    return exp is not None and exp <= now


_ENCRYPT = {KeyFlags.EncryptCommunications, KeyFlags.EncryptStorage}


def _encryption_key(key: pgpy.PGPKey, now: datetime) -> pgpy.PGPKey | None:
    """The newest valid encryption-capable (sub)key, or None."""
    candidates = [
        sub
        for sub in key.subkeys.values()
        if _flags(sub) & _ENCRYPT
        and not _is_expired(sub, now)
        and not list(sub.revocation_signatures)
    ]
    if candidates:
        return max(candidates, key=lambda s: s.created)
    if _flags(key) & _ENCRYPT:
        return key
    return None


def load_public_key(
    armored: str | bytes, *, revoked: bool = False, now: datetime | None = None
) -> PublicKey:
    """Parse and check a public key from the team file.

    Refused (PGPError): unparseable, a private key, ``revoked`` (the caller's flag: pgpy does not
    evaluate revocations), a key carrying a revocation signature, an expired primary key.
    """
    if revoked:
        raise PGPError("key is marked revoked")
    key = _parse_key(armored)
    if not key.is_public:
        raise PGPError("expected a public key, got a private key")
    now = now or datetime.now(UTC)
    if list(key.revocation_signatures):
        raise PGPError(f"key {_fpr(key.fingerprint)} carries a revocation signature")
    expires = _expires(key)
    if expires is not None and expires <= now:
        raise PGPError(f"key {_fpr(key.fingerprint)} expired at {expires.isoformat()}")
    text = armored.decode("ascii") if isinstance(armored, bytes) else armored
    can_sign = bool(_flags(key) & {KeyFlags.Sign}) or any(
        KeyFlags.Sign in _flags(s) and not _is_expired(s, now) for s in key.subkeys.values()
    )
    return PublicKey(
        armored=text,
        fingerprint=_fpr(key.fingerprint),
        user_ids=tuple(str(u.userid) if hasattr(u, "userid") else str(u) for u in key.userids),
        created=key.created,
        expires_at=expires,
        can_encrypt=_encryption_key(key, now) is not None,
        can_sign=can_sign,
    )


def load_private_key(armored: str | bytes) -> str:
    """Check a private key (unprotected, not expired) and return its fingerprint."""
    key = _private(armored)
    return _fpr(key.fingerprint)


def _private(armored: str | bytes) -> pgpy.PGPKey:
    key, expires = _private_key(armored)
    if expires is not None and expires <= datetime.now(UTC):
        raise PGPError("private key has expired")
    return key


@functools.lru_cache(maxsize=16)
def _private_key(armored: str | bytes) -> tuple[pgpy.PGPKey, datetime | None]:
    """The parsed private key and when it expires: reading the expiry walks the key's
    self-signatures, which cost a fifth of a millisecond on every message signed."""
    key = _parse_key(armored)
    if key.is_public:
        raise PGPError("expected a private key, got a public key")
    if key.is_protected:
        raise PGPError("passphrase-protected private keys are not supported")
    _pin_fingerprint(key)
    return key, _expires(key)


@functools.cache
def _pinned_class(packet_class: type) -> type:
    """A subclass of a key packet class whose fingerprint is the one computed at load."""
    return type(f"Pinned{packet_class.__name__}", (packet_class,),
                {"fingerprint": property(lambda self: self._broker_fingerprint)})


def _pin_fingerprint(key: pgpy.PGPKey) -> None:
    """pgpy hashes the whole key packet again each time it needs the fingerprint, six
    times per signature: 40% of signing an outbound copy. The cached private key never
    changes, so its packet's fingerprint is computed once. Where pgpy's internals are not
    as expected, nothing is changed (signing is then only slower)."""
    packet = getattr(key, "_key", None)
    if packet is None or not isinstance(getattr(type(packet), "fingerprint", None), property):
        return
    fingerprint = packet.fingerprint
    packet._broker_fingerprint = fingerprint
    packet.__class__ = _pinned_class(type(packet))


def _public(key: KeyLike) -> pgpy.PGPKey:
    if isinstance(key, PublicKey):
        return _parse_key(key.armored)
    load_public_key(key)  # run the checks
    return _parse_key(key)


def generate_keypair(name: str, email: str, *, expires: timedelta | None = None) -> tuple[str, str]:
    """A new Ed25519 (certify+sign) / Cv25519 (encrypt) key pair: (private_armored, public_armored).

    The private key is not passphrase-protected: the broker stores it with mode 0600.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key = pgpy.PGPKey.new(PubKeyAlgorithm.EdDSA, EllipticCurveOID.Ed25519)
            uid = pgpy.PGPUID.new(name, email=email)
            key.add_uid(
                uid,
                usage={KeyFlags.Sign, KeyFlags.Certify},
                hashes=[HashAlgorithm.SHA256, HashAlgorithm.SHA512, HashAlgorithm.SHA384],
                ciphers=[SymmetricKeyAlgorithm.AES256, SymmetricKeyAlgorithm.AES128],
                compression=[
                    CompressionAlgorithm.ZLIB,
                    CompressionAlgorithm.ZIP,
                    CompressionAlgorithm.Uncompressed,
                ],
                key_expiration=expires,
            )
            sub = pgpy.PGPKey.new(PubKeyAlgorithm.ECDH, EllipticCurveOID.Curve25519)
            key.add_subkey(
                sub,
                usage={KeyFlags.EncryptCommunications, KeyFlags.EncryptStorage},
                key_expiration=expires,
            )
            return str(key), str(key.pubkey)
    except Exception as ex:
        raise PGPError(f"key generation failed: {ex}") from None


def fingerprint(key: KeyLike) -> str:
    """Fingerprint of a public or private key (no checks)."""
    return _fpr(_parse_key(_key_text(key)).fingerprint)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def _literal(data: bytes, compress: bool) -> pgpy.PGPMessage:
    return pgpy.PGPMessage.new(
        bytes(data),
        format="b",
        compression=COMPRESSION if compress else CompressionAlgorithm.Uncompressed,
    )


def sign_and_encrypt(
    data: bytes,
    signer_private: str | bytes | None,
    recipient_public: KeyLike | Sequence[KeyLike],
    *,
    compress: bool = True,
) -> str:
    """Sign ``data`` with the broker's key (if given), encrypt it to one or more recipients, armor.

    One session key is shared by all recipients (one PKESK packet each). Recipient keys passed
    as strings are checked with :func:`load_public_key` (without the caller's revoked flag:
    call :func:`load_public_key` yourself with it and pass the :class:`PublicKey`).
    """
    recipients = (
        [recipient_public]
        if isinstance(recipient_public, (str, bytes, PublicKey))
        else list(recipient_public)
    )
    if not recipients:
        raise PGPError("no recipient")
    now = datetime.now(UTC)
    enc_keys = []
    for r in recipients:
        sub = _encryption_key(_public(r), now)
        if sub is None:
            raise PGPError(f"key {fingerprint(r)} has no usable encryption key")
        enc_keys.append(sub)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            msg = _literal(data, compress)
            if signer_private is not None:
                msg |= _private(signer_private).sign(msg, hash=HASH)
            session_key = CIPHER.gen_key()
            for sub in enc_keys:
                msg = sub.encrypt(msg, cipher=CIPHER, sessionkey=session_key)
            del session_key
            packets = bytes(msg)
    except PGPError:
        raise
    except Exception as ex:
        raise PGPError(f"encryption failed: {ex}") from None
    return armor(packets, "MESSAGE")


def sign_detached(data: bytes, signer_private: str | bytes,
                  created: datetime | None = None) -> str:
    """An armored detached binary signature (SHA-256) over exactly ``data``.

    ``created``: the signature's creation time (never before the key's own), instead of
    now. The broker's key is Ed25519, whose signatures are deterministic: the same data,
    key and time give the same signature, byte for byte."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key = _private(signer_private)
            when = None if created is None else max(created, key.created)
            sig = key.sign(bytes(data), hash=HASH, created=when)
            return armor(bytes(sig), "SIGNATURE")
    except PGPError:
        raise
    except Exception as ex:
        raise PGPError(f"signing failed: {ex}") from None


def sign_inline(data: bytes, signer_private: str | bytes, *, compress: bool = True) -> str:
    """An armored signed (not encrypted) OpenPGP message containing ``data``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            msg = _literal(data, compress)
            msg |= _private(signer_private).sign(msg, hash=HASH)
            return armor(bytes(msg), "MESSAGE")
    except PGPError:
        raise
    except Exception as ex:
        raise PGPError(f"signing failed: {ex}") from None


@dataclass(frozen=True)
class Verified:
    """Outcome of a signature check.

    ``status``: ``"none"`` (no signature), ``"good"`` (verified by one of the given keys: then
    ``signer_fingerprint`` is that key's primary fingerprint), ``"bad"`` (made by one of the given
    keys, does not verify), ``"unknown_key"`` (signed by a key not among those given).
    """

    status: str
    signer_fingerprint: str | None = None
    signer_key_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decrypted:
    """Plaintext and signature result. Unpacks as ``data, signer_fingerprint = decrypt(...)``."""

    data: bytes
    signer_fingerprint: str | None
    signature: Verified = field(default_factory=lambda: Verified("none"))
    was_encrypted: bool = True

    def __iter__(self) -> Iterator:
        yield self.data
        yield self.signer_fingerprint


def _verify_sigs(subject, sigs: list, verify_with: Iterable[KeyLike]) -> Verified:
    """Check pgpy signatures ``sigs`` over ``subject`` against candidate public keys."""
    if not sigs:
        return Verified("none")
    ids = tuple(sorted({str(s.signer) for s in sigs}))
    bad = False
    for cand in verify_with:
        try:
            key = _public(cand)
        except PGPError:
            continue
        key_ids = {key.fingerprint.keyid} | set(key.subkeys)
        for sig in sigs:
            if sig.signer not in key_ids:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ok = bool(key.verify(subject, sig))
            except Exception:
                ok = False
            if ok:
                return Verified("good", _fpr(key.fingerprint), ids)
            bad = True
    return Verified("bad" if bad else "unknown_key", None, ids)


def _parse_message(armored: str | bytes) -> pgpy.PGPMessage:
    data = unarmor(armored, "MESSAGE")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pgpy.PGPMessage.from_blob(data)
    except Exception as ex:
        raise PGPError(f"malformed OpenPGP message: {ex}") from None


def _contents(msg: pgpy.PGPMessage) -> bytes:
    content = msg.message
    if isinstance(content, str):
        return content.encode("utf-8")
    return bytes(content)


def decrypt(
    armored: str | bytes,
    private: str | bytes | None,
    verify_with: Iterable[KeyLike] = (),
) -> Decrypted:
    """Decrypt (and verify, against ``verify_with``) an armored or binary OpenPGP message.

    A message that is only signed (not encrypted) is accepted too (``was_encrypted=False``).
    Integrity failures (MDC, armor checksum, malformed packets) raise :class:`PGPError`.
    """
    msg = _parse_message(armored)
    was_encrypted = msg.is_encrypted
    if was_encrypted:
        if private is None:
            raise PGPError("message is encrypted and no private key was given")
        key = _private(private)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                msg = key.decrypt(msg)
        except Exception as ex:
            raise PGPError(f"decryption failed: {ex}") from None
    try:
        data = _contents(msg)
        sigs = list(msg.signatures)
    except Exception as ex:
        raise PGPError(f"malformed OpenPGP message: {ex}") from None
    if msg.type != "literal":
        raise PGPError(f"unexpected OpenPGP content ({msg.type})")
    ver = _verify_sigs(msg.message, sigs, verify_with)
    return Decrypted(data, ver.signer_fingerprint, ver, was_encrypted)


def verify_detached(data: bytes, signature_armored: str | bytes, public: KeyLike) -> bool:
    """True iff ``signature_armored`` is a valid signature by ``public`` over exactly ``data``."""
    return verify_detached_any(data, signature_armored, [public]).status == "good"


def verify_detached_any(
    data: bytes, signature_armored: str | bytes, verify_with: Iterable[KeyLike]
) -> Verified:
    """Like :func:`verify_detached`, against several candidate keys, with the full result."""
    raw = unarmor(signature_armored, "SIGNATURE")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = pgpy.PGPSignature.from_blob(raw)
            sigs = [parsed] if isinstance(parsed, pgpy.PGPSignature) else []
    except Exception as ex:
        raise PGPError(f"malformed OpenPGP signature: {ex}") from None
    if not sigs:
        raise PGPError("malformed OpenPGP signature")
    if any(
        s.type not in (SignatureType.BinaryDocument, SignatureType.CanonicalDocument) for s in sigs
    ):
        raise PGPError("not a document signature")
    return _verify_sigs(bytes(data), sigs, verify_with)


def verify_inline(text: str | bytes, verify_with: KeyLike | Iterable[KeyLike]) -> Decrypted:
    """Verify an inline-signed message: a cleartext-signed block (``BEGIN PGP SIGNED MESSAGE``)
    or a signed, not encrypted, ``BEGIN PGP MESSAGE``. Returns the signed data and the result.
    """
    keys = [verify_with] if isinstance(verify_with, (str, bytes, PublicKey)) else list(verify_with)
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if b"-----BEGIN PGP SIGNED MESSAGE-----" in raw:
        start = raw.index(b"-----BEGIN PGP SIGNED MESSAGE-----")
        end = raw.find(b"-----END PGP SIGNATURE-----", start)
        if end < 0:
            raise PGPError("cleartext signature block has no signature")
        block = raw[start : end + len(b"-----END PGP SIGNATURE-----")] + b"\n"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                msg = pgpy.PGPMessage.from_blob(block.decode("utf-8"))
        except Exception as ex:
            raise PGPError(f"malformed cleartext-signed message: {ex}") from None
        data = _contents(msg)
        ver = _verify_sigs(msg.message, list(msg.signatures), keys)
        return Decrypted(data, ver.signer_fingerprint, ver, False)
    msg = _parse_message(raw)
    if msg.is_encrypted:
        raise PGPError("message is encrypted: use decrypt()")
    ver = _verify_sigs(msg.message, list(msg.signatures), keys)
    return Decrypted(_contents(msg), ver.signer_fingerprint, ver, False)


def stock_sign_and_encrypt(data: bytes, signer_private: str, recipient_public: str) -> str:
    """pgpy's stock path (``str(PGPMessage)``, pure-Python CRC-24), for ``bench/pgp.py`` only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msg = _literal(data, True)
        msg |= _private(signer_private).sign(msg, hash=HASH)
        msg = _public(recipient_public).encrypt(msg, cipher=CIPHER)
        return str(msg)


def stock_decrypt(armored: str, private: str, public: str) -> tuple[bytes, bool]:
    """pgpy's stock path (``PGPMessage.from_blob`` on armor), for ``bench/pgp.py`` only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msg = pgpy.PGPMessage.from_blob(armored)
        msg = _private(private).decrypt(msg)
        return _contents(msg), bool(_public(public).verify(msg))
