"""Shared by bench/latency.py and bench/large_mail.py: a real `broker serve` in a fresh home,
an aiosmtpd relay in the bench process that timestamps what it accepts, and an open-loop
SMTP sender paced by the clock.

The relay keeps only the headers of each message (the bench needs Subject, Reply-To and
Message-ID to tell which record a mail belongs to), so it stays cheap next to the broker
under test; each header block is parsed once, the first time the bench looks at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import create_engine, make_url, text
from sqlalchemy import select as sqlalchemy_select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broker import config  # noqa: E402
from broker.crypto import vault as vaults  # noqa: E402
from broker.crypto.keys import create_broker_key  # noqa: E402
from broker.db.engine import Database  # noqa: E402
from broker.db.migrate import upgrade  # noqa: E402
from broker.intake.pipeline import Pipeline  # noqa: E402
from broker.intake.spool import Envelope as SpoolEnvelope  # noqa: E402
from broker.release.sender import OutboxSender  # noqa: E402
from broker.runtime import Runtime  # noqa: E402
from broker.team.apply import apply_team  # noqa: E402
from broker.team.spec import parse_team  # noqa: E402
from tests.harness import DOMAIN, GUARDIAN, SCHOOL, TEAM, free_port  # noqa: E402

PROVIDER = "lee@clinic.example"
CHILD_ADDR = f"sam@{DOMAIN}"
TAG_RX = re.compile(r"bench-(\d+)")
PG_DEFAULT = os.environ.get("BROKER_TEST_PG_URL",
                            "postgresql+psycopg://postgres@127.0.0.1:5432/test")

# Process layouts: name -> the `broker serve` role lists, one process each.
#   serve   plain `broker serve`: intake here, pipeline+outbox+expiry in the worker
#           process it starts and wakes through a pipe (what an operator runs)
#   single  `broker serve --single-process`: everything in one process
#   split   `--role intake` + one `--role pipeline --role outbox --role expiry` process
#           (no wake-up pipe between them: the workers find new mail by listing the spool)
#   split2  as split plus a second `--role pipeline` process (PostgreSQL only)
#   split3  `--role intake` + `--role pipeline --role expiry` + `--role outbox`: the outbox
#           in a process of its own (measured slower at 35/s and 50/s: docs/performance.md)
LAYOUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "serve": ((),),
    "single": (("--single-process",),),
    "split": (("intake",), ("pipeline", "outbox", "expiry")),
    "split2": (("intake",), ("pipeline", "outbox", "expiry"), ("pipeline",)),
    "split3": (("intake",), ("pipeline", "expiry"), ("outbox",)),
}


# -- the relay ------------------------------------------------------------------------------


@dataclass
class Accepted:
    """One message the relay answered 250 to, with the time of that answer."""

    at: float
    mail_from: str
    rcpts: list[str]
    head: bytes
    size: int

    @functools.cached_property
    def _parsed(self) -> EmailMessage:
        msg = BytesHeaderParser(policy=policy.default).parsebytes(self.head)
        assert isinstance(msg, EmailMessage)
        return msg

    def headers(self) -> EmailMessage:
        """Parsed once: the bench polls its relay while the broker runs, and re-parsing
        every header block on each poll cost the machine a CPU the broker needed."""
        return self._parsed


@dataclass
class Recorder:
    """aiosmtpd handler: timestamps and keeps the headers of everything it accepts."""

    accepted: list[Accepted] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.monotonic()
        data = envelope.content if isinstance(envelope.content, bytes) else b""
        end = data.find(b"\r\n\r\n")
        with self.lock:
            self.accepted.append(Accepted(now, envelope.mail_from or "",
                                          list(envelope.rcpt_tos),
                                          data[: end if end >= 0 else 65536], len(data)))
        return "250 2.0.0 Ok: kept"

    def snapshot(self) -> list[Accepted]:
        with self.lock:
            return list(self.accepted)


class Relay:
    """The broker's relay, in this process (a thread of its own, like any aiosmtpd)."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.port = free_port()
        self.controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port,
                                     data_size_limit=64 * 1024 * 1024)

    def __enter__(self) -> Relay:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


@dataclass
class Review:
    at: float
    token_addr: str
    message_id: str


def reviews(accepted: Sequence[Accepted]) -> dict[int, Review]:
    """Bench tag -> the first review request for it (to the guardian, with a Reply-To)."""
    out: dict[int, Review] = {}
    for a in accepted:
        if GUARDIAN not in a.rcpts:
            continue
        h = a.headers()
        subject, reply_to = str(h.get("Subject", "")), str(h.get("Reply-To", ""))
        m = TAG_RX.search(subject)
        if m and "Review needed" in subject and reply_to.startswith("review+"):
            out.setdefault(int(m.group(1)), Review(a.at, reply_to, str(h["Message-ID"])))
    return out


