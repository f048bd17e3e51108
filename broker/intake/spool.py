"""Durable on-disk spool for raw inbound mail (design promise 3: nothing accepted is lost).

The SMTP intake answers 250 only after :meth:`Spool.store` returned, and ``store`` returns only
once the message and its envelope are on stable storage. Layout, one flat directory (mode 0700)::

    <id>.eml        raw message bytes exactly as received (written and fsynced first)
    <id>.json       envelope; its atomic appearance is the commit marker
    <id>.json.tmp   envelope being written (never read)

An ``.eml`` without its ``.json`` is a half-written leftover: it was never acknowledged, is never
handed out by :meth:`Spool.pending`, and :meth:`Spool.cleanup_partial` deletes it at start-up.

This module is the single place where message bytes touch the disk, and encryption at rest wraps
them here (:meth:`Spool._seal`, :meth:`Spool._unseal`): with a vault, ``<id>.eml`` holds an
AES-256-GCM blob (broker.crypto.vault), never the message. The parser, which reads a file rather
than bytes (memory), gets the plaintext through :func:`plaintext_file`: an anonymous in-memory
file (memfd), so no plaintext copy is ever written to a disk.

The envelope keeps ``size`` and ``sha256`` of the plaintext message. The hash of a whole mail
(with its Message-ID, Date and MIME boundaries) cannot be guessed and checked, and it is the same
metadata the database keeps for every inbound message and the audit's "received" event (the
hash that proves which mail arrived), so hiding it here alone would protect nothing; it stays,
and still catches damage after opening. The GCM tag authenticates the sealed bytes as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Iterator

    from broker.crypto.vault import Vault

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[0-9]{20}-[0-9a-f]{16}$")
_FILE_MODE = 0o600
_DIR_MODE = 0o700
PARTIAL_MAX_AGE = 60.0  # seconds; younger leftovers may belong to a store still running

CommitMode = Literal["batch", "each"]


def _load_syncfs() -> Any:
    """libc syncfs(2) where it reports write-back errors (Linux >= 5.8), else None.

    Older kernels return success from syncfs even when write-back failed, which would let us
    acknowledge mail that never reached the disk; there we fall back to per-file fsync."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
        if (major, minor) < (5, 8):
            return None
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError, ValueError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


class SpoolCorrupt(Exception):
    """A committed message whose bytes no longer match the recorded sha256 (disk damage)."""


@dataclass(frozen=True)
class Envelope:
    """SMTP envelope facts recorded next to the raw bytes; the pipeline needs them, not parsing."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    peer: str
    helo: str
    received_at: str  # ISO 8601, UTC
    size: int  # bytes of the raw message (plaintext, before any sealing)
    sha256: str  # hex digest of the raw message (plaintext)

    @classmethod
    def for_message(
        cls,
        data: bytes,
        *,
        mail_from: str,
        rcpt_tos: tuple[str, ...] | list[str],
        peer: str,
        helo: str,
        received_at: str | None = None,
    ) -> Envelope:
        """Build the envelope for ``data``, computing size and digest so they cannot be skewed."""
        return cls(
            mail_from=mail_from,
            rcpt_tos=tuple(rcpt_tos),
            peer=peer,
            helo=helo,
            received_at=received_at or utc_now_iso(),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

    def to_json(self) -> str:
        """Serialise deterministically (sorted keys) so the commit marker is easy to diff/audit."""
        d = asdict(self)
        d["rcpt_tos"] = list(self.rcpt_tos)
        return json.dumps(d, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        """Parse what :meth:`to_json` wrote; raise ValueError on anything else."""
        d: Any = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("envelope is not a JSON object")
        try:
            return cls(
                mail_from=str(d["mail_from"]),
                rcpt_tos=tuple(str(r) for r in d["rcpt_tos"]),
                peer=str(d["peer"]),
                helo=str(d["helo"]),
                received_at=str(d["received_at"]),
                size=int(d["size"]),
                sha256=str(d["sha256"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad envelope: {exc!r}") from exc


@dataclass(frozen=True)
class SpoolEntry:
    """A committed message waiting for the pipeline."""

    id: str
    envelope: Envelope
    eml_path: Path


def utc_now_iso() -> str:
    """Receipt time in UTC with microseconds, the format stored in envelopes."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def new_spool_id() -> str:
    """Time-ordered (sorts by arrival) and unique across threads and processes (64 random bits)."""
    return f"{time.time_ns():020d}-{secrets.token_hex(8)}"


