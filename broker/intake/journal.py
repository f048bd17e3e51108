"""The spool's write-ahead journal: how the SMTP intake makes small mail durable cheaply.

Making a new file durable costs a commit of the file system's own journal; the SMTP
event loop cannot wait for that per message, and handing the work to a thread costs a
hand-over of the interpreter lock at every system call while the loop is busy (both
measured: docs/performance.md, section 1). Overwriting blocks of a file that already
exists costs only the data flush (``fdatasync``). So the intake appends each batch of
small messages to a *segment* written full of zeros beforehand, flushes that one file,
and answers 250; the pipeline's side (:meth:`broker.intake.spool.Spool.materialise`)
later turns the records into the spool's ordinary one-file-per-message form, in its own
process, and deletes a segment once everything in it is a file.

Layout, in ``<spool>/journal/`` (mode 0700)::

    <seq>.jnl   a segment: records one after the other, then zeros
    <seq>.pos   how far the materialiser got in that segment (decimal text)
    spare.tmp   the next segment, being written full of zeros by a helper thread
    .lock       held (flock) by whoever materialises

A record is ``MAGIC, spool id (37 ASCII bytes), length (8 bytes), crc32`` then the
bytes of the spool file it stands for (header line and sealed message, as
broker.intake.spool writes them). The crc covers id, length and bytes, so a record cut
by a crash reads as the end of its segment. Only the newest segment is ever written,
and only by the process that created it: a segment with a newer one beside it is
finished, which is how the materialiser knows it may delete it.

A record is durable before its 250; one written but not flushed when the machine fails
may still be found and taken in (the client then sends it again): taken in twice is
kept apart by the spool id in the database, never lost.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"BRKJ"
_HEAD = struct.Struct(">4s37sQI")  # magic, spool id, length of the bytes, crc32
HEAD_SIZE = _HEAD.size
SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENT_SUFFIX = ".jnl"
POSITION_SUFFIX = ".pos"
SPARE_NAME = "spare.tmp"
LOCK_NAME = ".lock"
_SEGMENT_RE = re.compile(r"^[0-9]{20}\.jnl$")
_ZEROS = bytes(1024 * 1024)
MIN_FREE = 64 * 1024 * 1024  # bytes left free beside two segments before preparing one
RETRY_SPARE = 1.0  # seconds between attempts to prepare a segment after one failed
_fdatasync = getattr(os, "fdatasync", os.fsync)


def _crc(spool_id: bytes, length: int, chunks: tuple[bytes, ...] | list[bytes]) -> int:
    crc = zlib.crc32(spool_id)
    crc = zlib.crc32(length.to_bytes(8, "big"), crc)
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return crc


def record_bytes(spool_id: str, chunks: tuple[bytes, ...]) -> list[bytes]:
    """One record, as pieces to write one after the other (no joined copy)."""
    sid = spool_id.encode("ascii")
    if len(sid) != 37:
        raise ValueError(f"not a spool id: {spool_id!r}")
    length = sum(len(c) for c in chunks)
    return [_HEAD.pack(MAGIC, sid, length, _crc(sid, length, chunks)), *chunks]


def segments(directory: Path) -> list[Path]:
    """Every segment in sequence order (the last is the one being written, if any)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / n for n in sorted(names) if _SEGMENT_RE.match(n)]


