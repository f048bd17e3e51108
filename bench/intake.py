"""Intake throughput: the broker's SMTP intake against bare sinks, measured in the same run.

One command prints a table: message size x concurrent sessions x target, the median msg/s
over several rounds, and the ratio broker / bare aiosmtpd sink. Targets (each its own
subprocess tree, started once, measured interleaved with order alternating per round so
drift on the machine hits all of them):

    aiosmtpd-sink  a bare aiosmtpd server that answers 250 and keeps nothing (bench/_sink.py)
    smtp-sink      Postfix's smtp-sink, a second anchor in C (when /usr/sbin/smtp-sink exists)
    broker         `broker serve` as installed: the intake process answers 250 once the mail
                   is sealed and flushed to the spool; its worker process (pipeline,
                   outbox, scheduler) takes the spool into the database, waiting while
                   the run is a burst (over [smtp] burst_rate, broker.intake.burst)
    broker-noburst (--targets) `broker serve` with [smtp] burst_rate = 0: its worker takes
                   the spool in during a burst instead of waiting for its end
    broker-1proc   `broker serve --single-process`: every role in one process
    broker-intake  (--targets) `broker serve --role intake` with no pipeline anywhere: what
                   the intake alone costs (sealing, flushing, the database-backed RCPT check)
    intake-bare    (--intake-only) the intake alone: spool without sealing, no database

The client is Postfix's smtp-source (C, so it is not what limits the figures) where it is
installed, else a minimal asyncio client in this process (``--client python``). After each
broker run the bench waits for the pipeline to empty the spool, untimed, so no target is
measured while another one's backlog is being worked off; the time that took is printed.

    .venv/bin/python bench/intake.py [--sizes 10240,1048576] [--concurrency 10,50]
                                     [--rounds 3] [--count 3000] [--client smtp-source]

Durable means flushed to the spool's disk, so the spool's file system matters: the bench
prints what one flush costs there (``--tmpdir`` picks where the spool goes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RCPT = "sam@records.example"
SENDER = "ot@clinic.example"
HERE = Path(__file__).resolve().parent
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
# smtp-source adds From, To, Date and Message-Id (about this many bytes) to its -l payload.
SMTP_SOURCE_HEADERS = 110

TEMPLATES = {
    "aiosmtpd-sink": "{python} " + shlex.quote(str(HERE / "_sink.py")) + " --port {port}",
    # -u: smtp-sink refuses to run as root without a user to switch to.
    "smtp-sink": SMTP_SINK + (" -u nobody" if os.geteuid() == 0 else "") + " 127.0.0.1:{port} 256",
    "broker": "{python} " + shlex.quote(str(HERE / "_serve_target.py"))
    + " --home {home} --port {port}",
    "broker-noburst": "{python} " + shlex.quote(str(HERE / "_serve_target.py"))
    + " --home {home} --port {port} --burst-rate 0",
    "broker-1proc": "{python} " + shlex.quote(str(HERE / "_serve_target.py"))
    + " --home {home} --port {port} --single-process",
    "broker-intake": "{python} " + shlex.quote(str(HERE / "_serve_target.py"))
    + " --home {home} --port {port} --role intake",
    "intake-bare": "{python} -m broker.intake.smtp --spool {home}/spool --domain records.example"
    " --slug sam --port {port}",
}
# Where each target's spool is, to wait for the pipeline between runs (None: nothing to wait).
SPOOLS = {"broker": "broker/spool", "broker-noburst": "broker/spool",
          "broker-1proc": "broker/spool"}


def make_message(size: int) -> bytes:
    """A plain-text message of about ``size`` bytes, CRLF lines, nothing needing dot-stuffing."""
    head = (
        f"From: OT <{SENDER}>\r\nTo: {RCPT}\r\nSubject: weekly OT note\r\n"
        "Message-ID: <bench@clinic.example>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    line = b"Sam practised handwriting and scissor skills; progress is steady this week.\r\n"
    body = line * max(1, (size - len(head)) // len(line) + 1)
    msg = (head + body)[: max(size, len(head) + 4) - 2]
    return msg.rstrip(b"\r\n").ljust(len(msg), b".") + b"\r\n"


class SMTPError(Exception):
    """The target answered something other than the expected code."""


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one (possibly multi-line) SMTP reply."""
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), line


async def _expect(reader: asyncio.StreamReader, code: int) -> None:
    got, line = await _reply(reader)
    if got != code:
        raise SMTPError(f"expected {code}, got {line!r}")


