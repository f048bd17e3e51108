"""The broker's own OpenPGP key pair in its home, and whether a person's key is usable.

The broker's key (Ed25519 signing primary, Cv25519 encryption subkey) lives in
``<home>/keys/broker-private.asc`` (mode 0600) and ``broker-public.asc``. ``broker init``
creates it; ``broker key init`` creates it for a home made before keys existed. A home
without keys still works: outbound mail then goes out unsigned (encrypted where the
recipient has a key) and encrypted inbound mail cannot be read (it is quarantined).

A person's key is stored armored on the Person row with the team file's flags; this
module decides, at the moment of use, whether it is usable (pgpy itself ignores
revocation, so the team file's ``pgp_key_revoked`` and expiry are checked here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from broker.crypto import pgp

KEYS_DIR = "keys"
PRIVATE_NAME = "broker-private.asc"
PUBLIC_NAME = "broker-public.asc"


class KeyFileError(Exception):
    """The broker's key files are missing, unreadable or not a usable key."""


def key_paths(home: Path) -> tuple[Path, Path]:
    folder = Path(home) / KEYS_DIR
    return folder / PRIVATE_NAME, folder / PUBLIC_NAME


def create_broker_key(home: Path, domain: str) -> tuple[Path, Path]:
    """Create the broker's key pair; refuses to overwrite an existing private key."""
    private_path, public_path = key_paths(home)
    if private_path.exists():
        raise KeyFileError(f"{private_path} already exists; not overwriting it")
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private, public = pgp.generate_keypair("Disclosure broker", f"broker@{domain}")
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(private)
        fh.flush()
        os.fsync(fh.fileno())
    public_path.write_text(public, encoding="ascii")
    public_path.chmod(0o644)
    _cache.pop(str(private_path), None)
    return private_path, public_path


_cache: dict[str, tuple[float, str]] = {}


def broker_private_key(home: Path) -> str | None:
    """The broker's armored private key, or None when this home has none (cached by mtime).

    A file that exists but is not a usable private key raises :class:`KeyFileError`:
    failing loudly beats silently sending unsigned mail."""
    private_path, _ = key_paths(home)
    try:
        mtime = private_path.stat().st_mtime
    except FileNotFoundError:
        return None
    cached = _cache.get(str(private_path))
    if cached and cached[0] == mtime:
        return cached[1]
    text = private_path.read_text(encoding="ascii")
    try:
        pgp.load_private_key(text)
    except pgp.PGPError as exc:
        raise KeyFileError(f"{private_path}: {exc}") from None
    _cache[str(private_path)] = (mtime, text)
    return text


def broker_public_key(home: Path) -> str:
    _, public_path = key_paths(home)
    if not public_path.exists():
        raise KeyFileError(f"{public_path} not found: run `broker key init`")
    return public_path.read_text(encoding="ascii")


@dataclass(frozen=True)
class KeyState:
    """A person's key at the moment of use: ``key`` when usable, else ``problem``."""

    key: pgp.PublicKey | None
    problem: str

    @property
    def usable(self) -> bool:
        return self.key is not None


def person_key(armored: str | None, revoked: bool = False, *, for_encryption: bool = True
               ) -> KeyState:
    """Is this registered key usable (to encrypt to, or to verify with)?"""
    if not armored:
        return KeyState(None, "no OpenPGP key is registered")
    if revoked:
        return KeyState(None, "the OpenPGP key is marked revoked in the team file")
    try:
        key = pgp.load_public_key(armored)
    except pgp.PGPError as exc:
        return KeyState(None, f"the OpenPGP key is not usable ({exc})")
    if for_encryption and not key.can_encrypt:
        return KeyState(None, f"the OpenPGP key {key.fingerprint} has no usable encryption key "
                        "(expired or missing)")
    return KeyState(key, "")
