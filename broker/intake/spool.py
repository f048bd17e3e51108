"""Durable on-disk spool for raw inbound mail (design promise 3: nothing accepted is lost).

The SMTP intake answers 250 only after :meth:`Spool.store` returned, and ``store`` returns only
once the message and its envelope are on stable storage. Layout, one flat directory (mode 0700)::

    <id>.eml        raw message bytes exactly as received (written and fsynced first)
    <id>.json       envelope; its atomic appearance is the commit marker
    <id>.json.tmp   envelope being written (never read)

An ``.eml`` without its ``.json`` is a half-written leftover: it was never acknowledged, is never
handed out by :meth:`Spool.pending`, and :meth:`Spool.cleanup_partial` deletes it at start-up.

This module is the single place where message bytes touch the disk, so that encryption at rest
(issue 3) can wrap them here: see :meth:`Spool._seal` and :meth:`Spool._unseal`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[0-9]{20}-[0-9a-f]{16}$")
_FILE_MODE = 0o600
_DIR_MODE = 0o700
PARTIAL_MAX_AGE = 60.0  # seconds; younger leftovers may belong to a store still running


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


class Spool:
    """Crash-safe store of raw messages between SMTP acceptance and the content store.

    ``group_commit`` (default on) lets concurrent ``store`` calls share one directory fsync:
    each caller writes and fsyncs its own files in its own thread (the filesystem merges those
    concurrent fsyncs into one journal commit), then the first caller to need the directory
    flushed does it for everyone whose rename came before the flush started. Off, every store
    does its own directory fsync. Both give the same guarantee; see bench/intake.py for speed.
    """

    def __init__(self, root: Path, *, group_commit: bool = True) -> None:
        self.root = Path(root)
        self.group_commit = group_commit
        created = not self.root.exists()
        self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, _DIR_MODE)
        if created:
            _fsync_dir(self.root.parent)
        # Leader/follower state for the shared directory fsync (group commit).
        self._cond = threading.Condition()
        self._renamed = 0  # sequence number of the latest rename into the directory
        self._synced = 0  # every rename with sequence <= this is durable
        self._syncing = False
        self._failed: tuple[int, int, OSError] | None = None  # (from_seq, to_seq, error)

    # -- the encryption-at-rest seam (issue 3) -------------------------------------------------

    def _seal(self, data: bytes) -> bytes:
        """Turn raw message bytes into what goes on disk. Identity until issue 3 lands."""
        return data

    def _unseal(self, blob: bytes) -> bytes:
        """Inverse of :meth:`_seal`."""
        return blob

    # -- writing ---------------------------------------------------------------------------------

    def store(self, data: bytes, envelope: Envelope) -> str:
        """Durably store one message; when this returns, a crash cannot lose it.

        Blocking (several fsyncs): call it from a worker thread, never on the event loop.
        Raises OSError (e.g. ENOSPC) and then leaves nothing committed behind.
        """
        if envelope.size != len(data) or envelope.sha256 != hashlib.sha256(data).hexdigest():
            raise ValueError("envelope size/sha256 do not describe the data")
        spool_id = new_spool_id()
        eml = self._path(spool_id, ".eml")
        tmp = self._path(spool_id, ".json.tmp")
        meta = self._path(spool_id, ".json")
        try:
            self._write_file(eml, self._seal(data))
            self._write_file(tmp, envelope.to_json().encode("utf-8"))
            os.rename(tmp, meta)
            self._sync_dir_after_rename()
        except BaseException:
            # Not acknowledged: take the commit marker back out if it got in, then the rest.
            for p in (meta, tmp, eml):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        return spool_id

    def _write_file(self, path: Path, blob: bytes) -> None:
        """Create ``path`` (0600, must not exist), write all of ``blob``, fsync it."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            view = memoryview(blob)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_dir_after_rename(self) -> None:
        """Make the directory entries of a just-finished rename durable."""
        if not self.group_commit:
            _fsync_dir(self.root)
            return
        with self._cond:
            self._renamed += 1
            mine = self._renamed
            while self._synced < mine:
                failed = self._failed
                if failed is not None and failed[0] <= mine <= failed[1]:
                    raise failed[2]
                if self._syncing:
                    self._cond.wait()
                    continue
                # Become the leader: one fsync covers every rename numbered up to `upto`.
                self._syncing = True
                start = self._synced + 1
                upto = self._renamed
                self._cond.release()
                err: OSError | None = None
                try:
                    _fsync_dir(self.root)
                except OSError as exc:
                    err = exc
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    if err is None:
                        self._synced = max(self._synced, upto)
                    else:
                        self._failed = (start, upto, err)
                    self._cond.notify_all()

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

    # -- removal ---------------------------------------------------------------------------------

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