def releases(accepted: Sequence[Accepted]) -> dict[int, list[float]]:
    """Bench tag -> accept times of the released copies to school members."""
    out: dict[int, list[float]] = {}
    for a in accepted:
        if not set(a.rcpts) & set(SCHOOL):
            continue
        m = TAG_RX.search(str(a.headers().get("Subject", "")))
        if m:
            out.setdefault(int(m.group(1)), []).append(a.at)
    return out


@dataclass
class Stages:
    """Where a copy spent its time, on the monotonic clock: ``queued`` is when the broker
    put it in the outbox (inside the pipeline's transaction, before the commit), ``sent``
    when the outbox recorded the relay's answer."""

    queued: float
    sent: float | None


def stages(url: str, kind: str) -> dict[int, list[Stages]]:
    """Bench tag -> the outbox times of its copies of ``kind`` (review, release, ...), read
    from the deliveries table after a run (records.subject is sealed: this process has the
    home's keyring registered, see make_home)."""
    from broker.db.models import Delivery, Record

    offset = time.time() - time.monotonic()

    def mono(at: object) -> float | None:
        return at.timestamp() - offset if at is not None else None  # type: ignore[attr-defined]

    out: dict[int, list[Stages]] = {}
    db = Database(url)
    try:
        with db.read_session() as s:
            rows = s.execute(sqlalchemy_select(Record.subject, Delivery.created_at,
                                               Delivery.sent_at)
                             .join(Record, Record.id == Delivery.record_id)
                             .where(Delivery.kind == kind)).all()
    finally:
        db.dispose()
    for subject, created, sent in rows:
        m = TAG_RX.search(subject or "")
        if m:
            out.setdefault(int(m.group(1)), []).append(Stages(mono(created) or 0.0, mono(sent)))
    return out


# -- the broker -------------------------------------------------------------------------------


@contextlib.contextmanager
def database(pg: str | None, tmp: Path) -> Iterator[str]:
    """A fresh database: SQLite in the home, or a new database on the PostgreSQL server."""
    if not pg:
        yield config.default_database_url(tmp / "home")
        return
    base = make_url(pg)
    name = f"broker_bench_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def fill_history(url: str, count: int, days: int = 365) -> None:
    """``count`` copies the outbox sent before today, spread over ``days`` days: a home
    in use for a while, not a fresh one. Every query over the outbox then shows what it
    costs once the history is there (a notice's daily cap, a record's copies)."""
    import datetime as dt
    import random

    from sqlalchemy import insert

    from broker.db.models import Delivery

    rnd = random.Random(7)
    people = [PROVIDER, GUARDIAN, *SCHOOL] + [f"other{k}@example.org" for k in range(200)]
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    db = Database(url)
    try:
        for start in range(0, count, 10_000):
            rows = []
            for k in range(start, min(count, start + 10_000)):
                at = today - dt.timedelta(seconds=rnd.randrange(1, days * 86400))
                rows.append({"kind": rnd.choice(("review", "release", "notice", "receipt")),
                             "recipient": rnd.choice(people), "message_id": f"<h{k}@{DOMAIN}>",
                             "content_ref": "0" * 64, "sha256": "0" * 64, "summary": "{}",
                             "state": "sent", "attempts": 1, "next_attempt_at": at,
                             "last_error": "", "created_at": at, "sent_at": at})
            with db.session() as s:
                s.execute(insert(Delivery), rows)
    finally:
        db.dispose()


def make_home(home: Path, url: str, relay_port: int, *, pgp_key: bool = True,
              notices_cap: int = 1_000_000) -> int:
    """A home as `broker init` + `broker apply` make it; returns the intake port.

    The daily cap on notices per address is raised: one provider sending hundreds of
    records a day is a bench artefact, and a capped receipt would make later records
    cheaper than the first fifty."""
    home.mkdir(parents=True)
    port = free_port()
    text_ = config.render_config(domain=DOMAIN, listen=f"127.0.0.1:{port}",
                                 relay=f"127.0.0.1:{relay_port}", auth="token")
    text_ = text_.replace("notices_per_address_per_day = 50",
                          f"notices_per_address_per_day = {notices_cap}", 1)
    (home / config.CONFIG_NAME).write_text(text_)
    upgrade(url)
    vaults.register(url, vaults.create_keyring(home))
    if pgp_key:
        create_broker_key(home, DOMAIN)  # everything the broker sends is then signed
    db = Database(url)
    with db.session() as s:
        apply_team(s, parse_team(TEAM))
    db.dispose()
    return port


