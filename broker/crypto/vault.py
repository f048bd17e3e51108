"""Encryption at rest (DESIGN.md promise 7): one vault seals every piece of record content.

A sealed blob is self-describing, so any key of the keyring can open it and rotation can
tell what is left to re-seal::

    magic "BRKS" | version (1 byte) | key id (4 bytes) | nonce (12 bytes) | ciphertext + tag

AES-256-GCM; the 9 header bytes before the nonce are the associated data, so a blob cannot
be relabelled with another key id or version. Database columns hold ``seal_text`` output:
the blob in standard base64, which always starts with ``QlJLU`` (so a legacy plaintext value
is told apart from a sealed one).

Keys come from the keyring file ``<home>/keys/content.key`` (mode 0600, in a 0700 folder),
written by ``broker init``, or from the environment variable ``BROKER_CONTENT_KEY`` for
deployments that keep keys elsewhere. The file::

    # comments
    ref <base64 32 bytes>            key of the content-reference HMAC (never rotates)
    key <base64 32 bytes> <created>  one line per content key, oldest first

The newest (last) key seals; every key opens. The environment variable holds the same keys
as base64, separated by commas or white space, oldest first, optionally with one
``ref:<base64>`` item; without it the reference key is derived (HKDF) from the first key,
exactly as ``broker init`` derives the ``ref`` line of a new file - so a one-key file and
the same key in the environment are interchangeable.

Content references (names in the content store, refs in the database) are an HMAC-SHA256
of the plaintext under the reference key, not a bare SHA-256: dedupe still works, but
nobody holding the disk can confirm a guessed document by hashing it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# What only some uses need (streamed opening, key creation and derivation, warnings) is
# imported where it is used: `broker audit` opens sealed summaries and must start fast
# (issue 7: under 100 ms as a new process), and these imports cost it some 10 ms.


def _warn(message: str, *args: object) -> None:
    import logging

    logging.getLogger(__name__).warning(message, *args)


MAGIC = b"BRKS"
VERSION = 1
KEY_ID_LEN = 4
NONCE_LEN = 12
HEADER_LEN = len(MAGIC) + 1 + KEY_ID_LEN  # authenticated as associated data
TAG_LEN = 16
OVERHEAD = HEADER_LEN + NONCE_LEN + TAG_LEN
PIECE = 1 << 20  # plaintext handed out at a time by Vault.open_pieces
TEXT_PREFIX = "QlJLU"  # base64 of b"BRKS" followed by anything
ENV_VAR = "BROKER_CONTENT_KEY"
KEY_DIR = "keys"
KEY_FILE = "content.key"
_REF_INFO = b"broker content-ref v1"
_ID_INFO = b"broker key-id v1"


class VaultError(Exception):
    """No usable key, or a keyring that cannot be read; the message says what to do."""


class SealError(VaultError):
    """A blob that this keyring cannot open: unknown key, wrong key, or tampered bytes."""


def key_id(key: bytes) -> bytes:
    """The 4-byte id written into every blob sealed with ``key`` (reveals nothing of it)."""
    return hmac.new(key, _ID_INFO, hashlib.sha256).digest()[:KEY_ID_LEN]


def derive_ref_key(key: bytes) -> bytes:
    """The content-reference HMAC key a keyring gets from its first content key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_REF_INFO).derive(key)


def new_key() -> bytes:
    import secrets

    return secrets.token_bytes(32)


@dataclass(frozen=True)
class Key:
    key: bytes
    created: str = ""

    @property
    def id(self) -> bytes:
        return key_id(self.key)

    @property
    def hex_id(self) -> str:
        return self.id.hex()


def blob_key_id(blob: bytes) -> bytes | None:
    """The key id of a sealed blob, or None when ``blob`` is not sealed at all."""
    if len(blob) < OVERHEAD or bytes(blob[: len(MAGIC)]) != MAGIC:
        return None
    return bytes(blob[len(MAGIC) + 1 : HEADER_LEN])


def is_sealed(blob: bytes) -> bool:
    return blob_key_id(blob) is not None


def is_sealed_text(value: str) -> bool:
    return value.startswith(TEXT_PREFIX)


def text_key_id(value: str) -> bytes | None:
    """The key id of a sealed text value (None for legacy plaintext)."""
    if not is_sealed_text(value):
        return None
    try:
        head = base64.b64decode(value[:16], validate=True)
    except (binascii.Error, ValueError):
        return None
    return blob_key_id(head + bytes(OVERHEAD)) if len(head) >= HEADER_LEN else None


