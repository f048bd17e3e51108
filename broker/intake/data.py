"""SMTP DATA gathered into one buffer as it arrives: the intake's memory for large mail.

aiosmtpd 1.4's DATA keeps every line of a message as an object of its own until the end,
then joins them: a 25 MB attachment in 76-character base64 lines is some 340,000
bytearrays (about twice the message), and the join a third copy, all alive at once. A bare
aiosmtpd sink measured +101 MB of peak memory for a 25.8 MB message (4.1x); issue 7 allows
3x. Here each line is appended to one bytearray as it arrives, so the peak is the buffer
and the one ``bytes`` copy handed to the handler (about 2x).

One thing more: a line longer than the reader's buffer is not kept piece by piece until it
ends (aiosmtpd keeps them all, so a client that never ends its line grows the server
without bound); it is refused whole either way.

Everything else is aiosmtpd's DATA as it is: the same replies in the same cases (503
without RCPT, 501 with an argument, 552 past the size limit, 500 for a line too long, each
only after the terminating dot), the same dot-unstuffing line by line, the same handler
hook. tests/test_smtp_data.py sends the same bytes to this server and to aiosmtpd's own
and compares what each answered and stored. Only the path the broker runs is replaced
(``decode_data`` false, a ``handle_DATA`` hook, the aiosmtpd series this was read from);
anything else goes to aiosmtpd's own DATA.
"""

from __future__ import annotations

import asyncio
import logging

import aiosmtpd
from aiosmtpd.smtp import SMTP

log = logging.getLogger(__name__)

# The series whose DATA this follows (aiosmtpd/smtp.py, SMTP.smtp_DATA); another falls back.
FOLLOWS = "1.4."
try:
    from aiosmtpd.smtp import _DataState
except ImportError:  # pragma: no cover - a later aiosmtpd: its own DATA runs
    _DataState = None  # type: ignore[assignment,misc]


def replaced(server: SMTP) -> bool:
    """Whether ``server``'s DATA is gathered here (else aiosmtpd's own runs)."""
    return (_DataState is not None and aiosmtpd.__version__.startswith(FOLLOWS)
            and not server._decode_data and "DATA" in server._handle_hooks)


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
        (pushed here, after the dot, as aiosmtpd does)."""
        buf = bytearray()
        size = 0
        limit = self.data_size_limit
        # The last read ended inside a line longer than the reader's buffer. aiosmtpd keeps
        # the pieces of such a line until its end, however long (a client that never
        # sends CRLF grows the server without bound); the line is refused whole anyway
        # (500, too long), so only where it ends matters. A line that fits is always one
        # read, so nothing else needs the pieces either.
        partial = False
        state = _DataState.NOMINAL
        while self.transport is not None:  # pragma: no branch - the loop ends at the dot
            try:
                line: bytes = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as e:
                if state == _DataState.NOMINAL:
                    state = _DataState.TOO_LONG
                buf = bytearray()  # nothing of it will be used: let it go now
                line = await self._reader.read(e.consumed)
            if not partial and line == b".\r\n":
                break
            size += len(line)
            if state == _DataState.NOMINAL and limit and size > limit:
                state = _DataState.TOO_MUCH
                buf = bytearray()
            partial = not line.endswith(b"\r\n")
            if partial or state != _DataState.NOMINAL:
                continue
            if len(line) > self.line_length_limit:
                state = _DataState.TOO_LONG
                buf = bytearray()
            elif line[:1] == b".":
                buf += memoryview(line)[1:]  # RFC 5321 4.5.2: undo the stuffing
            else:
                buf += line
        if state == _DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            return None
        if state == _DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            return None
        assert not partial  # else the connection closed mid-line
        content = bytes(buf)
        del buf
        return content
