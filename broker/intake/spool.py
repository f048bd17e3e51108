"""Durable on-disk spool for raw inbound mail (design promise 3: nothing accepted is lost).

The SMTP intake answers 250 only after :meth:`Spool.store` returned, and ``store`` returns only
once the message is on stable storage. Layout, one flat directory (mode 0700), one file per
message (creating files is the dearest part of a store, so one and not two)::

    <id>.eml    b"BRKSPOOL1 " + envelope JSON (with the length of what follows) + b"\n"
                + the message bytes (sealed when a vault is given)

A file is committed when it is complete (its length is what its header says) AND it was
flushed before the 250: an incomplete file is a leftover of a store that never answered 250;
:meth:`Spool.pending` never hands it out and :meth:`Spool.cleanup_partial` deletes it.

With ``journal=True`` (what ``broker serve`` uses), small mail stored from the SMTP event
loop does not become a file at once: it is appended to the write-ahead journal in
``journal/`` and flushed there (broker.intake.journal), and :meth:`Spool.materialise`
makes the files later, on the reading side (:meth:`Spool.pending` and :meth:`Spool.entry`
call it). Large mail, mail from the mailbox fetcher, and any store made while no journal
segment is ready go straight to files as before.

This module is the single place where message bytes touch the disk, and encryption at rest wraps
them here (:meth:`Spool._seal`, :meth:`Spool._unseal`): with a vault, ``<id>.eml`` holds an
AES-256-GCM blob (broker.crypto.vault), never the message. The pipeline parses the plaintext
from memory (:meth:`Spool.read`), so no plaintext copy is ever written to a disk.

The envelope keeps ``size`` and ``sha256`` of the plaintext message. The hash of a whole mail
(with its Message-ID, Date and MIME boundaries) cannot be guessed and checked, and it is the same
metadata the database keeps for every inbound message and the audit's "received" event (the
hash that proves which mail arrived), so hiding it here alone would protect nothing; it stays,
and still catches damage after opening. The GCM tag authenticates the sealed bytes as well.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from broker.intake import journal as jnl

if TYPE_CHECKING:
    from broker.crypto.vault import Vault

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[0-9]{20}-[0-9a-f]{16}$")
_FILE_MODE = 0o600
_DIR_MODE = 0o700
PARTIAL_MAX_AGE = 60.0  # seconds; younger leftovers may belong to a store still running
MAGIC = b"BRKSPOOL1 "
MAX_HEADER = 64 * 1024  # an envelope with 100 recipients is a few KB

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

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (built by hand: ``asdict`` deep-copies, and this
        runs on the SMTP event loop for every message)."""
        return {"helo": self.helo, "mail_from": self.mail_from, "peer": self.peer,
                "rcpt_tos": list(self.rcpt_tos), "received_at": self.received_at,
                "sha256": self.sha256, "size": self.size}

    def to_json(self) -> str:
        """Serialise deterministically (sorted keys) so the commit marker is easy to diff/audit."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

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
    # The whole file in pieces: header line, then the (sealed) message. Not joined: for a
    # 25 MB message that would be one more 25 MB copy held while the batch is written.
    chunks: tuple[bytes, ...]
    future: Future[str] = field(default_factory=Future)
    error: BaseException | None = None
    # Set by submit_async: the event loop and its future, settled once per batch and loop.
    waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[str]] | None = None


def _settle(jobs: list[_Job]) -> None:
    """On the event loop: resolve the asyncio futures of one batch's jobs."""
    for job in jobs:
        assert job.waiter is not None
        waiter = job.waiter[1]
        if waiter.done():  # cancelled: the client went away
            continue
        if job.error is None:
            waiter.set_result(job.spool_id)
        else:
            waiter.set_exception(job.error)