class Vault:
    """A keyring: the last key seals, every key opens; plus the content-reference key."""

    def __init__(self, keys: list[Key], ref_key: bytes, source: str = "") -> None:
        if not keys:
            raise VaultError("a keyring needs at least one key")
        for k in keys:
            if len(k.key) != 32:
                raise VaultError("content keys are 32 bytes (AES-256)")
        if len(ref_key) != 32:
            raise VaultError("the reference key is 32 bytes")
        self.keys = list(keys)
        self.ref_key = ref_key
        self.source = source
        self._by_id = {k.id: AESGCM(k.key) for k in keys}
        self._keys_by_id = {k.id: k for k in keys}
        if len(self._by_id) != len(keys):
            raise VaultError("two keys of the keyring share an id; generate another key")
        self._current = keys[-1]
        self._current_aead = self._by_id[self._current.id]

    @classmethod
    def from_keys(cls, keys: list[bytes], ref_key: bytes | None = None,
                  source: str = "") -> Vault:
        if not keys:
            raise VaultError("a keyring needs at least one key")
        return cls([Key(k) for k in keys], ref_key or derive_ref_key(keys[0]), source)

    @property
    def current(self) -> Key:
        return self._current

    @property
    def key_ids(self) -> list[bytes]:
        return [k.id for k in self.keys]

    # -- bytes ---------------------------------------------------------------------------

    def seal(self, data: bytes) -> bytes:
        return b"".join(self.seal_parts(data))

    def seal_parts(self, data: bytes) -> tuple[bytes, bytes]:
        """:meth:`seal`'s bytes as (header and nonce, ciphertext), for writers that can
        write them one after the other: joining them copies the whole ciphertext."""
        header = MAGIC + bytes([VERSION]) + self._current.id
        nonce = os.urandom(NONCE_LEN)
        return header + nonce, self._current_aead.encrypt(nonce, data, header)

    def _check_header(self, blob: bytes) -> bytes:
        """The key id of a sealed blob this keyring can open (SealError saying why not)."""
        kid = blob_key_id(blob)
        if kid is None:
            raise SealError("not sealed content (no vault header): the bytes were replaced "
                            "or were never encrypted")
        if blob[len(MAGIC)] != VERSION:
            raise SealError(f"sealed with an unknown format version {blob[len(MAGIC)]}")
        if kid not in self._by_id:
            raise SealError(
                f"sealed with key {kid.hex()}, which is not in this keyring "
                f"({', '.join(k.hex_id for k in self.keys)}; keys from {self.source or '?'}): "
                "wrong BROKER_CONTENT_KEY or keys/content.key?")
        return kid

    def open(self, blob: bytes) -> bytes:
        kid = self._check_header(blob)
        aead = self._by_id[kid]
        view = memoryview(blob)  # slices of a view copy nothing (25 MB mail)
        header = bytes(view[:HEADER_LEN])
        nonce = bytes(view[HEADER_LEN : HEADER_LEN + NONCE_LEN])
        try:
            return aead.decrypt(nonce, view[HEADER_LEN + NONCE_LEN :], header)
        except InvalidTag as exc:
            raise SealError(f"sealed content under key {kid.hex()} failed authentication: "
                            "it was altered or damaged") from exc

    def open_pieces(self, f: BinaryIO, length: int, piece: int = PIECE) -> Iterator[bytes]:
        """:meth:`open` of the ``length`` sealed bytes at ``f``'s position, handed out a
        piece of plaintext at a time as it is decrypted: a reader such as the MIME parser
        then never holds the whole message beside its own copy of it (25 MB mail).

        The tag is checked after the last piece. A SealError then (altered or damaged
        bytes) means that everything made from the pieces must be thrown away unused:
        the caller learns of it only at the end, as with any stream."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        start = f.tell()
        head = f.read(HEADER_LEN + NONCE_LEN)
        if length < OVERHEAD or len(head) < HEADER_LEN + NONCE_LEN:
            raise SealError("not sealed content (too short): the bytes were replaced")
        kid = self._check_header(head + bytes(TAG_LEN))
        f.seek(start + length - TAG_LEN)
        tag = f.read(TAG_LEN)
        if len(tag) != TAG_LEN:
            raise SealError("sealed content that ends early: it was cut short")
        f.seek(start + HEADER_LEN + NONCE_LEN)
        decryptor = Cipher(algorithms.AES(self._keys_by_id[kid].key),
                           modes.GCM(head[HEADER_LEN:], tag)).decryptor()
        decryptor.authenticate_additional_data(head[:HEADER_LEN])
        left = length - OVERHEAD
        while left > 0:
            chunk = f.read(min(piece, left))
            if not chunk:
                raise SealError("sealed content that ends early: it was cut short")
            left -= len(chunk)
            yield decryptor.update(chunk)
        try:
            decryptor.finalize()
        except InvalidTag as exc:
            raise SealError(f"sealed content under key {kid.hex()} failed authentication: "
                            "it was altered or damaged") from exc

    # -- text (database columns) ----------------------------------------------------------

    def seal_text(self, text: str) -> str:
        return base64.b64encode(self.seal(text.encode("utf-8"))).decode("ascii")

    def open_text(self, value: str) -> str:
        if not is_sealed_text(value):
            raise SealError("not a sealed value")
        try:
            blob = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SealError("a sealed value that is not valid base64: altered") from exc
        return self.open(blob).decode("utf-8")

    # -- content references ----------------------------------------------------------------

    def ref(self, data: bytes) -> str:
        """The content reference of ``data``: HMAC-SHA256 under the reference key, hex."""
        return hmac.new(self.ref_key, data, hashlib.sha256).hexdigest()


# -- keyring file and environment ---------------------------------------------------------------


def key_path(home: Path) -> Path:
    return home / KEY_DIR / KEY_FILE


def parse_keyring(text: str, source: str) -> Vault:
    keys: list[Key] = []
    ref: bytes | None = None
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if parts[0] == "ref" and len(parts) == 2:
                ref = base64.b64decode(parts[1], validate=True)
                continue
            if parts[0] == "key" and len(parts) in (2, 3):
                keys.append(Key(base64.b64decode(parts[1], validate=True),
                                parts[2] if len(parts) == 3 else ""))
                continue
        except (binascii.Error, ValueError):
            pass
        raise VaultError(f"{source}: line {n} is not `ref <base64>` or `key <base64> [date]`")
    if not keys:
        raise VaultError(f"{source}: no keys in the keyring")
    return Vault(keys, ref or derive_ref_key(keys[0].key), source)


def render_keyring(vault: Vault) -> str:
    lines = [
        "# Content keys of this broker (AES-256-GCM). The last key seals, all keys open.",
        "# Losing this file loses every stored record. Back it up apart from the data,",
        "# and never put it in the same backup as the content, spool and database.",
        f"ref {base64.b64encode(vault.ref_key).decode()}",
    ]
    lines += [f"key {base64.b64encode(k.key).decode()} {k.created}".rstrip()
              for k in vault.keys]
    return "\n".join(lines) + "\n"


def parse_env(value: str) -> Vault:
    keys: list[bytes] = []
    ref: bytes | None = None
    for item in value.replace(",", " ").split():
        try:
            if item.startswith("ref:"):
                ref = base64.b64decode(item[4:], validate=True)
            else:
                keys.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise VaultError(f"{ENV_VAR}: {item[:4]}... is not base64") from exc
    if any(len(k) != 32 for k in keys) or (ref is not None and len(ref) != 32):
        raise VaultError(f"{ENV_VAR}: every key must be 32 bytes, base64-encoded "
                         "(e.g. `head -c32 /dev/urandom | base64`)")
    if not keys:
        raise VaultError(f"{ENV_VAR} is set but holds no key")
    return Vault.from_keys(keys, ref, source=ENV_VAR)


def write_keyring(home: Path, vault: Vault) -> Path:
    """Write the keyring file crash-safely: new file, fsync, rename, fsync the folder."""
    path = key_path(home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, render_keyring(vault).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def create_keyring(home: Path) -> Vault:
    """A new keyring file with one key; refuses to overwrite an existing one."""
    path = key_path(home)
    if path.exists():
        raise VaultError(f"{path} already exists; not replacing content keys")
    key = new_key()
    vault = Vault([Key(key, _today())], derive_ref_key(key), str(path))
    write_keyring(home, vault)
    return vault


def load_vault(home: Path, *, create_if_fresh: bool = False) -> Vault:
    """The keyring of a home: the environment variable if set, else the key file.

    With ``create_if_fresh`` a home without a key file gets one, but only while it holds
    no content at all (a missing key file next to stored content is an error: creating a
    new key would silently make the old content unreadable)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return parse_env(env)
    path = key_path(home)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            _warn("%s is readable by others (mode %o); chmod 600 it", path, mode)
        return parse_keyring(path.read_text(encoding="ascii"), str(path))
    if create_if_fresh and not _holds_content(home):
        _warn("created a new content key in %s; back it up apart from the data", path)
        return create_keyring(home)
    raise VaultError(
        f"no content key: {path} is missing and {ENV_VAR} is not set. Restore the key file "
        f"from its backup (without it the stored records cannot be read)")


