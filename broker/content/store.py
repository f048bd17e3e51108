"""The one interface through which record content is stored and read.

Everything that is a record's content - raw mail, the parsed document, drafts, every
outbound copy - goes through ContentStore, and nothing else touches those bytes on
disk.

Encryption at rest (DESIGN.md promise 7): every file is sealed by the home's vault
(AES-256-GCM, broker.crypto.vault), and content is addressed by an HMAC-SHA256 of the
plaintext under the vault's reference key, not by a bare SHA-256. Dedupe still works
(same bytes, same reference), but nobody holding the disk or the database can confirm a
guessed document by hashing it. The reference key does not change when content keys
rotate, so references in the database stay valid; `get` checks that the opened bytes
still match their reference (a file swapped for another sealed file is caught).

Files are written to a temporary file, fsync'd and renamed, so a reference that is in
the database always points at complete bytes. Small content written with a session goes
into the content_blobs table instead, in the caller's transaction: no extra flush per
item, and every broker process sharing one PostgreSQL can read it.
"""

from __future__ import annotations

import base64
import functools
import hmac
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Executable, select
from sqlalchemy.orm import Session

from broker.crypto.vault import SealError, Vault, blob_key_id, replace_file
from broker.db.engine import Database
from broker.db.models import ContentBlob

# Content up to this size goes into the database when a session is given.
INLINE_LIMIT = 1024 * 1024


@functools.cache
def _insert_if_absent(dialect: str) -> Executable:
    """INSERT ... ON CONFLICT DO NOTHING in the dialect's words, with bound ``ref`` and
    ``data``: built once, so each put is a cached statement on the session's connection."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(ContentBlob.__table__).on_conflict_do_nothing()


class ContentMissing(Exception):
    """A reference with no bytes behind it: the store was tampered with or lost."""


class ContentCorrupt(SealError):
    """Bytes that open but do not match their reference: swapped or damaged."""


class ContentStore:
    """Files for large content; with a database, small content goes into the
    content_blobs table inside the caller's transaction (pass its session)."""

    def __init__(self, root: Path, vault: Vault, db: Database | None = None,
                 inline_limit: int = INLINE_LIMIT) -> None:
        self.root = root
        self.vault = vault
        self.db = db
        self.inline_limit = inline_limit
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, ref: str) -> Path:
        if len(ref) != 64 or any(c not in "0123456789abcdef" for c in ref):
            raise ValueError(f"not a content reference: {ref!r}")
        return self.root / ref[:2] / ref

    def put(self, data: bytes, session: Session | None = None) -> str:
        """Store ``data``; with a session, small content is added to that transaction
        (it exists exactly when the rows that refer to it commit)."""
        ref = self.vault.ref(data)
        if session is not None and self._inline(data):
            # No look first: content already stored (here, or by another process in its
            # own open transaction) keeps its row, and the one that commits second does
            # not fail its whole batch on the primary key. Sealing small content again
            # costs microseconds; the look cost a query, several per record.
            # On the transaction's connection, not through the ORM: a blob depends on no
            # pending object, so this need not flush them first (every put did, several
            # flushes per record), and no ORM statement is compiled for it.
            sealed = base64.b64encode(self.vault.seal(data)).decode("ascii")
            conn = session.connection()
            conn.execute(_insert_if_absent(conn.dialect.name), {"ref": ref, "data": sealed})
            return ref
        path = self._path(ref)
        if path.exists():
            return ref
        # Written as (header, ciphertext): joining them would copy a 25 MB message once more.
        parts = self.vault.seal_parts(data)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{ref}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            del parts
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return ref

    def _inline(self, data: bytes) -> bool:
        """Whether ``put`` with a session keeps ``data`` in the database (else a file)."""
        return self.db is not None and len(data) <= self.inline_limit

    def put_ahead(self, data: bytes) -> str | None:
        """Store now, outside any transaction, what ``put(data, session)`` would store as
        a file (the later ``put`` finds it there); content that belongs in the database
        is left to that transaction (None). For slow work done before a transaction."""
        return None if self._inline(data) else self.put(data)

    def get(self, ref: str, session: Session | None = None) -> bytes:
        """The plaintext behind ``ref``; SealError (wrong key, tampered) or ContentMissing."""
        try:
            blob = self._path(ref).read_bytes()
        except FileNotFoundError as exc:
            blob = self._from_database(ref, session)
            if blob is None:
                raise ContentMissing(ref) from exc
        data = self.vault.open(blob)
        if not hmac.compare_digest(self.vault.ref(data), ref):
            raise ContentCorrupt(f"content {ref} does not match its reference")
        return data

    def get_many(self, refs: list[str]) -> dict[str, bytes]:
        """``get`` for several references, those in the database read in one query (the
        outbox reads every copy of a round at once). One that cannot be found or opened
        is left out: ``get`` then says why, for that one alone."""
        blobs: dict[str, bytes] = {}
        wanted: list[str] = []
        for ref in dict.fromkeys(refs):
            try:
                blobs[ref] = self._path(ref).read_bytes()
            except FileNotFoundError:
                wanted.append(ref)
        if wanted and self.db is not None:
            with self.db.read_session() as s:
                for ref, value in s.execute(select(ContentBlob.ref, ContentBlob.data)
                                            .where(ContentBlob.ref.in_(wanted))):
                    blobs[ref] = base64.b64decode(value)
        out: dict[str, bytes] = {}
        for ref, blob in blobs.items():
            try:
                data = self.vault.open(blob)
            except SealError:
                continue
            if hmac.compare_digest(self.vault.ref(data), ref):
                out[ref] = data
        return out

    # -- key rotation ------------------------------------------------------------------------

    def files(self) -> Iterator[Path]:
        """Every stored content file (temporary leftovers excluded)."""
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for path in sorted(sub.iterdir()):
                    if not path.name.startswith(".") and path.is_file():
                        yield path

    def key_id_of(self, path: Path) -> bytes | None:
        with open(path, "rb") as f:
            return blob_key_id(f.read(64))

    def reseal(self, path: Path) -> bool:
        """Re-seal one file under the current key (new file, fsync, rename); True if it
        changed. Opening checks the bytes against their reference before anything is
        written, so a damaged file is reported, never re-sealed as if it were good."""
        blob = path.read_bytes()
        if blob_key_id(blob) == self.vault.current.id:
            return False
        data = self.vault.open(blob)
        if not hmac.compare_digest(self.vault.ref(data), path.name):
            raise ContentCorrupt(f"content {path.name} does not match its reference")
        replace_file(path, self.vault.seal(data))
        return True

    def _from_database(self, ref: str, session: Session | None) -> bytes | None:
        if self.db is None:
            return None
        if session is not None:
            row = session.get(ContentBlob, ref)
            value = row.data if row is not None else None
        else:
            # A read: it must not queue behind this process's writers (the outbox reads
            # every copy it sends while the pipeline commits batch after batch).
            with self.db.read_session() as s:
                value = s.scalar(select(ContentBlob.data).where(ContentBlob.ref == ref))
        return base64.b64decode(value) if value is not None else None

    def exists(self, ref: str) -> bool:
        return self._path(ref).exists() or self._from_database(ref, None) is not None