@dataclass
class InProcess:
    """The pipeline and the outbox of a home, run in this process (profiles and counts)."""

    rt: Runtime
    pipeline: Pipeline
    sender: OutboxSender

    @classmethod
    def open(cls, home: Path, url: str) -> InProcess:
        settings = config.Settings(**{**config.load(home).__dict__, "database_url": url})
        rt = Runtime.open(settings)
        return cls(rt, Pipeline(rt), OutboxSender(rt))

    def spool(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        """(envelope sender, recipient, bytes) stored as the intake would, announced."""
        for mail_from, rcpt, data in items:
            self.pipeline.notify(self.rt.spool.store(data, SpoolEnvelope.for_message(
                data, mail_from=mail_from, rcpt_tos=(rcpt,), peer="127.0.0.1",
                helo="bench.example")))

    def close(self) -> None:
        self.sender.close()
        self.rt.close()


class Broker:
    """`broker serve` processes for one layout; stopped with SIGTERM, waited for."""

    def __init__(self, home: Path, url: str, layout: str, logs: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        env = {**os.environ, "BROKER_HOME": str(home), "BROKER_DATABASE_URL": url}
        for k, roles in enumerate(LAYOUTS[layout]):
            args = [sys.executable, "-m", "broker.cli.main", "serve", "--log-level", "WARNING"]
            for r in roles:
                args += [r] if r.startswith("--") else ["--role", r]
            log = logs / f"serve{k}.log"
            self.logs.append(log)
            self.procs.append(subprocess.Popen(args, env=env, cwd=REPO,
                                               stderr=log.open("wb")))
        deadline = time.monotonic() + 60
        for p, log in zip(self.procs, self.logs, strict=True):
            while "broker serving" not in log.read_text(errors="replace"):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"broker did not start:\n{log.read_text()}")
                time.sleep(0.05)

    def pids(self) -> dict[str, int]:
        """Every broker process by a readable name (the worker `broker serve` starts too)."""
        out: dict[str, int] = {}
        for k, p in enumerate(self.procs):
            out[f"proc{k}"] = p.pid
            for child in children(p.pid):
                # broker serve's worker processes: the pipeline's and the outbox's.
                out[f"proc{k}.{worker_name(child)}"] = child
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def errors(self) -> list[str]:
        """ERROR lines the broker logged (a bench that hid them would mislead)."""
        return [line for log in self.logs for line in log.read_text(errors="replace")
                .splitlines() if " ERROR " in line]


def children(pid: int) -> list[int]:
    """Child processes (Linux /proc)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def worker_name(pid: int) -> str:
    """"outbox" for broker serve's outbox process, "worker" for its pipeline's."""
    with contextlib.suppress(OSError):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"outbox" in args:
            return "outbox"
    return "worker"


def vm_kib(pid: int, field_name: str = "VmHWM") -> int:
    """VmHWM (peak RSS) or VmRSS of a process in KiB, 0 if it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def proc_cpu(pid: int) -> float:
    """User+system CPU seconds of a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def default_tmpdir() -> str:
    """/var/tmp where it exists: disk-backed like a real spool (see bench/intake.py)."""
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


# -- mail -----------------------------------------------------------------------------------

PARAGRAPHS = (
    "Sam attended twelve sessions this term. Progress with handwriting has been steady, "
    "and the home practice sheets were returned most weeks.",
    "Sam now uses two-step instructions in class without prompting and asks for help when "
    "a task is unclear; fatigue shows late in the afternoon.",
    "Recommendations for school: seat Sam near the front, check understanding after "
    "instructions, and allow extra processing time before expecting an answer.",
    "Sam mentioned family conflict at home during the session; we talked about what helps "
    "when mornings are hard.",
    "Fine motor: pencil grip improved with the triangular grip; letter sizing is still "
    "uneven on unlined paper. A slant board is recommended in class.",
)


def record(n: int, size: int = 10 * 1024, *,
           attachments: Sequence[tuple[str, str, bytes]] = ()) -> bytes:
    """A provider's report of about ``size`` bytes of prose, tagged bench-N in the Subject."""
    msg = EmailMessage()
    msg["From"] = f"Dr. Lee <{PROVIDER}>"
    msg["To"] = CHILD_ADDR
    msg["Subject"] = f"OT progress report bench-{n:06d}"
    msg["Message-ID"] = email.utils.make_msgid(domain="clinic.example")
    msg["Date"] = email.utils.formatdate()
    paras: list[str] = []
    k = 0
    while sum(len(p) + 2 for p in paras) < size - 600:
        paras.append(f"{PARAGRAPHS[k % len(PARAGRAPHS)]} (note {k + 1})")
        k += 1
    msg.set_content("\n\n".join(paras) + "\n")
    for name, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=policy.SMTP)


