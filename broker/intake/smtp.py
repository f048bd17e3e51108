"""SMTP intake: accept mail for the broker's addresses and put it in the spool, nothing more.

The handler only checks recipients and size, stores the raw bytes durably (in a worker thread, so
the event loop never blocks on disk - aiosmtpd issue 293) and answers 250 once they are stored.
Parsing, decryption, policy and database work belong to the pipeline, which reads the spool.

Run standalone (tests, benchmarks)::

    python -m broker.intake.smtp --spool DIR --domain records.example --slug sam --port 0

prints ``READY <host> <port>`` on stdout once listening and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import re
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from aiosmtpd.smtp import Session as SMTPSession

from broker.intake.data import OneBufferData
from broker.intake.spool import Envelope, Spool

log = logging.getLogger(__name__)

DEFAULT_SIZE_LIMIT = 25 * 1024 * 1024
MAX_RECIPIENTS = 100
MAX_HEADERS = 500
MAX_HEADER_LENGTH = 8 * 1024
DEFAULT_STORE_THREADS = 16

REPLY_NO_SUCH_RECIPIENT = "550 5.1.1 no such recipient here"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_NO_SPACE = "452 4.3.1 Insufficient system storage"
REPLY_TEMP_FAILURE = "451 4.3.0 Temporary failure, try again later"
# At RCPT while the broker cannot process mail (its database is away): see service.DatabaseGate.
REPLY_UNAVAILABLE = "451 4.3.0 Mail service temporarily unavailable, try again later"
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 too many connections from your address"
REPLY_TOO_MANY_HEADERS = "552 5.6.0 Too many header fields (limit {limit})"
REPLY_HEADER_TOO_LONG = "552 5.6.0 A header field is too long (limit {limit} bytes)"

_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
# One header field: a line not starting with white space, and its folded continuations.
_HEADER_FIELD_RE = re.compile(rb"(?m)^[^ \t\r\n][^\r\n]*(?:\r?\n[ \t][^\r\n]*)*")

_REVIEW_RE = re.compile(r"review\+[a-z2-7]{32}")
_BOUNCE_RE = re.compile(r"bounces\+[0-9]{1,20}")


class _NoContentInLogs(logging.Filter):
    """Drop aiosmtpd's DEBUG lines that echo DATA lines: logs must never hold message content."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not msg.startswith("DATA readline")


def _install_log_filter() -> None:
    """Attach the content filter to aiosmtpd's logger once per process."""
    logger = logging.getLogger("mail.log")
    if not any(isinstance(f, _NoContentInLogs) for f in logger.filters):
        logger.addFilter(_NoContentInLogs())


def header_block(data: bytes) -> bytes:
    """The message's header fields, without the blank line that ends them (all of
    ``data`` when there is no body)."""
    end = _HEADER_END_RE.search(data)
    return data[: end.start()] if end else data


def header_problem(data: bytes, max_headers: int, max_header_length: int) -> str | None:
    """The SMTP reply refusing ``data`` for its header block, or None if within limits.

    Cheap on hostile input: the regex runs in C and the loop stops at ``max_headers + 1``."""
    block = header_block(data)
    for count, match in enumerate(_HEADER_FIELD_RE.finditer(block), start=1):
        if count > max_headers:
            return REPLY_TOO_MANY_HEADERS.format(limit=max_headers)
        if match.end() - match.start() > max_header_length:
            return REPLY_HEADER_TOO_LONG.format(limit=max_header_length)
    return None


