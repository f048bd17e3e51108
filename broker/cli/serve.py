"""`broker serve`: run the daemon in the foreground until SIGTERM or SIGINT.

By default the SMTP intake runs in this process and the pipeline, outbox and scheduler
workers in a second process that this one starts, watches and restarts: the intake
then never waits for parsing or database work (Python runs one thread at a time per
process), and a crash in a worker cannot take the intake down. The intake wakes the
workers through a pipe for each stored message; if the pipe closes (this process
died), the workers stop too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO

import click

from broker import config
from broker.memory import return_large_blocks
from broker.service import ROLES, Service

log = logging.getLogger("broker.serve")
WORKER_ROLES = ("pipeline", "expiry")
OUTBOX_ROLES = ("outbox",)
# The line that tells a worker process "a message was stored" (never a spool id).
STORED = "stored"


@click.command()
@click.option("--home", envvar="BROKER_HOME", type=click.Path(file_okay=False),
              help="The broker's home directory (or set BROKER_HOME).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--role", "roles", multiple=True, type=click.Choice(ROLES),
              help="Run only these parts in this process (repeatable); expiry is the "
              "scheduler: hold expiry, reminders, consent renewals, age notices.")
@click.option("--single-process", is_flag=True,
              help="Run every part in this one process (simpler, slower intake under load).")
@click.option("--wake-stdin", is_flag=True, hidden=True,
              help="Wake the pipeline on each byte read from standard input; stop at EOF.")
@click.option("--announce-queued", is_flag=True, hidden=True,
              help="Write a line to standard output whenever mail was queued for the outbox.")
@click.option("--materialise", is_flag=True, hidden=True,
              help="Also turn the spool journal's records into files (woken by 'stored').")
@click.option("--materialised-elsewhere", is_flag=True, hidden=True,
              help="Another process turns the journal's records into files: wait for them.")
def serve(home: str | None, log_level: str, roles: tuple[str, ...], single_process: bool,
          wake_stdin: bool, announce_queued: bool, materialise: bool,
          materialised_elsewhere: bool) -> None:
    """Run the SMTP intake, pipeline, outbox sender and scheduler (expiry, reminders)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return_large_blocks()  # a 25 MB message's memory goes back when it is done with
    try:
        settings = config.load(config.resolve_home(home))
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    if roles or single_process:
        service = Service(settings, roles=roles or ROLES,
                          on_queued=_announce_queued() if announce_queued else None,
                          materialise=materialise,
                          materialised_elsewhere=materialised_elsewhere)
        if wake_stdin:
            threading.Thread(target=_read_wakeups, args=(service, stop), daemon=True).start()
        _start(service, settings)
        stop.wait()
        service.stop()
        return

    # Two worker processes: the pipeline (and the scheduler), and the outbox, each with a
    # CPU of its own; the pipeline's "queued" announcements wake the outbox through here.
    # The outbox's process also turns the intake's journal records into spool files.
    outbox = _Workers(settings.home, log_level, OUTBOX_ROLES, materialise=True)
    workers = _Workers(settings.home, log_level, WORKER_ROLES, on_queued=outbox.wake_up,
                       extra=("--materialised-elsewhere",))

    def stored(spool_id: str) -> None:
        workers.wake(spool_id)
        outbox.wake(STORED)

    # The mailbox fetcher ([imap]) stores into the spool like the SMTP intake: it runs here.
    service = Service(settings, roles=("intake", "imap"), on_stored=stored)
    outbox.start()
    workers.start()
    _start(service, settings)
    while not stop.wait(1.0):
        workers.restart_if_dead()
        outbox.restart_if_dead()
    click.echo("stopping", err=True)
    service.stop()
    workers.stop()
    outbox.stop()


def _start(service: Service, settings: config.Settings) -> None:
    try:
        service.start()
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {settings.listen_host}:{settings.listen_port}: {exc}"
        ) from exc
    where = f" on {settings.listen_host}:{service.port}" if "intake" in service.roles else ""
    click.echo(f"broker serving {settings.domain}{where} ({', '.join(service.roles)})",
               err=True)


def _read_wakeups(service: Service, stop: threading.Event) -> None:
    """One spool id per line from the intake process (STORED: some message was stored;
    an empty line: look for work); EOF means it is gone."""
    for line in sys.stdin.buffer:
        spool_id = line.strip().decode("ascii", "replace")
        if spool_id == STORED:
            service.stored_elsewhere()
        elif spool_id:
            service.notify(spool_id)
        else:
            service.pipeline_wake.set()
            service.large_wake.set()
            service.sender_wake.set()
    stop.set()


def _announce_queued() -> Callable[[], None]:
    """A line on standard output for each commit that queued mail (the parent passes it
    on to the outbox process). Several threads commit: the lock keeps lines whole."""
    lock = threading.Lock()
    out = sys.stdout.buffer

    def announce() -> None:
        with lock, contextlib.suppress(OSError, ValueError):
            out.write(b"\n")
            out.flush()

    return announce


def _low_priority() -> None:
    os.nice(19)


class _Workers:
    """A worker process: started, woken, restarted if it dies, stopped last.
    ``on_queued``: called for each line the process writes (it announces queued mail)."""

    def __init__(self, home: object, log_level: str, roles: tuple[str, ...],
                 on_queued: Callable[[], None] | None = None,
                 materialise: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.roles = roles
        self.args = [sys.executable, "-m", "broker.cli.main", "serve", "--home", str(home),
                     "--log-level", log_level, "--wake-stdin",
                     *[x for r in roles for x in ("--role", r)]]
        if on_queued is not None:
            self.args.append("--announce-queued")
        if materialise:
            self.args.append("--materialise")
        self.args += extra
        self.on_queued = on_queued
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        # The workers run at the lowest ordinary priority (CPU, and disk where `ionice`
        # exists): under a burst the intake answers first and the workers catch up from
        # the spool. Not the idle classes: a worker starved while holding the database
        # lock would stall everyone else who needs it (priority inversion).
        prefix = ["ionice", "-c", "2", "-n", "7"] if shutil.which("ionice") else []
        self.proc = subprocess.Popen(
            [*prefix, *self.args], stdin=subprocess.PIPE, preexec_fn=_low_priority,
            stdout=subprocess.PIPE if self.on_queued is not None else None)
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        if self.proc.stdout is not None:
            threading.Thread(target=self._pass_on, args=(self.proc.stdout,),
                             name="queued-announcements", daemon=True).start()

    def _pass_on(self, stdout: IO[bytes]) -> None:
        """Each announcement of the process, as it comes, until it exits."""
        assert self.on_queued is not None
        for _line in stdout:
            self.on_queued()

    def wake_up(self) -> None:
        """Look for work now (an empty line: no spool id)."""
        self.wake("")

    def wake(self, spool_id: str) -> None:
        with self.lock:
            proc = self.proc
            if proc is None or proc.stdin is None:
                return
            # One line, far below PIPE_BUF, so the write is all or nothing. A full pipe
            # drops the announcement (the workers' periodic listing finds the message);
            # a closed one is handled by restart_if_dead. Neither blocks the event loop.
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ValueError):
                os.write(proc.stdin.fileno(), spool_id.encode("ascii") + b"\n")

    def restart_if_dead(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is not None:
                log.error("worker process (%s) exited with %s; restarting",
                          ", ".join(self.roles), self.proc.returncode)
                self.start()

    def stop(self) -> None:
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