def approval(review: Review, text_: str = "APPROVE") -> bytes:
    """The guardian's reply to a review request, as tests/test_story_approve.py sends it."""
    msg = EmailMessage()
    msg["From"] = f"Dana Rivera <{GUARDIAN}>"
    msg["To"] = review.token_addr
    msg["Subject"] = "Re: review"
    msg["In-Reply-To"] = review.message_id
    msg["References"] = review.message_id
    msg["Message-ID"] = email.utils.make_msgid(domain="home.example")
    msg["Date"] = email.utils.formatdate()
    msg.set_content(text_ + "\n")
    return msg.as_bytes(policy=policy.SMTP)


# -- the paced sender -------------------------------------------------------------------------


@dataclass
class Job:
    """One message to send at ``due`` (monotonic clock); ``acked`` is when 250 came back."""

    key: int
    mail_from: str
    rcpt: str
    data: bytes
    due: float = 0.0
    started: float = 0.0
    acked: float = 0.0


class SMTPError(Exception):
    """The broker answered something other than the expected code."""


async def _expect(reader: asyncio.StreamReader, code: int) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            break
    if int(line[:3]) != code:
        raise SMTPError(f"expected {code}, got {line!r}")


async def _connection(port: int, queue: asyncio.Queue[Job | None]) -> None:
    """One persistent SMTP session sending whatever the queue hands it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _expect(reader, 220)
        writer.write(b"EHLO bench.example\r\n")
        await _expect(reader, 250)
        while (job := await queue.get()) is not None:
            job.started = time.monotonic()
            body = job.data.replace(b"\r\n.", b"\r\n..")
            writer.write(f"MAIL FROM:<{job.mail_from}> SIZE={len(body)}\r\n".encode())
            await _expect(reader, 250)
            writer.write(f"RCPT TO:<{job.rcpt}>\r\n".encode())
            await _expect(reader, 250)
            writer.write(b"DATA\r\n")
            await _expect(reader, 354)
            writer.write(body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n")
            await writer.drain()
            await _expect(reader, 250)
            job.acked = time.monotonic()
        writer.write(b"QUIT\r\n")
        await _expect(reader, 221)
    finally:
        writer.close()


async def send_paced(port: int, jobs: Sequence[Job], rate: float, connections: int,
                     start: float | None = None) -> None:
    """Open loop: job i is due at start + i/rate whatever the broker's answers; a job
    waits only for a free connection (so the latency counted from `due` includes any
    queueing in front of a slow intake)."""
    queue: asyncio.Queue[Job | None] = asyncio.Queue()
    senders = [asyncio.create_task(_connection(port, queue)) for _ in range(connections)]
    t0 = start if start is not None else time.monotonic() + 0.2
    for i, job in enumerate(jobs):
        job.due = t0 + i / rate
        delay = job.due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(job)
    for _ in senders:
        queue.put_nowait(None)
    await asyncio.gather(*senders)


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.2) -> bool:
    """Poll until the predicate is true or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return bool(predicate())


WARM_KEY = 900_000  # bench tags of the warm-up records, apart from the measured ones


def warm_up(port: int, relay: Relay, count: int, size: int, connections: int,
            timeout: float) -> None:
    """A few records sent and approved, unmeasured: the first ones pay for imports, caches
    and connections that a running daemon has long paid for."""
    if not count:
        return
    jobs = [Job(WARM_KEY + k, PROVIDER, CHILD_ADDR, record(WARM_KEY + k, size))
            for k in range(count)]
    asyncio.run(send_paced(port, jobs, 10.0, connections))
    keys = {j.key for j in jobs}

    def reviewed() -> dict[int, Review]:
        return {k: r for k, r in reviews(relay.recorder.snapshot()).items() if k in keys}

    wait_until(lambda: len(reviewed()) >= len(keys), timeout)
    approvals = [Job(k, GUARDIAN, r.token_addr, approval(r)) for k, r in reviewed().items()]
    asyncio.run(send_paced(port, approvals, 10.0, connections))
    wait_until(lambda: sum(1 for k, v in releases(relay.recorder.snapshot()).items()
                           if k in keys and len(v) >= len(SCHOOL)) >= len(approvals), timeout)


# -- figures --------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


@dataclass
class Dist:
    """Latency figures of one run, in seconds."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        return cls(len(values), pct(values, 50), pct(values, 95), pct(values, 99),
                   max(values) if values else float("nan"))

    def row(self) -> str:
        return (f"p50 {self.p50 * 1000:7.0f} ms  p95 {self.p95 * 1000:7.0f} ms  "
                f"p99 {self.p99 * 1000:7.0f} ms  max {self.max * 1000:7.0f} ms  (n={self.n})")


def median_dist(runs: Sequence[Dist]) -> Dist:
    """Per-figure median over rounds."""
    return Dist(int(statistics.median(d.n for d in runs)),
                *(statistics.median(getattr(d, f) for d in runs)
                  for f in ("p50", "p95", "p99", "max")))
