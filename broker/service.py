"""`broker serve`: the SMTP intake, the pipeline worker, the outbox sender and the
scheduler (role "expiry": hold expiry, reminders, consent and coming-of-age notices;
broker.schedule), wired together in one process. With [imap] configured, role "imap"
also watches a mailbox and spools its mail (broker.intake.imap).

The SMTP server only spools; each worker is a plain thread with its own loop, woken
early by an event when there is new work and otherwise polling, so nothing is
lost if a wake-up is missed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from broker.config import Settings
from broker.db.models import Child, Inbound
from broker.intake.imap import STATE_NAME, ImapFetcher
from broker.intake.pipeline import Pipeline
from broker.intake.smtp import IntakeHandler, IntakeServer, address_acceptor
from broker.release.sender import OutboxSender
from broker.runtime import Runtime
from broker.schedule.run import run_schedule

log = logging.getLogger(__name__)


class SlugCache:
    """Child slugs for the RCPT check. Called on the SMTP event loop, so it never
    touches the database there: a background thread refreshes the set every `ttl`
    seconds (reading without a write lock), and a call returns the last known set."""

    def __init__(self, rt: Runtime, ttl: float = 2.0) -> None:
        self.rt = rt
        self.ttl = ttl
        self._slugs: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="slug-cache", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        try:
            with self.rt.db.read_session() as s:
                self._slugs = frozenset(s.scalars(select(Child.slug)).all())
        except OperationalError:
            log.warning("database unavailable; using the last known children")

    def _run(self) -> None:
        while not self._stop.wait(self.ttl):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()

    def __call__(self) -> set[str]:
        return set(self._slugs)


class Worker(threading.Thread):
    """Runs `step` until stopped; `step` returns how much it did (0 = idle)."""

    def __init__(self, name: str, step: Callable[[], int], stop: threading.Event,
                 idle: float, wake: threading.Event | None = None,
                 after: Callable[[], None] | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.step = step
        self.stop_event = stop
        self.idle = idle
        self.wake = wake or threading.Event()
        self.after = after

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                did = self.step()
            except Exception as exc:
                # The type only: an exception's text may quote record content.
                log.error("%s: step failed (%s); retrying shortly", self.name,
                          type(exc).__name__)
                did = 0
                self.stop_event.wait(1.0)
            if did and self.after:
                self.after()
            if not did:
                self.wake.wait(self.idle)
                self.wake.clear()


# "imap" runs only when broker.toml has an [imap] section; elsewhere it is a no-op.
ROLES = ("intake", "pipeline", "outbox", "expiry", "imap")


class Service:
    """Runs the given roles (all by default). Running only `intake` gives a bare
    spooling front; the other roles pick the spool up when they run."""

    def __init__(self, settings: Settings, poll: float = 1.0,
                 roles: tuple[str, ...] = ROLES,
                 on_stored: Callable[[str], None] | None = None) -> None:
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(sorted(unknown))}")
        self.roles = roles
        self.rt = Runtime.open(settings)
        self.stop_event = threading.Event()
        self.pipeline_wake = threading.Event()
        self.sender_wake = threading.Event()
        self.pipeline = Pipeline(self.rt)
        self.sender = OutboxSender(self.rt)
        self.slugs = SlugCache(self.rt)
        local_pipeline = "pipeline" in roles

        def stored(spool_id: str) -> None:
            if local_pipeline:
                self.pipeline.notify(spool_id)
                self.pipeline_wake.set()
            if on_stored is not None:
                on_stored(spool_id)

        self.handler = handler = IntakeHandler(
            self.rt.spool,
            address_acceptor(settings.domain, self.slugs),
            on_stored=stored,
            max_recipients=settings.limits.max_recipients,
            max_headers=settings.limits.max_headers,
            max_header_length=settings.limits.max_header_length,
        )
        self.server = IntakeServer(
            handler, settings.listen_host, settings.listen_port, hostname=settings.domain,
            data_size_limit=settings.max_message_size,
            connections_per_address=settings.limits.connections_per_address,
            limit_loopback=settings.limits.limit_loopback,
            lmtp=settings.smtp_protocol == "lmtp",
        )
        workers = [
            Worker("pipeline", self.pipeline.run_once, self.stop_event, poll,
                   wake=self.pipeline_wake, after=self.sender_wake.set),
            Worker("outbox", self.sender.run_once, self.stop_event, poll,
                   wake=self.sender_wake),
            # The scheduler (broker.schedule): expires holds and sends reminders and
            # notices. Still named "expiry" so existing --role uses keep working.
            Worker("expiry", lambda: run_schedule(self.rt), self.stop_event,
                   settings.expiry_interval, after=self.sender_wake.set),
        ]
        self.imap: ImapFetcher | None = None
        # Its own stop event: the fetcher stores into the spool, so it stops (like the
        # SMTP intake) before the spool closes.
        self.imap_stop = threading.Event()
        if settings.imap is not None and "imap" in roles:
            self.imap = self._imap_fetcher(settings, stored)
            # The fetcher waits itself (IDLE, polling, backoff): no idle pause here.
            workers.append(Worker("imap", self.imap.step, self.imap_stop, 0.0))
        self.workers = [w for w in workers if w.name in roles]

    def _imap_fetcher(self, settings: Settings,
                      stored: Callable[[str], None]) -> ImapFetcher:
        imap = settings.imap
        assert imap is not None
        domain = settings.domain

        def default_rcpts() -> tuple[str, ...]:
            # The mailbox is one address: mail naming no address of the broker is for the
            # configured child's list, or the only child's.
            if imap.child:
                return (f"{imap.child}@{domain}",)
            slugs = sorted(self.slugs())
            if len(slugs) == 1:
                return (f"{slugs[0]}@{domain}",)
            log.warning("imap: mail names no child and [imap] child is not set; kept as stray")
            return ()

        def already_spooled(sha256: str) -> bool:
            with self.rt.db.read_session() as s:
                return s.scalar(select(Inbound.id).where(Inbound.sha256 == sha256)
                                .limit(1)) is not None

        return ImapFetcher(
            imap, self.rt.spool, state_path=settings.home / STATE_NAME,
            accepts=address_acceptor(domain, self.slugs), default_rcpts=default_rcpts,
            on_stored=stored, already_spooled=already_spooled,
            max_message_size=settings.max_message_size,
            max_headers=settings.limits.max_headers,
            max_header_length=settings.limits.max_header_length,
            stop=self.imap_stop,
        )

    def start(self) -> None:
        self.rt.spool.cleanup_partial()
        if "intake" in self.roles:
            self.server.start()
        for w in self.workers:
            w.start()
            log.info("listening on %s:%s for %s", self.server.host, self.server.port,
                     self.rt.settings.domain)

    def stop(self) -> None:
        # The intakes first, so every 250 already given (every message stored from the
        # mailbox) is on disk before workers stop.
        self.imap_stop.set()
        for w in self.workers:
            if w.name == "imap":
                w.join(timeout=30)
        self.server.stop()
        self.slugs.stop()
        self.handler.close()
        self.rt.spool.close()
        self.stop_event.set()
        for w in self.workers:
            w.wake.set()
        for w in self.workers:
            w.join(timeout=30)
        if self.imap is not None:
            self.imap.close()
        self.sender.close()  # QUIT to the relay on the persistent connection
        self.rt.close()

    @property
    def port(self) -> int:
        return self.server.port
