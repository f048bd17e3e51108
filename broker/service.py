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
import sys
import threading
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from broker.config import Settings
from broker.db.models import Child, Inbound
from broker.intake.burst import BurstDeferral
from broker.intake.imap import STATE_NAME, ImapFetcher
from broker.intake.pipeline import Pipeline
from broker.intake.smtp import IntakeHandler, IntakeServer, address_acceptor
from broker.release.sender import OutboxSender
from broker.runtime import Runtime
from broker.schedule.run import run_schedule

log = logging.getLogger(__name__)
# How long a deferred pipeline round waits before it looks again.
BURST_TICK = 0.05
# How long the materialiser gathers records before it writes and flushes them.
MATERIALISE_GATHER = 0.005
# How long the pipeline waits for another process (materialised_elsewhere) to make an
# announced message's spool file before it makes it itself.
JOURNAL_WAIT = 0.05


# Errors that mean "the database cannot be reached or cannot write", as opposed to a bug.
DB_DOWN_ERRORS = (OperationalError, InterfaceError)


class DatabaseGate:
    """Whether the SMTP intake takes new mail: not while the database is away.

    The spool is durable, so a 250 during an outage would lose nothing; the intake still
    answers 451 at RCPT, because nothing can be taken in without the database: accepting
    would grow a backlog the broker cannot work off, without bound and unseen, while the
    sender's MTA is built to hold the mail and retry (RFC 5321 4.5.4.1) and its queue makes
    the outage visible on both sides. It opens again by itself once the database answers.

    Two witnesses close it: the slug cache's periodic read (every intake process; it also
    catches a read that hangs, e.g. packets dropped) and the pipeline's step (only where it
    runs in the same process; it also catches a database that reads but cannot write, such
    as a full disk under SQLite). A pipeline failure counts for ``hold`` seconds unless the
    pipeline succeeds first: it retries every few seconds while mail waits, so a lasting
    outage keeps the gate shut, and a pipeline with nothing left to retry cannot."""

    def __init__(self, hold: float = 10.0, hang: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hold = hold
        self.hang = hang
        self._clock = clock
        self._lock = threading.Lock()
        self._read_failed = False
        self._read_started: float | None = None  # a refresh under way since
        self._pipeline_failed_at: float | None = None
        self._was_open = True

    def read_started(self) -> None:
        with self._lock:
            self._read_started = self._clock()

    def read_done(self, ok: bool) -> None:
        with self._lock:
            self._read_started = None
            self._read_failed = not ok
        self._log_change()

    def pipeline_failed(self) -> None:
        with self._lock:
            self._pipeline_failed_at = self._clock()
        self._log_change()

    def pipeline_worked(self) -> None:
        with self._lock:
            self._pipeline_failed_at = None
        self._log_change()

    def is_open(self) -> bool:
        """True when new mail may be accepted. Cheap: called for every RCPT."""
        now = self._clock()
        started, failed_at = self._read_started, self._pipeline_failed_at
        return not (self._read_failed
                    or (started is not None and now - started > self.hang)
                    or (failed_at is not None and now - failed_at < self.hold))

    def _log_change(self) -> None:
        is_open = self.is_open()
        with self._lock:
            changed, self._was_open = is_open != self._was_open, is_open
        if changed and is_open:
            log.warning("database reachable again; the intake accepts mail")
        elif changed:
            log.error("database unavailable; the intake answers 451 until it returns")


class SlugCache:
    """Child slugs for the RCPT check. Called on the SMTP event loop, so it never
    touches the database there: a background thread refreshes the set every `ttl`
    seconds (reading without a write lock), and a call returns the last known set.
    Each refresh also tells `gate` whether the database answered."""

    def __init__(self, rt: Runtime, ttl: float = 2.0, gate: DatabaseGate | None = None) -> None:
        self.rt = rt
        self.ttl = ttl
        self.gate = gate or DatabaseGate()
        self._slugs: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="slug-cache", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        self.gate.read_started()
        try:
            with self.rt.db.read_session() as s:
                self._slugs = frozenset(s.scalars(select(Child.slug)).all())
        except DB_DOWN_ERRORS as exc:
            log.warning("database unavailable (%s); using the last known children",
                        type(exc).__name__)
            self.gate.read_done(ok=False)
        else:
            self.gate.read_done(ok=True)

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
                 on_stored: Callable[[str], None] | None = None,
                 on_queued: Callable[[], None] | None = None,
                 materialise: bool = False, materialised_elsewhere: bool = False) -> None:
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(sorted(unknown))}")
        self.roles = roles
        self.rt = Runtime.open(settings)
        self.stop_event = threading.Event()
        self.pipeline_wake = threading.Event()
        self.large_wake = threading.Event()
        self.sender_wake = threading.Event()
        # Two pipelines split the spool by size, each on its own thread: a 25 MB report
        # takes seconds to take in, and the small records behind it must not wait (its
        # slow part runs outside the transaction, see Pipeline._parse_large).
        self.pipeline = Pipeline(self.rt, sizes="small",
                                 journal_wait=JOURNAL_WAIT if materialised_elsewhere else 0.0)
        self.large_pipeline = Pipeline(self.rt, sizes="large")
        # Mail was queued: wake the outbox, here or (on_queued) in its own process.
        queued = (self.sender_wake.set if "outbox" in roles or on_queued is None
                  else on_queued)
        self.pipeline.on_commit = self.large_pipeline.on_commit = queued
        if "outbox" in roles and "pipeline" in roles:
            # The outbox waits on the relay between short bursts of work; with the
            # pipeline busy on the CPU, each of its waits ended only when the pipeline
            # thread gave the interpreter up (every 5 ms by default): a copy took some
            # six of those. Switching more often costs the pipeline little.
            sys.setswitchinterval(0.0005)
        self.sender = OutboxSender(self.rt)
        # Counts the stored messages announced to this process's pipelines (in the
        # worker process: those the intake process announces through the pipe).
        self.burst = (BurstDeferral(settings.burst_rate, settings.burst_wait)
                      if settings.burst_rate > 0 else None)
        self._deferring = False
        self.gate = DatabaseGate()
        self.slugs = SlugCache(self.rt, gate=self.gate)
        local_pipeline = "pipeline" in roles
        # ``materialise``: this process also turns the spool journal's records into spool
        # files, on a thread of its own, woken by `stored_elsewhere` (broker serve's
        # outbox process: the intake's process must keep its interpreter for the SMTP
        # sessions, and writing and flushing the files took a quarter of the pipeline
        # process's time). It waits out an intake burst as the pipeline does (self.burst).
        # The pipeline still does it for whatever it finds not done yet.
        self.materialise_wake = threading.Event()
        self.materialise_stop = threading.Event()
        self._materialising = materialise

        def stored(spool_id: str) -> None:
            if local_pipeline:
                self.notify(spool_id)
            if self._materialising:
                if not local_pipeline:  # (notify counted it for the burst already)
                    self.stored_elsewhere()
                self.materialise_wake.set()
            if on_stored is not None:
                on_stored(spool_id)

        self.handler = handler = IntakeHandler(
            self.rt.spool,
            address_acceptor(settings.domain, self.slugs),
            on_stored=stored,
            available=self.gate.is_open,
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
            # The outbox is woken after each batch commits (pipeline.on_commit).
            Worker("pipeline", lambda: self._pipeline_step(self.pipeline), self.stop_event,
                   poll, wake=self.pipeline_wake),
            Worker("pipeline-large", lambda: self._pipeline_step(self.large_pipeline),
                   self.stop_event, poll, wake=self.large_wake),
            Worker("outbox", self.sender.run_once, self.stop_event, poll,
                   wake=self.sender_wake),
            # The scheduler (broker.schedule): expires holds and sends reminders and
            # notices. Still named "expiry" so existing --role uses keep working.
            Worker("expiry", lambda: run_schedule(self.rt), self.stop_event,
                   settings.expiry_interval, after=queued),
        ]
        self.imap: ImapFetcher | None = None
        # Its own stop event: the fetcher stores into the spool, so it stops (like the
        # SMTP intake) before the spool closes.
        self.imap_stop = threading.Event()
        if settings.imap is not None and "imap" in roles:
            self.imap = self._imap_fetcher(settings, stored)
            # The fetcher waits itself (IDLE, polling, backoff): no idle pause here.
            workers.append(Worker("imap", self.imap.step, self.imap_stop, 0.0))
        self.workers = [w for w in workers if w.name.removesuffix("-large") in roles]
        if self._materialising:
            self.workers.append(Worker("materialise", self._materialise_step,
                                       self.materialise_stop, poll,
                                       wake=self.materialise_wake))

    def notify(self, spool_id: str) -> None:
        """A message was stored: both pipelines look (each takes only its sizes)."""
        if self.burst is not None:
            self.burst.arrived()
        for pipeline, wake in ((self.pipeline, self.pipeline_wake),
                               (self.large_pipeline, self.large_wake)):
            pipeline.notify(spool_id)
            wake.set()

    def _pipeline_step(self, pipeline: Pipeline) -> int:
        """One pipeline round, telling the gate whether the database took the work;
        none while the intake is in a burst (broker.intake.burst)."""
        if self.burst is not None:
            deferring = self.burst.defer()
            if deferring != self._deferring:
                self._deferring = deferring
                if deferring:
                    log.info("intake burst: the pipeline waits (at most %g s)",
                             self.burst.longest)
                else:
                    log.info("the pipeline takes the spool in again")
            if deferring:
                self.stop_event.wait(BURST_TICK)
                # Look again right after the tick, not after the idle poll: the burst's
                # last announcement may already have been taken.
                (self.pipeline_wake if pipeline is self.pipeline else self.large_wake).set()
                return 0
        try:
            did = pipeline.run_once()
        except DB_DOWN_ERRORS:
            self.gate.pipeline_failed()
            raise
        if did:
            self.gate.pipeline_worked()
        return did

    def stored_elsewhere(self) -> None:
        """The intake (another process) stored a message (thread-safe): it counts for the
        burst, and the materialiser looks soon."""
        if self.burst is not None:
            self.burst.arrived()
        self.materialise_wake.set()

    def _materialise_step(self) -> int:
        """The journal's records as spool files (broker.intake.spool.Spool.materialise),
        shortly after they were stored: a few milliseconds' wait gathers the records of
        several sessions into one flush. None while an intake burst defers the workers."""
        if self.burst is not None and self.burst.defer():
            self.materialise_stop.wait(BURST_TICK)
            self.materialise_wake.set()  # look again when the burst may be over
            return 0
        self.materialise_stop.wait(MATERIALISE_GATHER)
        return self.rt.spool.materialise()

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
        # The materialiser before the spool closes (the pipeline makes what it left).
        self.materialise_stop.set()
        for w in self.workers:
            if w.name == "materialise":
                w.wake.set()
                w.join(timeout=30)
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