@dataclass(eq=False)
class _Job:
    """One store waiting for the batch writer."""

    spool_id: str
    blob: bytes
    meta: bytes
    future: Future[str] = field(default_factory=Future)
    error: BaseException | None = None


class Spool:
    """Crash-safe store of raw messages between SMTP acceptance and the content store.

    ``commit`` chooses how stores reach stable storage; both give the same guarantee (message
    and envelope durable, envelope atomically committed last, before ``store`` returns):

    - ``"batch"`` (default, group commit): one writer thread takes every store waiting at that
      moment, writes their files, flushes them all at once (``syncfs``; per-file fsync where
      syncfs cannot report errors), renames the envelopes into place and fsyncs the directory
      once. Two flushes per batch instead of three per message; fastest in bench/intake.py.
    - ``"each"``: the calling thread does its own three fsyncs (file, envelope, directory).
      Simplest; kept as the reference the batch writer is measured against.

    (A third variant - per-caller file fsyncs with a shared directory fsync - measured slowest
    of the three and was dropped.)
    """

    def __init__(
        self, root: Path, *, commit: CommitMode = "batch", batch_window: float = 0.0,
        vault: Vault | None = None,
    ) -> None:
        if commit not in ("batch", "each"):
            raise ValueError(f"unknown commit mode {commit!r}")
        self.root = Path(root)
        self.commit = commit
        # Seals message bytes at rest; None only for the stand-alone intake (bench, tests).
        self.vault = vault
        # Extra seconds the batch writer waits for company; 0 = batch whatever queued up while
        # the previous flush ran (already a few ms under load, nothing when idle).
        self.batch_window = batch_window
        created = not self.root.exists()
        self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, _DIR_MODE)
        if created:
            _fsync_dir(self.root.parent)
        # Batch writer ("batch"), started on first use.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._closed = False

    # -- the encryption-at-rest seam (issue 3) -------------------------------------------------

    def _seal(self, data: bytes) -> bytes:
        """Turn raw message bytes into what goes on disk: sealed by the vault."""
        return self.vault.seal(data) if self.vault is not None else data

    def _unseal(self, blob: bytes) -> bytes:
        """Inverse of :meth:`_seal`. A message spooled before sealing existed (no vault
        header) is read as it is; the envelope's size and hash still vouch for it."""
        from broker.crypto.vault import is_sealed

        if self.vault is None or not is_sealed(blob):
            return blob
        return self.vault.open(blob)

    def message_files(self) -> list[Path]:
        """Every message file, queued or set aside (for key rotation and status)."""
        out = [self.root / n for n in sorted(os.listdir(self.root)) if n.endswith(".eml")]
        damaged = self.root / "damaged"
        if damaged.is_dir():
            out += [damaged / n for n in sorted(os.listdir(damaged)) if n.endswith(".eml")]
        return out

    def reseal(self, path: Path) -> bool:
        """Re-seal one message file under the current key: new file, fsync, rename.
        True if it changed; a file removed meanwhile (taken in) is skipped."""
        from broker.crypto.vault import blob_key_id, replace_file

        assert self.vault is not None
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return False
        if blob_key_id(blob) == self.vault.current.id:
            return False
        sealed = self._seal(self._unseal(blob))
        if not path.exists():
            return False
        replace_file(path, sealed, _FILE_MODE)
        return True

    # -- writing ---------------------------------------------------------------------------------

    def store(self, data: bytes, envelope: Envelope) -> str:
        """Durably store one message; when this returns, a crash cannot lose it.

        Blocking (waits for disk flushes): call it from a worker thread, never on the event loop.
        Raises OSError (e.g. ENOSPC) and then leaves nothing committed behind.
        """
        if envelope.size != len(data) or envelope.sha256 != hashlib.sha256(data).hexdigest():
            raise ValueError("envelope size/sha256 do not describe the data")
        if self.commit == "batch":
            return self.submit(data, envelope).result()
        spool_id = new_spool_id()
        blob = self._seal(data)
        meta = envelope.to_json().encode("utf-8")
        try:
            self._write_file(self._path(spool_id, ".eml"), blob)
            self._write_file(self._path(spool_id, ".json.tmp"), meta)
            os.rename(self._path(spool_id, ".json.tmp"), self._path(spool_id, ".json"))
            self._fsync_root()
        except BaseException:
            self._discard(spool_id)
            raise
        return spool_id

    def submit(self, data: bytes, envelope: Envelope) -> Future[str]:
        """Batch mode without blocking: hand the message to the writer thread; the
        future resolves with the spool id once it is durable (or with the error).
        Seals on the caller's thread: cheap for ordinary mail, which lets the SMTP
        event loop call this directly and await the future."""
        if self.commit != "batch":
            raise RuntimeError("submit() needs the batch commit mode")
        job = _Job(new_spool_id(), self._seal(data), envelope.to_json().encode("utf-8"))
        self._submit(job)
        return job.future

    def close(self) -> None:
        """Stop the batch writer after it finished what is queued. Idempotent."""
        with self._writer_lock:
            self._closed = True
            writer = self._writer
            if writer is not None:
                self._jobs.put(None)
        if writer is not None:
            writer.join()

    def _submit(self, job: _Job) -> None:
        with self._writer_lock:
            if self._closed:
                raise RuntimeError("spool is closed")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_batches, name="spool-writer", daemon=True
                )
                self._writer.start()
            self._jobs.put(job)

    def _write_batches(self) -> None:
        """Writer thread: commit whatever is queued as one batch, repeatedly."""
        while True:
            first = self._jobs.get()
            if first is None:
                return
            if self.batch_window:
                time.sleep(self.batch_window)
            batch = [first]
            stop = False
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            try:
                self._commit_batch(batch)
            except Exception:  # pragma: no cover - _commit_batch resolves every job itself
                log.exception("spool: batch writer error")
            if stop:
                return

    def _commit_batch(self, batch: list[_Job]) -> None:
        """Write, flush, rename, flush; every job's future ends resolved, with id or error."""
        written: list[_Job] = []
        try:
            for job in batch:
                try:
                    self._write_file(self._path(job.spool_id, ".eml"), job.blob, sync=False)
                    self._write_file(self._path(job.spool_id, ".json.tmp"), job.meta, sync=False)
                    written.append(job)
                except Exception as exc:
                    job.error = exc
                    self._discard(job.spool_id)
            try:
                if written:
                    self._flush_files(written)
                    for job in written:
                        os.rename(
                            self._path(job.spool_id, ".json.tmp"),
                            self._path(job.spool_id, ".json"),
                        )
                    self._fsync_root()
            except Exception as exc:
                for job in written:
                    job.error = exc
                    self._discard(job.spool_id)
        except BaseException as exc:  # never leave a caller waiting forever
            for job in batch:
                job.error = job.error or exc
            raise
        finally:
            for job in batch:
                if job.error is None:
                    job.future.set_result(job.spool_id)
                else:
                    job.future.set_exception(job.error)

    def _flush_files(self, jobs: list[_Job]) -> None:
        """Make the data of the batch's files durable (before any rename commits them)."""
        if _SYNCFS is not None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if _SYNCFS(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            return
        for job in jobs:
            for suffix in (".eml", ".json.tmp"):
                fd = os.open(self._path(job.spool_id, suffix), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def _discard(self, spool_id: str) -> None:
        """Take back an unacknowledged store: commit marker first, then the rest."""
        for suffix in (".json", ".json.tmp", ".eml"):
            with contextlib.suppress(OSError):
                self._path(spool_id, suffix).unlink()

    def _write_file(self, path: Path, blob: bytes, *, sync: bool = True) -> None:
        """Create ``path`` (0600, must not exist), write all of ``blob``, fsync it if asked."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            view = memoryview(blob)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_root(self) -> None:
        """Flush the spool directory itself (new names and renames in it)."""
        _fsync_dir(self.root)

    # -- reading ---------------------------------------------------------------------------------

    def pending(self, limit: int | None = None) -> list[SpoolEntry]:
        """Committed messages in arrival (id) order; uncommitted leftovers are never listed."""
        ids = sorted(
            name[:-5]
            for name in os.listdir(self.root)
            if name.endswith(".json") and _ID_RE.match(name[:-5])
        )
        out: list[SpoolEntry] = []
        for spool_id in ids:
            if limit is not None and len(out) >= limit:
                break
            eml = self._path(spool_id, ".eml")
            try:
                envelope = Envelope.from_json(self._path(spool_id, ".json").read_bytes())
            except FileNotFoundError:
                continue  # removed concurrently
            except ValueError:
                log.error("spool: unreadable envelope for %s, skipped", spool_id)
                continue
            if not eml.exists():
                log.error("spool: %s has an envelope but no message file, skipped", spool_id)
                continue
            out.append(SpoolEntry(id=spool_id, envelope=envelope, eml_path=eml))
        return out

    def entry(self, spool_id: str) -> SpoolEntry | None:
        """One committed message by id (None if it is gone or not committed): lets the
        pipeline follow the intake's notifications without listing the directory."""
        if not _ID_RE.match(spool_id):
            return None
        eml = self._path(spool_id, ".eml")
        try:
            envelope = Envelope.from_json(self._path(spool_id, ".json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return SpoolEntry(id=spool_id, envelope=envelope, eml_path=eml) if eml.exists() else None

    def envelope(self, spool_id: str) -> Envelope:
        """The committed envelope of one message (FileNotFoundError if not committed)."""
        return Envelope.from_json(self._path(spool_id, ".json").read_bytes())

    def read(self, spool_id: str) -> bytes:
        """Raw bytes of a committed message, checked against the recorded sha256."""
        envelope = self.envelope(spool_id)
        data = self._unseal(self._path(spool_id, ".eml").read_bytes())
        if len(data) != envelope.size or hashlib.sha256(data).hexdigest() != envelope.sha256:
            raise SpoolCorrupt(f"spool message {spool_id} does not match its envelope")
        return data

    @contextlib.contextmanager
    def message_file(self, spool_id: str) -> Iterator[Path]:
        """A file path holding the plaintext of a committed message, for parsers that read
        files: the spool file itself when nothing is sealed, else an in-memory copy."""
        if self.vault is None:
            yield self._path(spool_id, ".eml")
            return
        with plaintext_file(self.read(spool_id)) as path:
            yield path

    # -- removal ---------------------------------------------------------------------------------

    def set_aside(self, spool_id: str) -> Path:
        """Move a damaged message out of the queue into ``damaged/`` for the operator:
        envelope first, so it is never pending again, then the bytes."""
        damaged = self.root / "damaged"
        damaged.mkdir(mode=0o700, exist_ok=True)
        for suffix in (".json", ".eml"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._path(spool_id, suffix), damaged / f"{spool_id}{suffix}")
        _fsync_dir(self.root)
        return damaged

    def remove(self, spool_id: str) -> None:
        """Drop a message once the content store has it: marker first, so a crash in between
        leaves only an uncommitted leftover (never a committed message without its bytes)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(spool_id, ".json").unlink()
        with contextlib.suppress(FileNotFoundError):
            self._path(spool_id, ".eml").unlink()

    def cleanup_partial(self, max_age: float = PARTIAL_MAX_AGE) -> int:
        """Delete uncommitted leftovers older than ``max_age`` seconds; returns how many.

        Called at start-up. The age guard spares files of a store that is still running."""
        now = time.time()
        names = set(os.listdir(self.root))
        removed = 0
        for name in names:
            if name.endswith(".eml"):
                spool_id = name[:-4]
                if f"{spool_id}.json" in names:
                    continue
            elif name.endswith(".json.tmp"):
                spool_id = name[:-9]
            else:
                continue
            if not _ID_RE.match(spool_id):
                continue
            path = self.root / name
            try:
                if now - path.stat().st_mtime < max_age:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        if removed:
            log.warning("spool: removed %d uncommitted leftover file(s)", removed)
        return removed

    def _path(self, spool_id: str, suffix: str) -> Path:
        """Path of one spool file; the id check keeps callers from escaping the directory."""
        if not _ID_RE.match(spool_id):
            raise ValueError(f"not a spool id: {spool_id!r}")
        return self.root / f"{spool_id}{suffix}"


@contextlib.contextmanager
def plaintext_file(data: bytes) -> Iterator[Path]:
    """A path to read ``data`` from as a file, backed by memory only (never a disk).

    Linux memfd: the parser gets a real file to read (its lower peak memory) while the
    plaintext of a sealed message never lands in the spool or a temporary directory."""
    fd = os.memfd_create("broker-message", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync a directory so renames/creations in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems refuse fsync on directories; nothing more we can do there.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