def read_records(path: Path, offset: int = 0) -> Iterator[tuple[str, bytes, int]]:
    """(spool id, the spool file's bytes, offset after the record) for each complete
    record from ``offset`` on; stops at the first that is not (zeros, cut, damaged)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        while offset + HEAD_SIZE <= size:
            head = os.pread(fd, HEAD_SIZE, offset)
            if len(head) < HEAD_SIZE:
                return
            magic, sid, length, crc = _HEAD.unpack(head)
            if magic != MAGIC or offset + HEAD_SIZE + length > size:
                return
            data = os.pread(fd, length, offset + HEAD_SIZE)
            if len(data) != length or _crc(sid, length, (data,)) != crc:
                return
            try:
                spool_id = sid.decode("ascii")
            except UnicodeDecodeError:
                return
            offset += HEAD_SIZE + length
            yield spool_id, data, offset
    finally:
        os.close(fd)


def read_position(segment: Path) -> int:
    """Where materialising this segment goes on from (0 when never started)."""
    try:
        return int(segment.with_suffix(POSITION_SUFFIX).read_text("ascii").strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def write_position(segment: Path, offset: int) -> None:
    """Not flushed: a position lost in a crash only means records materialised again,
    which the pipeline recognises by their spool ids."""
    path = segment.with_suffix(POSITION_SUFFIX)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, f"{offset:020d}\n".encode("ascii"), 0)
    finally:
        os.close(fd)


def remove_segment(segment: Path) -> None:
    """A finished segment whose records are all files now (flushed before this)."""
    for path in (segment, segment.with_suffix(POSITION_SUFFIX)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def materialise_lock(directory: Path) -> Iterator[None]:
    """One materialiser at a time, across processes (the worker and, say, key rotation)."""
    import fcntl

    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class JournalWriter:
    """The intake's end: appends batches to the newest segment and flushes them.

    Called from one thread only (the SMTP event loop). :meth:`append` never waits for a
    segment to be prepared: without one ready it returns False and the caller stores the
    batch as files, the way it would without a journal (so a full disk still gives 452).
    """

    def __init__(self, directory: Path, segment_size: int = SEGMENT_SIZE) -> None:
        self.dir = Path(directory)
        self.segment_size = segment_size
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / SPARE_NAME).unlink()  # a leftover of a process that died
        existing = segments(self.dir)
        # Never append to a segment of an earlier process: a new one each start makes
        # the old ones finished, and the materialiser takes them in and deletes them.
        self._seq = int(existing[-1].stem) if existing else 0
        self._fd: int | None = None
        self._offset = 0
        self._spare_lock = threading.Lock()
        self._spare_ready = False
        self._spare_thread: threading.Thread | None = None
        self._spare_failed_at = float("-inf")
        self._closed = False
        self._prepare_spare()

    # -- the spare segment ----------------------------------------------------------------

    def _prepare_spare(self) -> None:
        """Start writing the next segment in a helper thread (unless one is under way)."""
        with self._spare_lock:
            if (self._closed or self._spare_ready or self._spare_thread is not None
                    or time.monotonic() - self._spare_failed_at < RETRY_SPARE):
                return
            self._spare_thread = threading.Thread(
                target=self._write_spare, name="journal-spare", daemon=True)
            self._spare_thread.start()

    def _write_spare(self) -> None:
        path = self.dir / SPARE_NAME
        ok = False
        try:
            # Never fill the disk to find out it is full: the stores that fall back to
            # files (and the pipeline) need that room more than the journal does.
            st = os.statvfs(self.dir)
            if st.f_bavail * st.f_frsize < 2 * self.segment_size + MIN_FREE:
                raise OSError(errno.ENOSPC, "too little free space for a journal segment")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                left = self.segment_size
                while left:
                    left -= os.write(fd, _ZEROS[:min(left, len(_ZEROS))])
                os.fsync(fd)
            finally:
                os.close(fd)
            ok = True
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                log.warning("journal: could not prepare a segment: %s", exc.strerror)
            with contextlib.suppress(OSError):
                path.unlink()
        with self._spare_lock:
            self._spare_thread = None
            self._spare_ready = ok
            if not ok:
                self._spare_failed_at = time.monotonic()

    def _roll(self) -> bool:
        """Make the prepared spare the newest segment. False when none is ready."""
        with self._spare_lock:
            ready, self._spare_ready = self._spare_ready, False
        if not ready:
            self._prepare_spare()
            return False
        self._abandon()
        segment = self.dir / f"{self._seq + 1:020d}{SEGMENT_SUFFIX}"
        try:
            os.rename(self.dir / SPARE_NAME, segment)
            _fsync_dir(self.dir)  # the segment's name must outlive a crash, as its records
            fd = os.open(segment, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("journal: could not start a segment: %s", exc.strerror)
            self._prepare_spare()
            return False
        self._seq += 1
        self._fd, self._offset = fd, 0
        self._prepare_spare()
        return True

    def _abandon(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # -- appending --------------------------------------------------------------------------

    def append(self, records: list[list[bytes]]) -> bool:
        """Write these records (each from :func:`record_bytes`) and flush them: True when
        they are durable, False when no segment had room (nothing was written). Raises
        OSError when writing or flushing failed; the segment is then given up (its
        batch marked void where possible) and the next append starts a new one."""
        if self._closed:
            raise RuntimeError("journal is closed")
        need = sum(len(c) for rec in records for c in rec)
        if need > self.segment_size:
            return False
        full = self._fd is None or self._offset + need > self.segment_size
        if full and not self._roll():
            return False
        assert self._fd is not None
        pieces = [c for rec in records for c in rec]
        start = self._offset
        try:
            written = 0
            while written < need:
                # pwritev takes a bounded number of pieces (IOV_MAX); a batch of
                # small messages stays far below it, the loop covers the rest.
                n = os.pwritev(self._fd, _skip(pieces, written)[:512], start + written)
                if n <= 0:
                    raise OSError(errno.EIO, "short write to the journal")
                written += n
            _fdatasync(self._fd)
        except OSError:
            # Void the batch's first record (best effort: the disk may be failing) so
            # nothing of it is taken in, and never write behind a batch that failed.
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, bytes(HEAD_SIZE), start)
            self._abandon()
            raise
        self._offset = start + need
        return True

    def close(self) -> None:
        """Stop preparing spares; the segment being written stays for the materialiser."""
        with self._spare_lock:
            self._closed = True
            thread = self._spare_thread
        if thread is not None:
            thread.join()
        self._abandon()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / SPARE_NAME).unlink()


def _skip(pieces: list[bytes], n: int) -> list[bytes | memoryview]:
    """``pieces`` without their first ``n`` bytes (after a partial write)."""
    out: list[bytes | memoryview] = []
    for piece in pieces:
        if n >= len(piece):
            n -= len(piece)
            continue
        out.append(memoryview(piece)[n:] if n else piece)
        n = 0
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