def _format_peer(peer: Any) -> str:
    """``host:port`` (``[v6]:port``) for the envelope; aiosmtpd gives a socket address tuple."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer)


# Messages up to this size are hashed, sealed and queued on the event loop itself.
INLINE_STORE_LIMIT = 64 * 1024


class IntakeHandler:
    """aiosmtpd handler: recipient check at RCPT, durable store at DATA, 250 only after that."""

    def __init__(
        self,
        spool: Spool,
        accepts: Callable[[str], bool],
        on_stored: Callable[[str], None] | None = None,
        *,
        available: Callable[[], bool] | None = None,
        store_threads: int = DEFAULT_STORE_THREADS,
        max_recipients: int = MAX_RECIPIENTS,
        max_headers: int = MAX_HEADERS,
        max_header_length: int = MAX_HEADER_LENGTH,
    ) -> None:
        self.spool = spool
        self.accepts = accepts
        self.on_stored = on_stored
        # Asked at each RCPT (on the event loop, so it must be cheap): False -> 451.
        self.available = available
        self.max_recipients = max_recipients
        self.max_headers = max_headers
        self.max_header_length = max_header_length
        # One thread per concurrent store: they only wait for the spool's batch writer.
        self._executor = ThreadPoolExecutor(
            max_workers=store_threads, thread_name_prefix="spool-store"
        )
        self._in_flight: set[asyncio.Future[str]] = set()

    async def handle_RCPT(
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: SMTPEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Refuse unknown addresses here, so senders get a bounce from their own server.

        While the broker cannot work its mail (``available`` says no) every recipient gets
        451: the client has sent no message yet, and its MTA keeps the mail and retries."""
        if self.available is not None and not self.available():
            return REPLY_UNAVAILABLE
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return REPLY_TOO_MANY_RECIPIENTS
        if not self.accepts(address):
            return REPLY_NO_SUCH_RECIPIENT
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(
        self, server: SMTP, session: SMTPSession, envelope: SMTPEnvelope
    ) -> str:
        """Store the raw bytes durably off the event loop; only then say 250.

        Over LMTP (RFC 2033 4.2) the answer is one reply line per accepted recipient: the
        message is stored once for all of them, so every line carries the same status."""
        status = await self._store_message(session, envelope)
        if isinstance(server, LMTP):
            return lmtp_replies(status, len(envelope.rcpt_tos))
        return status

    async def _store_message(self, session: SMTPSession, envelope: SMTPEnvelope) -> str:
        """The one reply for the whole message (SMTP's answer to DATA)."""
        data = envelope.original_content
        if data is None:  # aiosmtpd always sets it before calling us
            return REPLY_TEMP_FAILURE
        refused = header_problem(data, self.max_headers, self.max_header_length)
        if refused is not None:
            log.info("intake: refused %d-byte message from %s: %s",
                     len(data), _format_peer(session.peer), refused)
            return refused
        mail_from = envelope.mail_from or ""
        rcpt_tos = tuple(envelope.rcpt_tos)
        peer = _format_peer(session.peer)
        helo = session.host_name or ""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str]
        if len(data) <= INLINE_STORE_LIMIT and self.spool.commit == "batch":
            # Hashing and sealing 64 KB take tens of microseconds: cheaper on the loop
            # than a hop through a thread; the flush itself happens in the writer thread.
            envelope_ = Envelope.for_message(
                data, mail_from=mail_from, rcpt_tos=rcpt_tos, peer=peer, helo=helo
            )
            try:
                fut = self.spool.submit_async(data, envelope_)
            except Exception as exc:  # closed spool, sealing failure
                fut = loop.create_future()
                fut.set_exception(exc)
        else:
            fut = loop.run_in_executor(
                self._executor, self._store, data, mail_from, rcpt_tos, peer, helo
            )
        self._in_flight.add(fut)
        try:
            spool_id = await fut
        except OSError as exc:
            # Never log content; the errno and size are what an operator needs.
            log.error(
                "intake: could not spool %d-byte message from %s: %s",
                len(data), peer, exc.strerror or type(exc).__name__,
            )
            return REPLY_NO_SPACE if exc.errno == errno.ENOSPC else REPLY_TEMP_FAILURE
        except Exception:
            log.exception("intake: unexpected error spooling a message from %s", peer)
            return REPLY_TEMP_FAILURE
        finally:
            self._in_flight.discard(fut)
        log.info("intake: queued %s (%d bytes, %d rcpt) from %s",
                 spool_id, len(data), len(rcpt_tos), peer)
        if self.on_stored is not None:
            try:
                self.on_stored(spool_id)
            except Exception:
                # The message is durable; the pipeline's scan of pending() will find it anyway.
                log.exception("intake: on_stored callback failed for %s", spool_id)
        return f"250 2.0.0 Ok: queued as {spool_id}"

    def _store(
        self, data: bytes, mail_from: str, rcpt_tos: tuple[str, ...], peer: str, helo: str
    ) -> str:
        """Runs in a worker thread: hashing 25 MB and fsyncs must not stall the event loop."""
        envelope = Envelope.for_message(
            data, mail_from=mail_from, rcpt_tos=rcpt_tos, peer=peer, helo=helo
        )
        return self.spool.store(data, envelope)

    async def wait_idle(self, timeout: float) -> None:
        """Let stores already under way finish (and their clients get 250) before shutdown."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)

    def close(self) -> None:
        """Wait for running stores and release the worker threads."""
        self._executor.shutdown(wait=True)


def lmtp_replies(status: str, recipients: int) -> str:
    """``status`` once per recipient, CRLF-joined for aiosmtpd's ``push`` (which adds the
    last CRLF): LMTP's answer after DATA. At least one line, so the client always hears."""
    return "\r\n".join([status] * max(recipients, 1))