async def _session(port: int, message: bytes, quota: list[int]) -> int:
    """One SMTP session sending messages until the shared quota is used up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    sent = 0
    try:
        await _expect(reader, 220)
        writer.write(b"EHLO bench.example\r\n")
        await _expect(reader, 250)
        envelope = f"MAIL FROM:<{SENDER}> SIZE={len(message)}\r\n".encode()
        rcpt = f"RCPT TO:<{RCPT}>\r\n".encode()
        payload = message + b".\r\n"
        while quota[0] > 0:
            quota[0] -= 1
            writer.write(envelope)
            await _expect(reader, 250)
            writer.write(rcpt)
            await _expect(reader, 250)
            writer.write(b"DATA\r\n")
            await _expect(reader, 354)
            writer.write(payload)
            await _expect(reader, 250)
            sent += 1
        writer.write(b"QUIT\r\n")
        await _expect(reader, 221)
    finally:
        writer.close()
    return sent


async def _blast(port: int, message: bytes, count: int, concurrency: int) -> int:
    quota = [count]
    results = await asyncio.gather(*(_session(port, message, quota) for _ in range(concurrency)))
    return sum(results)


def python_client(port: int, size: int, count: int, concurrency: int) -> None:
    """Send ``count`` messages over ``concurrency`` sessions with the asyncio client."""
    sent = asyncio.run(_blast(port, make_message(size), count, concurrency))
    if sent != count:
        raise RuntimeError(f"sent {sent} of {count}")


def smtp_source_client(port: int, size: int, count: int, concurrency: int) -> None:
    """The same with Postfix's smtp-source: one connection per session kept open (-d), and
    any reply but the expected one aborts it (non-zero exit)."""
    cmd = [SMTP_SOURCE, "-d", "-s", str(concurrency), "-m", str(count),
           "-l", str(max(1, size - SMTP_SOURCE_HEADERS)), "-f", SENDER, "-t", RCPT,
           "-M", "bench.example", f"127.0.0.1:{port}"]
    done = subprocess.run(cmd, capture_output=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-500:]}")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree_cpu(pid: int) -> float:
    """User+system CPU seconds of a process and its descendants (Linux /proc)."""
    kids, total, todo = _children(), 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        todo += kids.get(p, [])
    return total


@dataclass
class Result:
    rate: float  # messages per second
    server_cpu_ms: float  # CPU of the target's process tree per message
    drain: float  # seconds until the pipeline had emptied the spool afterwards


class Target:
    """A server subprocess tree started from a command template, ready once it greets."""

    def __init__(self, name: str, template: str, tmpdir: str | None = None) -> None:
        self.name = name
        self.home = tempfile.TemporaryDirectory(prefix=f"bench-{name}-", dir=tmpdir)
        os.chmod(self.home.name, 0o755)  # smtp-sink drops to nobody
        self.port = _free_port()
        cmd = template.format(python=shlex.quote(sys.executable), port=self.port,
                              home=shlex.quote(self.home.name))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.log = open(Path(self.home.name) / "target.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(shlex.split(cmd), cwd=REPO, env=env,
                                     stdout=self.log, stderr=self.log, start_new_session=True)
        spool = SPOOLS.get(name)
        self.spool = Path(self.home.name) / spool if spool else None
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (Path(self.home.name) / "target.log").read_bytes()[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + log.decode(errors="replace"))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(3) == b"220":
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not start listening on port {self.port}")

    def backlog(self) -> int:
        if self.spool is None or not self.spool.is_dir():
            return 0
        return sum(1 for n in os.listdir(self.spool) if n.endswith(".eml"))

    def drain(self, timeout: float = 900.0) -> float:
        """Wait (untimed for the rate) until the pipeline emptied the spool; seconds taken."""
        t0 = time.monotonic()
        while self.backlog() and time.monotonic() - t0 < timeout:
            time.sleep(0.2)
        return time.monotonic() - t0

    def run(self, client: str, size: int, count: int, concurrency: int,
            drain: bool = True) -> Result:
        send = smtp_source_client if client == "smtp-source" else python_client
        srv0, t0 = _tree_cpu(self.proc.pid), time.perf_counter()
        send(self.port, size, count, concurrency)
        wall = time.perf_counter() - t0
        srv = _tree_cpu(self.proc.pid) - srv0
        return Result(count / wall, srv / count * 1e3, self.drain() if drain else 0.0)

    def close(self) -> None:
        """Stop the leader first (the broker stops before its relay), then whatever is left."""
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.log.close()
        self.home.cleanup()


def probe_disk(tmpdir: str, rounds: int = 50) -> tuple[float, float]:
    """(CPU seconds to create and write one 10 KB file, wall seconds of one durable flush)
    in ``tmpdir``: the two costs the spool adds per message and per batch.

    Seen on this project's CI VM: ext4 without a journal re-checks recently deleted inodes on
    every create, so right after a mass deletion near ``tmpdir`` (for example a previous run's
    cleanup) creates cost ~0.8 ms instead of ~0.03 ms for a few minutes."""
    with tempfile.TemporaryDirectory(prefix="bench-probe-", dir=tmpdir) as d:
        cpu, flushes = 0.0, []
        for i in range(rounds):
            t0 = time.process_time()
            fd = os.open(os.path.join(d, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b"x" * 10240)
            cpu += time.process_time() - t0
            t1 = time.perf_counter()
            os.fsync(fd)
            flushes.append(time.perf_counter() - t1)
            os.close(fd)
        return cpu / rounds, statistics.median(flushes)


def _default_tmpdir() -> str:
    """/var/tmp where it exists: disk-backed like a real spool (/tmp may be tmpfs, where fsync is
    free, or, on some machines, a directory whose inode group is slow to allocate in after heavy
    churn by other programs)."""
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _size_label(size: int) -> str:
    return f"{size // (1 << 20)} MB" if size >= 1 << 20 else f"{size // 1024} KB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_ints, default=[10 * 1024, 1 << 20],
                   help="message sizes in bytes, comma-separated (default: 10 KB and 1 MB)")
    p.add_argument("--concurrency", type=_ints, default=[10, 50],
                   help="concurrent SMTP sessions, comma-separated (default: 10,50)")
    p.add_argument("--count", type=int, default=1000, help="messages per run (small mail)")
    p.add_argument("--max-mb", type=int, default=100,
                   help="cap on megabytes per run: large mail gets fewer messages")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=200, help="untimed messages per target")
    p.add_argument("--client", choices=["smtp-source", "python"],
                   default="smtp-source" if os.access(SMTP_SOURCE, os.X_OK) else "python")
    p.add_argument("--targets", default=None,
                   help="comma-separated subset of: " + ", ".join(TEMPLATES))
    p.add_argument("--intake-only", action="store_true",
                   help="also measure the bare intake (no sealing, no database) as intake-bare")
    p.add_argument("--no-drain", action="store_true",
                   help="do not wait for the pipeline between runs (its backlog then competes"
                   " with the next runs)")
    p.add_argument("--tmpdir", default=_default_tmpdir(),
                   help="where the targets' temporary homes (the spool) go (default: %(default)s)")
    p.add_argument("--also", action="append", default=[], metavar="NAME=CMD",
                   help="another target command ({python}, {port}, {home} filled in)")
    args = p.parse_args(argv)
    # A SIGTERM must still stop the targets (they run in sessions of their own).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    names = (args.targets.split(",") if args.targets else
             ["aiosmtpd-sink", "smtp-sink", "broker", "broker-1proc"])
    if args.intake_only and "intake-bare" not in names:
        names.append("intake-bare")
    if "smtp-sink" in names and not os.access(SMTP_SINK, os.X_OK):
        print(f"no {SMTP_SINK} (Debian: apt-get install postfix): smtp-sink left out")
        names.remove("smtp-sink")
    templates = {n: TEMPLATES[n] for n in names}
    templates.update(dict(a.split("=", 1) for a in args.also))
    if "aiosmtpd-sink" not in templates:
        p.error("aiosmtpd-sink is the reference the ratios are taken against")

    create, flush = probe_disk(args.tmpdir)
    print(f"intake bench: sizes {args.sizes}, sessions {args.concurrency}, {args.rounds} rounds,"
          f" client {args.client}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"spool under {args.tmpdir}: file create+write {create * 1e6:.0f} us CPU, one fsync"
          f" {flush * 1e3:.2f} ms"
          + ("  (slow creates: broker figures are pessimistic, see probe_disk)"
             if create > 200e-6 else ""))
    targets: list[Target] = []
    cells: dict[tuple[int, int], dict[str, list[Result]]] = {}
    try:
        for name, cmd in templates.items():
            targets.append(Target(name, cmd, args.tmpdir))
        for t in targets:
            t.run(args.client, 10 * 1024, args.warmup, min(args.concurrency))
        for size in args.sizes:
            count = max(min(args.count, args.max_mb * (1 << 20) // size), 2 * max(args.concurrency))
            for conc in args.concurrency:
                results: dict[str, list[Result]] = {t.name: [] for t in targets}
                cells[(size, conc)] = results
                for r in range(args.rounds):
                    for t in targets if r % 2 == 0 else targets[::-1]:
                        results[t.name].append(
                            t.run(args.client, size, count, conc, not args.no_drain))
                    print(f"{_size_label(size)} x {conc} ({count} msgs) round {r + 1}: "
                          + " | ".join(f"{t.name} {results[t.name][-1].rate:.0f}/s"
                                       for t in targets), flush=True)
    finally:
        for t in targets:
            t.close()

    names = [t.name for t in targets]
    print()
    print("median msg/s over rounds (server CPU ms per message); ratio = target / aiosmtpd-sink")
    header = f"{'size':>6} {'sess':>4} " + " ".join(f"{n:>20}" for n in names) + "   ratios"
    print(header)
    for (size, conc), results in cells.items():
        med = {n: statistics.median(x.rate for x in results[n]) for n in names}
        cpu = {n: statistics.median(x.server_cpu_ms for x in results[n]) for n in names}
        ratios = ", ".join(f"{n} {med[n] / med['aiosmtpd-sink']:.2f}"
                           for n in names if n != "aiosmtpd-sink")
        print(f"{_size_label(size):>6} {conc:>4} "
              + " ".join(f"{med[n]:>10.0f} ({cpu[n]:6.2f})" for n in names) + f"   {ratios}")
    drains = [(n, x.drain) for results in cells.values() for n in names for x in results[n]
              if n in SPOOLS]
    if drains:
        print("pipeline catch-up after a run (s, untimed): " + ", ".join(
            f"{n} max {max(d for m, d in drains if m == n):.1f}" for n in dict(drains)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