def _file_chunks(envelope: Envelope, stored: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """One spool file: the header line (envelope + length of what follows), then the bytes."""
    head = envelope.to_dict()
    head["stored_length"] = sum(len(c) for c in stored)
    line = json.dumps(head, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return (MAGIC + line + b"\n", *stored)


def _file_pieces(f: BinaryIO, length: int, piece: int = 1 << 20) -> Iterator[bytes]:
    """``length`` bytes from ``f``'s position, a piece at a time."""
    while length > 0:
        chunk = f.read(min(piece, length))
        if not chunk:
            return  # cut short: the size check after the last piece says so
        length -= len(chunk)
        yield chunk


def _read_header(path: Path) -> tuple[Envelope, int, int] | None:
    """(envelope, offset of the stored bytes, their length) of a COMPLETE spool file;
    None when the file is gone, incomplete (a store that never answered 250) or foreign."""
    try:
        with open(path, "rb") as f:
            first = f.readline(MAX_HEADER)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
    if not first.startswith(MAGIC) or not first.endswith(b"\n"):
        return None
    try:
        head = json.loads(first[len(MAGIC):])
        length = int(head["stored_length"])
        envelope = Envelope.from_json(first[len(MAGIC):])
    except (ValueError, KeyError, TypeError):
        return None
    if size != len(first) + length:
        return None
    return envelope, len(first), length


class Spool:
    """Crash-safe store of raw messages between SMTP acceptance and the content store.

    ``commit`` chooses how stores reach stable storage; both give the same guarantee (the
    complete file and its name durable before ``store`` returns):

    - ``"batch"`` (default, group commit): one writer thread takes every store waiting at that
      moment, writes their files, flushes them all at once (``syncfs``, which covers the
      directory too; where syncfs cannot report errors, per-file fsyncs and one fsync of the
      directory). Fastest in bench/intake.py.
    - ``"each"``: the calling thread fsyncs its own file and the directory. Simplest; kept as
      the reference the batch writer is measured against.

    (A third variant - per-caller file fsyncs with a shared directory fsync - measured slowest
    of the three and was dropped.)
    """

    def __init__(
        self, root: Path, *, commit: CommitMode = "batch", batch_window: float = 0.0,
        vault: Vault | None = None, journal: bool = False,
        journal_segment: int = jnl.SEGMENT_SIZE,
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
        # Committed messages' entries as pending() last read them: a committed file's
        # envelope never changes, and while a backlog lasts the pipeline lists the spool
        # answers-first every round, which reads every header (some 24 us each).
        self._entries: dict[str, SpoolEntry] = {}
        # The write-ahead journal (broker.intake.journal): small mail stored from the
        # event loop goes there, and materialise() turns it into files. The writer is
        # made on first use, so processes that only read the spool prepare no segments.
        self.journal = journal and commit == "batch"
        self.journal_dir = self.root / "journal"
        self.journal_segment = journal_segment
        self._journal: jnl.JournalWriter | None = None
        self._journal_jobs: list[_Job] = []
        self._materialising = threading.Lock()

    # -- the encryption-at-rest seam (issue 3) -------------------------------------------------

    def _seal(self, data: bytes) -> tuple[bytes, ...]:
        """Turn raw message bytes into what goes on disk, sealed by the vault, in pieces
        to be written one after the other (see Vault.seal_parts)."""
        return self.vault.seal_parts(data) if self.vault is not None else (data,)

    def _unseal(self, blob: bytes) -> bytes:
        """Inverse of :meth:`_seal`. A message spooled before sealing existed (no vault
        header) is read as it is; the envelope's size and hash still vouch for it."""
        from broker.crypto.vault import is_sealed

        if self.vault is None or not is_sealed(blob):
            return bytes(blob)
        return self.vault.open(blob)

    def message_files(self) -> list[Path]:
        """Every message file, queued or set aside (for key rotation and status)."""
        self.materialise()
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
        header = _read_header(path)
        if header is None:
            return False  # gone (taken in) or a leftover that was never acknowledged
        envelope, offset, length = header
        blob = path.read_bytes()[offset:offset + length]
        if blob_key_id(blob) == self.vault.current.id:
            return False
        sealed = self._seal(self._unseal(blob))
        if not path.exists():
            return False
        replace_file(path, b"".join(_file_chunks(envelope, sealed)), _FILE_MODE)
        return True

    def stored_bytes(self, spool_id: str) -> bytes | None:
        """The bytes as they sit on disk after the header (sealed when there is a vault)."""
        return self.stored_bytes_at(self._path(spool_id, ".eml"))

    @staticmethod
    def stored_bytes_at(path: Path) -> bytes | None:
        """:meth:`stored_bytes` of a message file found by :meth:`message_files`."""
        header = _read_header(path)
        if header is None:
            return None
        _, offset, length = header
        return path.read_bytes()[offset:offset + length]

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
        try:
            self._write_file(self._path(spool_id, ".eml"),
                             _file_chunks(envelope, self._seal(data)))
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
        job = _Job(new_spool_id(), _file_chunks(envelope, self._seal(data)))
        self._submit(job)
        return job.future

    def submit_async(self, data: bytes, envelope: Envelope) -> asyncio.Future[str]:
        """:meth:`submit` for the running event loop: an asyncio future, resolved with the
        rest of its batch by one call into the loop. (One wake-up per message, as
        ``asyncio.wrap_future`` does, costs the writer thread a GIL hand-over per message
        while the loop is busy.) Call on the loop's thread."""
        if self.commit != "batch":
            raise RuntimeError("submit_async() needs the batch commit mode")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str] = loop.create_future()
        job = _Job(new_spool_id(), _file_chunks(envelope, self._seal(data)),
                   waiter=(loop, waiter))
        if not self.journal:
            self._submit(job)
            return waiter
        if self._closed:
            raise RuntimeError("spool is closed")
        # Every store that arrives in this turn of the loop shares one journal flush.
        self._journal_jobs.append(job)
        if len(self._journal_jobs) == 1:
            loop.call_soon(self._flush_journal)
        return waiter

    def _flush_journal(self) -> None:
        """On the event loop: append the waiting stores to the journal and flush it
        (about 0.2 ms here, shorter than handing them to a thread and back); without a
        segment ready, the batch writer stores them as files instead."""
        batch, self._journal_jobs = self._journal_jobs, []
        try:
            if self._closed:
                raise RuntimeError("spool is closed")
            if self._journal is None:
                self._journal = jnl.JournalWriter(self.journal_dir, self.journal_segment)
            done = self._journal.append(
                [jnl.record_bytes(job.spool_id, job.chunks) for job in batch])
        except Exception as exc:
            for job in batch:
                job.error = exc
            _settle(batch)
            return
        if done:
            for job in batch:
                job.chunks = ()  # a 64 KB message need not wait in memory for the 250
            _settle(batch)
            return
        try:
            for job in batch:
                self._submit(job)
        except Exception as exc:  # closed meanwhile
            for job in batch:
                if job.waiter is not None and not job.waiter[1].done():
                    job.waiter[1].set_exception(exc)

    def close(self) -> None:
        """Stop the batch writer after it finished what is queued. Idempotent."""
        with self._writer_lock:
            self._closed = True
            writer = self._writer
            if writer is not None:
                self._jobs.put(None)
        if writer is not None:
            writer.join()
        if self._journal is not None:
            self._journal.close()

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
            # Not held while waiting for the next store: a 25 MB message's sealed
            # bytes would otherwise stay in memory until more mail arrives.
            first = job = None  # type: ignore[assignment]
            batch.clear()

    def _commit_batch(self, batch: list[_Job]) -> None:
        """Write, flush files, flush the directory; every job's future ends resolved."""
        written: list[_Job] = []
        try:
            for job in batch:
                try:
                    self._write_file(self._path(job.spool_id, ".eml"), job.chunks, sync=False)
                    written.append(job)
                except Exception as exc:
                    job.error = exc
                    self._discard(job.spool_id)
            try:
                if written:
                    self._flush_files(written)
            except Exception as exc:
                for job in written:
                    job.error = exc
                    self._discard(job.spool_id)
        except BaseException as exc:  # never leave a caller waiting forever
            for job in batch:
                job.error = job.error or exc
            raise
        finally:
            loops: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
            for job in batch:
                if job.waiter is not None:
                    loops.setdefault(job.waiter[0], []).append(job)
                elif job.error is None:
                    job.future.set_result(job.spool_id)
                else:
                    job.future.set_exception(job.error)
            for loop, jobs in loops.items():
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, jobs)

    def _flush_files(self, jobs: list[_Job]) -> None:
        """Make the batch's files and their names durable (before any is acknowledged)."""
        self._flush_paths([self._path(job.spool_id, ".eml") for job in jobs])

    def _discard(self, spool_id: str) -> None:
        """Take back an unacknowledged store."""
        with contextlib.suppress(OSError):
            self._path(spool_id, ".eml").unlink()

    def _write_file(self, path: Path, chunks: tuple[bytes, ...], *, sync: bool = True) -> None:
        """Create ``path`` (0600, must not exist), write all ``chunks`` in order, fsync it
        if asked."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
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

    # -- the journal's records become files ------------------------------------------------------

    def materialise(self) -> int:
        """Turn the journal's records into ordinary spool files; how many were made.

        Files first (flushed together), then each segment's position, then the finished
        segments go: a crash anywhere in between makes some records into files again,
        which the pipeline recognises by their spool ids. Safe beside other
        materialisers (a lock) and beside the intake appending to the newest segment."""
        if not self.journal_dir.is_dir():
            return 0
        with self._materialising, jnl.materialise_lock(self.journal_dir):
            found = jnl.segments(self.journal_dir)
            created = 0
            # Every file a record stands for, made now or found complete: one left by a
            # materialiser that died before its flush must be flushed before the
            # position moves past its record.
            files: list[Path] = []
            progress: list[tuple[Path, int, int]] = []  # segment, start, end
            try:
                for segment in found:
                    start = end = jnl.read_position(segment)
                    progress.append((segment, start, end))
                    for spool_id, data, after in jnl.read_records(segment, start):
                        if _ID_RE.match(spool_id):
                            created += self._put_file(spool_id, data)
                            files.append(self._path(spool_id, ".eml"))
                        end = after
                        progress[-1] = (segment, start, end)
            except OSError as exc:  # a full disk: keep what was made, go on next time
                log.warning("spool: could not materialise journal records: %s",
                            exc.strerror or type(exc).__name__)
                found = []  # no segment is finished this time
            if files:
                self._flush_paths(files)
            newest = found[-1] if found else None
            for segment, start, end in progress:
                if segment in found and segment != newest:
                    self._finish_segment(segment, end)
                elif end != start:
                    jnl.write_position(segment, end)
            return created

    def _put_file(self, spool_id: str, data: bytes) -> bool:
        """One record as its spool file; False when that file is already complete."""
        path = self._path(spool_id, ".eml")
        try:
            self._write_file(path, (data,), sync=False)
            return True
        except FileExistsError:
            if _read_header(path) is not None:
                return False
            path.unlink()  # cut short by a crash while materialising: write it again
            self._write_file(path, (data,), sync=False)
            return True
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def _finish_segment(self, segment: Path, end: int) -> None:
        """Delete a finished segment, or set it aside if its records stopped at damage
        rather than at the zeros after the last one."""
        with open(segment, "rb") as f:
            f.seek(end)
            rest = f.read(jnl.HEAD_SIZE)
        if rest.strip(b"\0"):
            log.error("spool: journal segment %s is damaged after offset %d; set aside",
                      segment.name, end)
            damaged = self.root / "damaged"
            damaged.mkdir(mode=_DIR_MODE, exist_ok=True)
            os.replace(segment, damaged / segment.name)
            with contextlib.suppress(FileNotFoundError):
                segment.with_suffix(jnl.POSITION_SUFFIX).unlink()
            return
        jnl.remove_segment(segment)

    def _flush_paths(self, paths: list[Path]) -> None:
        """Make new files in the spool durable, and their names: syncfs writes back every
        dirty inode of the file system, the spool directory's included, and commits its
        journal, so a separate directory fsync would only cost one more device flush.
        Where syncfs cannot report errors: each file's fsync, then the directory's."""
        if _SYNCFS is not None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if _SYNCFS(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            return
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # taken in and removed meanwhile: nothing left to flush
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._fsync_root()

    # -- reading ---------------------------------------------------------------------------------

    def pending(
        self, limit: int | None = None, first: Callable[[Envelope], bool] | None = None,
        keep: Callable[[Envelope], bool] | None = None,
    ) -> list[SpoolEntry]:
        """Committed messages in arrival (id) order; incomplete leftovers are never listed.

        ``first``: messages whose envelope it accepts come before the others (each group
        in arrival order); every header is read then, not just ``limit`` of them.
        ``keep``: only messages whose envelope it accepts are listed (and counted)."""
        self.materialise()
        ids = sorted(
            name[:-4]
            for name in os.listdir(self.root)
            if name.endswith(".eml") and _ID_RE.match(name[:-4])
        )
        out: list[SpoolEntry] = []
        later: list[SpoolEntry] = []
        known = self._entries
        seen: dict[str, SpoolEntry] = {}
        for spool_id in ids:
            if limit is not None and len(out) >= limit:
                break
            entry = known.get(spool_id) or self.entry(spool_id)
            if entry is None:
                continue
            seen[spool_id] = entry
            if keep is not None and not keep(entry.envelope):
                continue
            if first is None or first(entry.envelope):
                out.append(entry)
            else:
                later.append(entry)
        # Only what is still listed stays cached (what was taken in is gone from it).
        listed = {i: known[i] for i in ids if i in known}
        listed.update(seen)
        self._entries = listed
        return (out + later)[:limit]

    def entry(self, spool_id: str, materialise: bool = True) -> SpoolEntry | None:
        """One committed message by id (None if it is gone or incomplete): lets the
        pipeline follow the intake's notifications without listing the directory.
        ``materialise``: False to leave a message still in the journal where it is (None)."""
        if not _ID_RE.match(spool_id):
            return None
        path = self._path(spool_id, ".eml")
        header = _read_header(path)
        if header is None and materialise and self.journal_dir.is_dir():
            # Announced while in the journal.
            self.materialise()
            header = _read_header(path)
        return SpoolEntry(id=spool_id, envelope=header[0], eml_path=path) if header else None

    def envelope(self, spool_id: str) -> Envelope:
        """The envelope of one committed message (FileNotFoundError if there is none)."""
        header = _read_header(self._path(spool_id, ".eml"))
        if header is None:
            raise FileNotFoundError(f"no committed spool message {spool_id}")
        return header[0]

    def read(self, spool_id: str) -> bytes:
        """Raw bytes of a committed message, checked against the recorded sha256."""
        path = self._path(spool_id, ".eml")
        header = _read_header(path)
        if header is None:
            raise FileNotFoundError(f"no committed spool message {spool_id}")
        envelope, offset, length = header
        try:
            # A view, not a slice: a slice of a 25 MB file is one more 25 MB copy.
            data = self._unseal(memoryview(path.read_bytes())[offset:offset + length])
        except Exception as exc:  # a sealed blob that no longer opens: damaged
            raise SpoolCorrupt(f"spool message {spool_id} cannot be opened") from exc
        if len(data) != envelope.size or hashlib.sha256(data).hexdigest() != envelope.sha256:
            raise SpoolCorrupt(f"spool message {spool_id} does not match its envelope")
        return data

    def read_buffer(self, spool_id: str) -> bytearray:
        """:meth:`read`, decrypted a piece at a time into one buffer: the sealed and the
        open bytes of a large message are never both in memory (2x a 25 MB message;
        this way 1x and a piece). A bytearray: the email package, hashing and sealing
        take it as they take bytes."""
        header = _read_header(self._path(spool_id, ".eml"))
        if header is None:
            raise FileNotFoundError(f"no committed spool message {spool_id}")
        size = header[0].size
        buf = bytearray(size)
        pos = 0
        for piece in self.read_pieces(spool_id):
            if pos + len(piece) > size:
                raise SpoolCorrupt(f"spool message {spool_id} does not match its envelope")
            buf[pos:pos + len(piece)] = piece
            pos += len(piece)
        return buf

    def read_pieces(self, spool_id: str) -> Iterator[bytes]:
        """:meth:`read` a piece at a time, for a reader that need not hold a large
        message whole (the MIME parser keeps its own copy). The checks come after the
        last piece, where SpoolCorrupt means: throw away whatever was made of the
        pieces (see Vault.open_pieces)."""
        from broker.crypto.vault import MAGIC as SEALED

        path = self._path(spool_id, ".eml")
        header = _read_header(path)
        if header is None:
            raise FileNotFoundError(f"no committed spool message {spool_id}")
        envelope, offset, length = header
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                sealed = f.read(len(SEALED)) == SEALED
                f.seek(offset)
                if self.vault is not None and sealed:
                    pieces = self.vault.open_pieces(f, length)
                else:  # spooled before sealing existed: read as it is
                    pieces = _file_pieces(f, length)
                for piece in pieces:
                    digest.update(piece)
                    size += len(piece)
                    yield piece
        except FileNotFoundError:
            raise
        except Exception as exc:  # a sealed blob that no longer opens: damaged
            raise SpoolCorrupt(f"spool message {spool_id} cannot be opened") from exc
        if size != envelope.size or digest.hexdigest() != envelope.sha256:
            raise SpoolCorrupt(f"spool message {spool_id} does not match its envelope")

    # -- removal ---------------------------------------------------------------------------------

    def set_aside(self, spool_id: str) -> Path:
        """Move a damaged message out of the queue into ``damaged/`` for the operator."""
        damaged = self.root / "damaged"
        damaged.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self._path(spool_id, ".eml"), damaged / f"{spool_id}.eml")
        _fsync_dir(self.root)
        return damaged

    def remove(self, spool_id: str) -> None:
        """Drop a message once the database has it."""
        with contextlib.suppress(FileNotFoundError):
            self._path(spool_id, ".eml").unlink()

    def cleanup_partial(self, max_age: float = PARTIAL_MAX_AGE) -> int:
        """Delete incomplete leftovers older than ``max_age`` seconds; returns how many.

        Called at start-up. The age guard spares files of a store that is still running."""
        now = time.time()
        removed = 0
        for name in os.listdir(self.root):
            if not (name.endswith(".eml") and _ID_RE.match(name[:-4])):
                continue
            path = self.root / name
            try:
                if now - path.stat().st_mtime < max_age or _read_header(path) is not None:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        if removed:
            log.warning("spool: removed %d incomplete leftover file(s)", removed)
        return removed

    def _path(self, spool_id: str, suffix: str) -> Path:
        """Path of one spool file; the id check keeps callers from escaping the directory."""
        if not _ID_RE.match(spool_id):
            raise ValueError(f"not a spool id: {spool_id!r}")
        return self.root / f"{spool_id}{suffix}"


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
