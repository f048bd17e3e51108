"""Give a large message's memory back to the system once it is done with.

glibc serves a block of memory above its "mmap threshold" straight from the kernel and
returns it on free; but when such a block is freed it raises the threshold to that
block's size (up to 32 MB). After the first 25 MB message, every later block of up to
25 MB comes from the process's heap instead, where freed memory mostly stays: peak and
resident memory after large mail grow for nothing. Fixing the threshold (which also stops
that adjustment) keeps large blocks coming from, and going back to, the kernel.

Measured with bench/large_mail.py (one 25.8 MB record among 10 KB ones): the worker's
peak +97/+98 MB (4.0x the message) and 157 MB resident afterwards, against +92 MB (3.8x)
and 103-106 MB with the threshold fixed at 256 KB; the intake 111 MB resident afterwards
against 84-85 MB.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 256 * 1024  # bytes; blocks this large or larger come from mmap
# Fixing the mmap threshold also stops glibc adjusting its trim threshold, which would stay
# at 128 KB: the heap of a busy process would be shrunk and grown again all the time.
# Large blocks no longer live in the heap, so a high trim threshold keeps nothing big.
TRIM_ABOVE = 64 * 1024 * 1024


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at LARGE_BLOCK; True if it was set (False elsewhere:
    another C library, or none that answers to mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE) == 1 and mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK) == 1
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; memory is managed as the C library likes")
    return ok
