"""SMTP DATA read in bulk into one buffer: the intake's memory for large mail, and its CPU.

aiosmtpd 1.4's DATA keeps every line of a message as an object of its own until the end,
then joins them: a 25 MB attachment in 76-character base64 lines is some 340,000
bytearrays (about twice the message), and the join a third copy, all alive at once. A bare
aiosmtpd sink measured +101 MB of peak memory for a 25.8 MB message (4.1x); issue 7 allows
3x. Here the message is read into one bytearray in bulk, up to the terminator, so the peak
is the buffer and the one ``bytes`` copy handed to the handler (about 2x); and reading in
bulk, not a line at a time, takes a quarter of the intake's CPU per message off.

One thing more: a line longer than the reader's buffer is not kept piece by piece until it
ends (aiosmtpd keeps them all, so a client that never ends its line grows the server
without bound); it is refused whole either way.

Everything else is aiosmtpd's DATA as it is: the same replies in the same cases (503
without RCPT, 501 with an argument, 552 past the size limit, 500 for a line too long, each
only after the terminating dot, the first of them in the order aiosmtpd meets them line by
line), the same dot-unstuffing, the same handler hook. tests/test_smtp_data.py sends the
same bytes to this server and to aiosmtpd's own, whole and in pieces, and compares what
each answered and stored. Only the path the broker runs is replaced (``decode_data``
false, a ``handle_DATA`` hook, the aiosmtpd series this was read from); anything else
goes to aiosmtpd's own DATA.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import aiosmtpd
from aiosmtpd.smtp import SMTP

log = logging.getLogger(__name__)

TERMINATOR = b"\r\n.\r\n"
# Bytes kept past the size limit, so that the line crossing it can still be judged.
KEEP_PAST_LIMIT = 8192
SPLIT_UP_TO = 1024 * 1024  # longest line: split a message up to this size, scan above

# The series whose DATA this follows (aiosmtpd/smtp.py, SMTP.smtp_DATA); another falls back.
FOLLOWS = "1.4."
try:
    from aiosmtpd.smtp import _DataState
except ImportError:  # pragma: no cover - a later aiosmtpd: its own DATA runs
    _DataState = None  # type: ignore[assignment,misc]


_FOLLOWED = _DataState is not None and aiosmtpd.__version__.startswith(FOLLOWS)


def replaced(server: SMTP) -> bool:
    """Whether ``server``'s DATA is gathered here (else aiosmtpd's own runs)."""
    return _FOLLOWED and not server._decode_data and "DATA" in server._handle_hooks


class OneBufferData(SMTP):
    """aiosmtpd's SMTP with DATA gathered into one buffer (see the module docstring)."""

    async def smtp_DATA(self, arg: str) -> None:
        if not replaced(self):
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._gather()
        if content is None:
            self._set_post_data_state()
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _gather(self) -> bytes | None:
        """The message up to the lone dot, unstuffed; None when the reply was an error
        (pushed here, after the dot, as aiosmtpd does).

        Read in bulk, up to the terminator (CRLF, dot, CRLF), not a line at a time: a line
        at a time was a fifth of the intake's CPU (an await and a search per line, some
        130 for 10 KB). The limits are then judged line by line on what arrived, in
        aiosmtpd's order, so the same message gets the same answer."""
        reader = self._reader
        limit = self.data_size_limit
        cap = limit + KEEP_PAST_LIMIT if limit else None
        wire = bytearray()  # the lines as sent (still dot-stuffed), terminator included
        state = _DataState.NOMINAL  # TOO_LONG once a piece proves a line too long
        kept = True  # whether what arrives is still kept (no longer once an error is sure)

        def take(piece: bytes) -> None:
            nonlocal kept, state
            if not kept:
                return
            if len(piece) > self.line_length_limit + 3 and b"\r\n" not in piece:
                # A line longer than the reader's buffer (even if this piece began with
                # the LF of a CRLF and ends with the CR of the next): refused whatever
                # follows, as aiosmtpd refuses it the moment its buffer overruns.
                state, kept = _DataState.TOO_LONG, False
                return
            wire.extend(piece)
            if cap is not None and len(wire) > cap:
                kept = False  # past the size limit: refused whatever follows

        try:
            # The terminator's first CRLF ends the line before it, and at the start there
            # is none in the reader: a byte at a time until the position cannot be part of
            # a terminator begun before it (almost always after the first byte).
            tail = b"\r\n"
            while (pending := _terminator_prefix(tail)) and tail != TERMINATOR:
                byte = await reader.readexactly(1)
                take(byte)
                tail = (pending + byte)[-len(TERMINATOR):]
            while tail != TERMINATOR:
                try:
                    piece = await reader.readuntil(TERMINATOR)
                except asyncio.LimitOverrunError as e:
                    # No terminator in what is buffered: take all but what could begin one.
                    take(await reader.read(e.consumed))
                    continue
                take(piece)
                tail = TERMINATOR
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if kept:
            del wire[-3:]  # the lone dot's line; the CRLF before it ends the last line
        state = _judge(wire, complete=kept, limit=limit,
                       longest=self.line_length_limit, known=state)
        if state == _DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            return None
        if state == _DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            return None
        body = wire
        if body[:1] == b".":
            del body[0]  # RFC 5321 4.5.2: the first line's stuffing
        if b"\r\n." in body:
            body = body.replace(b"\r\n.", b"\r\n")  # ...and every other line's
            wire.clear()
        return bytes(body)


def _terminator_prefix(tail: bytes) -> bytes:
    """The longest end of ``tail`` that begins a terminator (b"" if none)."""
    for n in range(len(TERMINATOR) - 1, 0, -1):
        if tail.endswith(TERMINATOR[:n]):
            return TERMINATOR[:n]
    return b""


def _judge(wire: bytearray, *, complete: bool, limit: int | None, longest: int,
           known: _DataState) -> _DataState:
    """aiosmtpd's verdict on these lines (``wire``: as sent, without the lone dot's line;
    ``complete``: False when only the start of the message was kept): the first of a
    line too long or the size passed, in the order it would have met them."""
    if complete and (not limit or len(wire) <= limit) and _longest_line(wire) + 2 <= longest:
        return _DataState.NOMINAL
    size = 0
    lengths = _line_lengths(wire)  # a refused 25 MB message: no list of its lines
    rest = next(lengths)
    for following in lengths:
        line, rest = rest, following  # rest: a line whose end was not kept (or 0)
        if line > longest:
            return _DataState.TOO_LONG  # longer than the reader's buffer: refused at once
        size += line + 2
        if limit and size > limit:
            return _DataState.TOO_MUCH
        if line + 2 > longest:
            return _DataState.TOO_LONG
    if known != _DataState.NOMINAL or rest > longest:
        return _DataState.TOO_LONG
    return _DataState.TOO_MUCH  # what was not kept was past the size limit


def _longest_line(data: bytearray) -> int:
    """Bytes in the longest line of ``data`` (CRLF-ended lines, CRLF not counted)."""
    if len(data) <= SPLIT_UP_TO:
        return max(map(len, data.split(b"\r\n")))  # a list of lines: faster, when short
    return max(_line_lengths(data))


def _line_lengths(data: bytearray) -> Iterator[int]:
    """The length of each CRLF-ended line of ``data`` (CRLF not counted), then of what
    follows the last CRLF (0 when ``data`` ends with one)."""
    start, find = 0, data.find
    while (end := find(b"\r\n", start)) >= 0:
        yield end - start
        start = end + 2
    yield len(data) - start