def _holds_content(home: Path) -> bool:
    for folder, pattern in ((home / "content", "*/*"), (home / "spool", "*.eml")):
        if folder.is_dir() and any(p for p in folder.glob(pattern) if p.is_file()):
            return True
    return False


def _today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: write a sibling, fsync, rename over, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# -- the database columns ---------------------------------------------------------------------
#
# Sealed columns (broker.db.models.SealedText) find their vault through the database URL:
# whoever opens a home registers its vault for the home's database, so every Database
# object on that URL (the service's, a test's, a CLI command's) seals and opens alike.

_registry: dict[str, Vault] = {}
_registry_lock = threading.Lock()


def register(url: str, vault: Vault) -> None:
    with _registry_lock:
        _registry[url] = vault


def registered(url: str | None) -> Vault:
    vault = _registry.get(url or "")
    if vault is None:
        raise VaultError("no content key is registered for this database: open it through "
                         "broker.runtime.Runtime (or register a vault) before touching "
                         "sealed columns")
    return vault


def open_home_vault(home: Path, database_url: str) -> Vault:
    """The home's keyring, registered for its database (sealed columns find it by URL).
    A fresh home (no content yet) without a key file gets one; see load_vault."""
    vault = load_vault(home, create_if_fresh=True)
    register(database_url, vault)
    return vault
