"""The one interface through which record content is stored and read.

Everything that is a record's content - raw mail, the parsed document, drafts, every
outbound copy - goes through ContentStore, and nothing else touches those bytes on
disk. Encryption at rest wraps this class; callers do not change.

Content is addressed by SHA-256, written to a temporary file, fsync'd and renamed, so
a reference that is in the database always points at complete bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class ContentMissing(Exception):
    """A reference with no bytes behind it: the store was tampered with or lost."""


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, ref: str) -> Path:
        if len(ref) != 64 or any(c not in "0123456789abcdef" for c in ref):
            raise ValueError(f"not a content reference: {ref!r}")
        return self.root / ref[:2] / ref

    def put(self, data: bytes) -> str:
        ref = hashlib.sha256(data).hexdigest()
        path = self._path(ref)
        if path.exists():
            return ref
        path.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{ref}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
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

    def get(self, ref: str) -> bytes:
        try:
            return self._path(ref).read_bytes()
        except FileNotFoundError as exc:
            raise ContentMissing(ref) from exc

    def exists(self, ref: str) -> bool:
        return self._path(ref).exists()