def address_acceptor(domain: str, child_slugs: Callable[[], set[str]]) -> Callable[[str], bool]:
    """Recipient policy for RCPT: child list addresses, review+TOKEN, bounces+ID at ``domain``.

    Syntax only for tokens and ids; whether they are valid is the pipeline's decision.
    ``child_slugs`` is called on the event loop for each RCPT, so it must be cheap (a cached set).
    """
    want_domain = domain.strip().lower()

    def accepts(address: str) -> bool:
        local, at, dom = address.strip().rpartition("@")
        if not at or not local or dom.lower() != want_domain:
            return False
        local = local.lower()
        if _REVIEW_RE.fullmatch(local) or _BOUNCE_RE.fullmatch(local):
            return True
        if local == "postmaster":  # RFC 5321 4.5.1: kept for the operator, never forwarded
            return True
        return local in {s.lower() for s in child_slugs()}

    return accepts


class IntakeServer:
    """The listening SMTP server around an :class:`IntakeHandler`.

    Uses an explicit asyncio server rather than aiosmtpd's ``Controller`` because Controller
    cannot bind port 0 (its start-up self-connection goes to the literal port) and always wants
    its own thread; here ``start_async`` runs on the caller's loop (``broker serve``) and
    ``start`` runs a private loop thread (tests, scripts).

    ``lmtp=True`` serves the same handler over LMTP (RFC 2033) instead, for an MTA in front
    (Postfix ``lmtp:inet:HOST:PORT``): LHLO instead of HELO/EHLO, and after DATA one reply
    per accepted recipient.
    """

    def __init__(
        self,
        handler: IntakeHandler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostname: str | None = None,
        data_size_limit: int = DEFAULT_SIZE_LIMIT,
        timeout: float = 300.0,
        connections_per_address: int | None = None,
        limit_loopback: bool = True,
        lmtp: bool = False,
    ) -> None:
        self.handler = handler
        self.lmtp = lmtp
        self._host = host
        self._port = port
        # Passing hostname stops aiosmtpd calling socket.getfqdn() (blocking DNS) per connection.
        self.hostname = hostname or socket.gethostname()
        self.data_size_limit = data_size_limit
        self.timeout = timeout
        self._server: asyncio.AbstractServer | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        # Concurrent sessions per client IP address (None: no limit). Touched on the
        # server's event loop only.
        self.connections_per_address = connections_per_address
        self.limit_loopback = limit_loopback
        self._per_address: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        _install_log_filter()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        return self._port

    def _admit(self, peer: Any) -> str | None:
        """Count a new session from ``peer``: the key to release later, or None to refuse."""
        host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        limit = self.connections_per_address
        if (limit is not None and (self.limit_loopback or not _is_loopback(host))
                and self._per_address.get(host, 0) >= limit):
            return None
        self._per_address[host] = self._per_address.get(host, 0) + 1
        return host

    def _release(self, host: str) -> None:
        left = self._per_address.get(host, 0) - 1
        if left > 0:
            self._per_address[host] = left
        else:
            self._per_address.pop(host, None)

    def _factory(self) -> SMTP:
        """One SMTP (or LMTP) protocol per connection, with the size limit advertised as SIZE."""
        protocol = _LimitedLMTP if self.lmtp else _LimitedSMTP
        smtp = protocol(
            self._admit,
            self._release,
            self.handler,
            hostname=self.hostname,
            data_size_limit=self.data_size_limit,
            decode_data=False,  # keep the raw bytes; the pipeline parses
            enable_SMTPUTF8=True,  # accept internationalised addresses instead of refusing mail
            timeout=self.timeout,
        )
        self._sessions.add(smtp)
        return smtp

    async def start_async(self) -> None:
        """Listen on the running loop."""
        if self._server is not None:
            raise RuntimeError("intake server already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host=self._host, port=self._port)
        sockname = self._server.sockets[0].getsockname()
        self._port = int(sockname[1])
        log.info("intake: listening on %s:%d%s", self._host, self._port,
                 " (LMTP)" if self.lmtp else "")

    async def stop_async(self, grace: float = 10.0) -> None:
        """Stop listening, let in-flight stores answer, then drop the remaining connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await self.handler.wait_idle(grace)
        for smtp in list(self._sessions):
            transport = smtp.transport
            if transport is not None:
                transport.close()
        await asyncio.sleep(0)

    def start(self) -> None:
        """Run the server on a private event loop in a daemon thread; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("intake server already started")
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as exc:
                error.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="smtp-intake", daemon=True)
        self._thread.start()
        ready.wait()
        if error:
            self._thread.join()
            self._thread = None
            raise error[0]

    def stop(self, grace: float = 10.0) -> None:
        """Counterpart of :meth:`start`."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop_async(grace), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None
        self._loop = None

    def __enter__(self) -> IntakeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@functools.lru_cache(maxsize=1024)
def _parse_command_address(arg: str) -> tuple[str | None, str | None]:
    """The address and the rest of a MAIL or RCPT argument, parsed as aiosmtpd 1.4 does
    (with the stdlib's RFC 5322 parser), remembered for the same text: mail to a child's
    list comes from a few providers to a few addresses, and aiosmtpd's own version also
    defines a class on every call. Together about a fifth of the intake's CPU."""
    if not arg:
        return "", ""
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    return address.addr_spec, rest


class _LimitedSMTP(OneBufferData):
    """aiosmtpd's SMTP that first asks the server whether this client address may open
    one more session; if not, it answers 421 at connect and hangs up (RFC 5321 3.1). Its
    DATA gathers the message into one buffer (broker.intake.data)."""

    def __init__(self, admit: Callable[[Any], str | None], release: Callable[[str], None],
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admit = admit
        self._release = release
        self._counted: str | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and not self._refused:  # not a STARTTLS re-entry
            key = self._admit(transport.get_extra_info("peername"))
            if key is None:
                self._refused = True
                log.info("intake: refused a connection from %s: too many sessions",
                         _format_peer(transport.get_extra_info("peername")))
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(REPLY_TOO_MANY_CONNECTIONS.encode("ascii") + b"\r\n")
                transport.close()
                return
            self._counted = key
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._counted is not None:
            key, self._counted = self._counted, None
            self._release(key)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's ``SMTP._getaddr``, the same answers (tests/test_smtp_intake.py
        compares them), without its per-call cost."""
        addr, rest = _parse_command_address(arg)
        limit = self.local_part_limit
        if addr and limit and len(addr.rpartition("@")[0]) > limit:
            return None, None
        return addr, rest

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()


class _LimitedLMTP(_LimitedSMTP, LMTP):
    """The same, over LMTP. After DATA's 354 the client waits for one reply per accepted
    recipient (RFC 2033 4.2); the handler gives that itself, but aiosmtpd answers some
    failures with one line of its own (552 too much mail data, 500 line too long, an
    exception): those are repeated per recipient here so the client never hangs waiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._data_rcpts = 0  # accepted recipients of the DATA under way
        self._data_open = False  # 354 sent, final reply(ies) not yet

    async def smtp_DATA(self, arg: str) -> None:
        self._data_rcpts = len(self.envelope.rcpt_tos) if self.envelope is not None else 0
        self._data_open = False
        await super().smtp_DATA(arg)
        # Not reached on an exception: aiosmtpd then pushes its error reply, repeated below.
        self._data_open = False

    async def push(self, status: Any) -> None:
        if self._data_open:
            self._data_open = False
            line = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
            if "\r\n" not in line:  # the handler's reply is already one line per recipient
                status = lmtp_replies(line, self._data_rcpts)
        elif self._data_rcpts and status[:3] in ("354", b"354"):
            self._data_open = True
        await super().push(status)


def main(argv: list[str] | None = None) -> int:
    """Standalone intake for tests and benchmarks: serve until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(prog="python -m broker.intake.smtp", description=main.__doc__)
    p.add_argument("--spool", required=True, type=Path, help="spool directory")
    p.add_argument("--domain", required=True, help="the broker's mail domain")
    p.add_argument("--slug", action="append", default=[], help="child slug to accept (repeat)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--hostname", default=None, help="name in the SMTP greeting")
    p.add_argument("--size-limit", type=int, default=DEFAULT_SIZE_LIMIT)
    p.add_argument("--lmtp", action="store_true", help="speak LMTP instead of SMTP")
    p.add_argument("--store-threads", type=int, default=DEFAULT_STORE_THREADS)
    p.add_argument("--commit", choices=["batch", "each"], default="batch",
                   help="how stores are flushed (see broker.intake.spool.Spool)")
    p.add_argument("--batch-window", type=float, default=0.0,
                   help="seconds the batch writer waits for more messages")
    p.add_argument("--journal", action="store_true",
                   help="store small mail through the write-ahead journal, as `broker serve` does")
    p.add_argument("--journal-segment", type=int, default=16 * 1024 * 1024,
                   help="bytes per journal segment")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    spool = Spool(args.spool, commit=args.commit, batch_window=args.batch_window,
                  journal=args.journal, journal_segment=args.journal_segment)
    spool.cleanup_partial()
    slugs = set(args.slug)
    handler = IntakeHandler(
        spool, address_acceptor(args.domain, lambda: slugs), store_threads=args.store_threads
    )
    server = IntakeServer(handler, args.host, args.port, hostname=args.hostname or args.domain,
                          data_size_limit=args.size_limit, lmtp=args.lmtp)

    async def serve() -> None:
        await server.start_async()
        print(f"READY {server.host} {server.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop_async()

    try:
        asyncio.run(serve())
    finally:
        handler.close()
        spool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
