"""IMAP mailbox mode: take mail from a mailbox at an ordinary provider into the spool.

For a family without a mail server of its own: a spare mailbox ([imap] in broker.toml) is
watched (IDLE where the server has it, else polling every ``poll_interval`` seconds). Each new
message is fetched, stored durably in the spool exactly as the SMTP intake would store it, and
only then moved to the processed folder (MOVE, else COPY + \\Deleted + EXPUNGE).

Nothing is lost and nothing is taken twice across crashes. ``<home>/imap-state.json`` (written
atomically: temporary file, fsync, rename) remembers the folder's UIDVALIDITY, the UIDs already
stored but perhaps not yet moved, and the keys (Message-ID + sha256 of the bytes) of the messages
spooled lately. A message seen again (a crash between store and move, a COPY whose EXPUNGE never
happened) is recognised by its key and only moved. The store itself is bracketed: the key is
written as "pending" before the store and as "stored" after it; a pending key found at start-up
is looked up in the spool (and, in the service, the database) before the message is stored
again.

The envelope is built from the headers: the sender from Return-Path (else From), the
recipients from the broker's own addresses in To/Cc/Delivered-To/X-Original-To, else the
child list address (the mailbox is one address). The peer is ``imap:<host>``, which no
trusted_relays entry matches, so Authentication-Results from the provider are never believed
on that ground; replies are matched through In-Reply-To/References as ever.

Connection trouble and refused logins are logged and retried with exponential backoff; the
fetcher never crashes its thread and never spins.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import imaplib
import json
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from broker.config import ImapSettings
from broker.intake.smtp import MAX_HEADER_LENGTH, MAX_HEADERS, header_problem
from broker.intake.spool import Envelope, Spool

log = logging.getLogger(__name__)

STATE_NAME = "imap-state.json"
STATE_VERSION = 1
KEEP_KEYS = 10_000  # keys of spooled messages remembered (oldest forgotten first)
IDLE_MAX = 25 * 60.0  # RFC 2177: re-issue IDLE at least every 29 minutes
_ADDRESS_HEADERS = ("To", "Cc", "Delivered-To", "X-Original-To")
_DELETED = b"\\Deleted"


class ImapLoginRefused(Exception):
    """The server refused our user name or password (a configuration problem)."""


def message_key(data: bytes) -> tuple[str, str, str]:
    """(key, Message-ID, sha256): the same message fetched twice has the same key."""
    digest = hashlib.sha256(data).hexdigest()
    message_id = ""
    with contextlib.suppress(Exception):
        headers = BytesHeaderParser(policy=compat32).parsebytes(data)
        message_id = str(headers.get("Message-ID", "") or "").strip()
    return f"{message_id}|{digest}", message_id, digest


class ImapState:
    """What survives a restart, in ``<home>/imap-state.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.uidvalidity: int | None = None
        self.folder = ""
        self.uids: dict[int, str] = {}  # UID -> key: stored, maybe not moved yet
        self.refused: set[int] = set()  # UIDs left in the folder on purpose (too large)
        self.keys: dict[str, float] = {}  # key -> when spooled (insertion ordered)
        self.pending: dict[str, Any] | None = None  # a store that may have happened
        self.load()

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Never guess: an unreadable state file is the operator's to look at; without it
            # dedupe by key still works for messages spooled from now on.
            raise RuntimeError(f"{self.path} cannot be read ({exc}); move it aside to "
                               "start afresh") from exc
        self.uidvalidity = raw.get("uidvalidity")
        self.folder = str(raw.get("folder", ""))
        self.uids = {int(k): str(v) for k, v in raw.get("uids", {}).items()}
        self.refused = {int(u) for u in raw.get("refused", [])}
        self.keys = {str(k): float(v) for k, v in raw.get("keys", {}).items()}
        self.pending = raw.get("pending")

    def save(self) -> None:
        """Atomically: a crash leaves the old file or the new one, never half of one."""
        while len(self.keys) > KEEP_KEYS:
            del self.keys[next(iter(self.keys))]
        data = json.dumps({
            "version": STATE_VERSION,
            "folder": self.folder,
            "uidvalidity": self.uidvalidity,
            "uids": {str(k): v for k, v in sorted(self.uids.items())},
            "refused": sorted(self.refused),
            "keys": self.keys,
            "pending": self.pending,
        }, indent=1).encode("utf-8")
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=".imap-state.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                os.fsync(dfd)
        finally:
            os.close(dfd)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return " ".join(_text(v) for v in value)
    return str(value)


def _news(responses: object) -> bool:
    """Whether untagged responses announce mail (EXISTS or RECENT, count above 0)."""
    if not isinstance(responses, list | tuple):
        return False
    return any(isinstance(r, tuple) and len(r) >= 2 and r[1] in (b"EXISTS", b"RECENT")
               and isinstance(r[0], int) and r[0] > 0 for r in responses)


def _reason(exc: BaseException) -> str:
    """A server's answer or a socket error as one short line (imaplib hands over bytes,
    imapclient turns them into "b'...'" strings)."""
    text = _text(exc.args[0] if len(exc.args) == 1 else exc.args) if exc.args else ""
    if len(text) > 3 and text[:2] in ("b'", 'b"') and text[-1] == text[1]:
        text = text[2:-1]
    return " ".join(text.split())[:200] or type(exc).__name__


class ImapFetcher:
    """Moves new mail from an IMAP folder into the spool; see the module docstring.

    ``run_once`` takes what is in the folder now (connecting when needed) and returns how
    many messages it took; ``step`` is one round of the service loop (take, then wait in IDLE
    or sleep; on trouble: log, back off, reconnect) and never raises for server trouble.
    """

    def __init__(
        self,
        settings: ImapSettings,
        spool: Spool,
        *,
        state_path: Path,
        accepts: Callable[[str], bool],
        default_rcpts: Callable[[], tuple[str, ...]],
        on_stored: Callable[[str], None] | None = None,
        already_spooled: Callable[[str], bool] | None = None,
        max_message_size: int = 25 * 1024 * 1024,
        max_headers: int = MAX_HEADERS,
        max_header_length: int = MAX_HEADER_LENGTH,
        stop: threading.Event | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.accepts = accepts
        self.default_rcpts = default_rcpts
        self.on_stored = on_stored
        self.already_spooled = already_spooled
        self.max_message_size = max_message_size
        self.max_headers = max_headers
        self.max_header_length = max_header_length
        self.stop_event = stop or threading.Event()
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._backoff = backoff_initial
        self.state = ImapState(state_path)
        self.client: IMAPClient | None = None
        self._idle_ok = False
        self._move_ok = False
        self._uidplus = False
        self.peer = f"imap:{settings.host}"
        # Test hooks, called with (uid, spool_id): right after the spool store (state not yet
        # updated), and after the state update (message not yet moved).
        self.after_spool: Callable[[int, str], None] | None = None
        self.after_store: Callable[[int, str], None] | None = None
        self.login_failures = 0
        self.connections = 0

    # -- connection -----------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if not self.settings.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def connect(self) -> None:
        """Connect, log in, make sure the processed folder exists, select the folder."""
        s = self.settings
        client = IMAPClient(s.host, port=s.port, ssl=s.tls == "implicit",
                            ssl_context=self._ssl_context() if s.tls != "none" else None,
                            timeout=s.timeout)
        try:
            if s.tls == "starttls":
                client.starttls(self._ssl_context())
            try:
                client.login(s.user, s.password)
            except LoginError as exc:
                raise ImapLoginRefused(
                    f"IMAP login to {s.host} as {s.user} refused: {_reason(exc)}; "
                    "check [imap] user/password"
                ) from None
            caps = set(client.capabilities())
            self._idle_ok = b"IDLE" in caps
            self._move_ok = b"MOVE" in caps
            self._uidplus = b"UIDPLUS" in caps
            if not client.folder_exists(s.processed_folder):
                client.create_folder(s.processed_folder)
                log.info("imap: created folder %s on %s", s.processed_folder, s.host)
            info = client.select_folder(s.folder)
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        self.client = client
        self.connections += 1
        self._adopt_uidvalidity(int(info.get(b"UIDVALIDITY", 0) or 0))
        log.info("imap: watching %s on %s:%d as %s (%s)", s.folder, s.host, s.port, s.user,
                 "IDLE" if self._idle_ok else f"polling every {s.poll_interval:g}s")

    def _adopt_uidvalidity(self, uidvalidity: int) -> None:
        st = self.state
        if st.uidvalidity != uidvalidity or st.folder != self.settings.folder:
            if st.uids or st.refused:
                log.warning("imap: %s has a new UIDVALIDITY; earlier UIDs are forgotten "
                            "(messages are still recognised by Message-ID and hash)",
                            self.settings.folder)
            st.uidvalidity = uidvalidity
            st.folder = self.settings.folder
            st.uids.clear()
            st.refused.clear()
            st.save()

    def close(self) -> None:
        """Log out (best effort)."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            client.logout()
        except Exception:
            with contextlib.suppress(Exception):
                client.shutdown()

    def _drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()

    # -- taking mail ----------------------------------------------------------------------

    def run_once(self) -> int:
        """Take every message now in the folder; returns how many were taken (moved)."""
        if self.client is None:
            self.connect()
        client = self.client
        assert client is not None
        # Servers (Dovecot) show mail that arrived since the last command only after one
        # that syncs the mailbox: SEARCH alone may not.
        client.noop()
        self._resolve_pending()
        uids = sorted(u for u in client.search(["UNDELETED"]) if u not in self.state.refused)
        if not uids:
            return 0
        sizes = client.fetch(uids, ["RFC822.SIZE"])
        taken = 0
        for uid in uids:
            if self.stop_event.is_set():
                break
            if uid in self.state.uids:  # stored before; the move did not happen
                self._move(uid)
                taken += 1
                continue
            size = int(sizes.get(uid, {}).get(b"RFC822.SIZE", 0))
            if size > self.max_message_size:
                self._refuse(uid, f"{size} bytes, over the limit of {self.max_message_size} "
                                  "(smtp.max_message_size)")
                continue
            fetched = client.fetch([uid], ["BODY.PEEK[]"]).get(uid)
            if fetched is None or b"BODY[]" not in fetched:
                continue  # expunged meanwhile by someone else
            data = bytes(fetched[b"BODY[]"])
            refused = header_problem(data, self.max_headers, self.max_header_length)
            if refused is not None:
                self._refuse(uid, refused)
                continue
            self._take(uid, data)
            taken += 1
        return taken

    def _refuse(self, uid: int, reason: str) -> None:
        log.warning("imap: message UID %d in %s not taken: %s; it stays in the folder",
                    uid, self.settings.folder, reason)
        self.state.refused.add(uid)
        self.state.save()

    def _take(self, uid: int, data: bytes) -> None:
        st = self.state
        key, _message_id, digest = message_key(data)
        if key in st.keys:
            log.info("imap: UID %d was spooled before (same Message-ID and sha256); "
                     "moving it only", uid)
        else:
            st.pending = {"uid": uid, "key": key, "sha256": digest}
            st.save()
            envelope = Envelope.for_message(
                data, mail_from=self._mail_from(data), rcpt_tos=self._rcpt_tos(data),
                peer=self.peer, helo=self.settings.host,
            )
            spool_id = self.spool.store(data, envelope)
            if self.after_spool is not None:
                self.after_spool(uid, spool_id)
            st.keys[key] = time.time()
            st.uids[uid] = key
            st.pending = None
            st.save()
            log.info("imap: queued %s (%d bytes, %d rcpt) from UID %d", spool_id, len(data),
                     len(envelope.rcpt_tos), uid)
            if self.on_stored is not None:
                try:
                    self.on_stored(spool_id)
                except Exception:
                    log.exception("imap: on_stored callback failed for %s", spool_id)
            if self.after_store is not None:
                self.after_store(uid, spool_id)
        st.uids[uid] = key
        self._move(uid)

    def _move(self, uid: int) -> None:
        client = self.client
        assert client is not None
        target = self.settings.processed_folder
        if self._move_ok:
            client.move([uid], target)
        else:
            client.copy([uid], target)
            client.add_flags([uid], [_DELETED], silent=True)
            if self._uidplus:
                client.uid_expunge([uid])
            else:
                client.expunge()
        self.state.uids.pop(uid, None)
        self.state.save()

    def _resolve_pending(self) -> None:
        """A store that was under way when the process died: did it happen?"""
        st = self.state
        pending = st.pending
        if not pending:
            return
        digest = str(pending.get("sha256", ""))
        done = any(e.envelope.sha256 == digest for e in self.spool.pending())
        if not done and self.already_spooled is not None:
            done = self.already_spooled(digest)
        if done:
            st.keys[str(pending["key"])] = time.time()
            log.info("imap: the store of UID %s finished before the interruption",
                     pending.get("uid"))
        st.pending = None
        st.save()

    def _mail_from(self, data: bytes) -> str:
        """Return-Path (what the provider's MTA saw as MAIL FROM), else the From address."""
        try:
            headers = BytesHeaderParser(policy=compat32).parsebytes(data)
            return_path = headers.get_all("Return-Path")
            if return_path:
                return email.utils.parseaddr(str(return_path[0]))[1].strip()
            return email.utils.parseaddr(str(headers.get("From", "")))[1].strip()
        except Exception:
            return ""

    def _rcpt_tos(self, data: bytes) -> tuple[str, ...]:
        """The broker's own addresses among the recipients named in the headers, else the
        child list address (the mailbox itself is one address)."""
        found: list[str] = []
        try:
            headers = BytesHeaderParser(policy=compat32).parsebytes(data)
            values = [str(v) for h in _ADDRESS_HEADERS for v in headers.get_all(h, [])]
            for _, addr in email.utils.getaddresses(values):
                addr = addr.strip()
                if addr and self.accepts(addr) and addr.lower() not in found:
                    found.append(addr.lower())
        except Exception:
            found = []
        return tuple(found) or tuple(self.default_rcpts())

    # -- the service loop -----------------------------------------------------------------

    def step(self) -> int:
        """One round: take what is there, then wait for more (IDLE or sleep). Trouble is
        logged and followed by a growing pause; the next round reconnects."""
        if self.stop_event.is_set():
            return 0
        s = self.settings
        try:
            taken = self.run_once()
            self._backoff = self.backoff_initial
            if taken == 0:
                self._wait_for_mail()
            return taken
        except ImapLoginRefused as exc:
            self.login_failures += 1
            self._drop()
            log.error("%s (retrying in %gs)", exc, self._backoff)
        except (OSError, imaplib.IMAP4.error, EOFError) as exc:
            self._drop()
            log.warning("imap: connection to %s:%d failed (%s: %s); reconnecting in %gs",
                        s.host, s.port, type(exc).__name__, _reason(exc),
                        self._backoff)
        self.stop_event.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self.backoff_max)
        return 0

    def _wait_for_mail(self) -> None:
        """Until new mail is announced, poll_interval passed, or we are stopped."""
        client = self.client
        assert client is not None
        limit = min(self.settings.poll_interval, IDLE_MAX)
        if not self._idle_ok:
            self.stop_event.wait(limit)
            return
        # Mail that arrived since the last SEARCH is not announced once IDLE starts
        # (Dovecot): ask once more, just before.
        if _news(client.noop()[1]):
            return
        deadline = time.monotonic() + limit
        client.idle()
        news = gone = False
        try:
            while not self.stop_event.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(left, 1.0)
                started = time.monotonic()
                responses = client.idle_check(timeout=wait)
                if not responses and time.monotonic() - started < wait * 0.5:
                    # imapclient hides an EOF (the server went away) as "nothing"; ending
                    # IDLE tells which it was (it raises on a closed connection).
                    break
                for resp in responses:
                    if len(resp) >= 1 and resp[0] == b"BYE":
                        gone = True
                        raise imaplib.IMAP4.abort("server said BYE: " + _text(resp[1:]))
                    if len(resp) >= 2 and resp[1] in (b"EXISTS", b"RECENT"):
                        news = True
                if news:
                    break
        finally:
            if not gone:
                client.idle_done()

    def run(self) -> None:
        """Loop until stopped (a thread's target)."""
        try:
            while not self.stop_event.is_set():
                self.step()
        finally:
            self.close()
