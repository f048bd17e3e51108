"""Intake throughput: broker SMTP intake vs a bare aiosmtpd sink, measured in the same run.

Both servers run as their own subprocesses; the two are interleaved over several rounds (order
alternating) so drift on the machine hits both. The client is a minimal asyncio SMTP client in
this process (one plain MAIL/RCPT/DATA exchange per message, no library overhead); its CPU use is
printed so you can see it is not the bottleneck (it should stay well under one core).

    .venv/bin/python bench/intake.py [--count 3000] [--concurrency 10] [--rounds 3] [--size 10240]

``--broker-cmd`` points (b) at another command, e.g. the full ``broker serve``; placeholders
``{python}``, ``{port}`` and ``{home}`` (an empty temporary directory) are filled in. The target
must listen on 127.0.0.1:{port} and accept mail for sam@records.example.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
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
DEFAULT_BROKER_CMD = (
    "{python} -m broker.intake.smtp --spool {home}/spool --domain records.example"
    " --slug sam --port {port}"
)
SERVE_CMD = "{python} " + shlex.quote(str(Path(__file__).with_name("_serve_target.py"))) + (
    " --home {home} --port {port}"
)
DEFAULT_SINK_CMD = "{python} " + shlex.quote(str(Path(__file__).with_name("_sink.py"))) + (
    " --port {port}"
)


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
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
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


def _proc_cpu(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc), to show where the time goes."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    rate: float
    client_cpu: float  # fraction of one core
    server_cpu: float  # fraction of one core


class Target:
    """A server subprocess started from a command template and waited on until it greets."""

    def __init__(self, name: str, template: str, tmpdir: str | None = None) -> None:
        self.name = name
        self.home = tempfile.TemporaryDirectory(prefix=f"bench-{name}-", dir=tmpdir)
        self.port = _free_port()
        cmd = template.format(python=shlex.quote(sys.executable), port=self.port,
                              home=shlex.quote(self.home.name))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(shlex.split(cmd), cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(3) == b"220":
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not start listening on port {self.port}")

    def run(self, message: bytes, count: int, concurrency: int) -> Result:
        cpu0, srv0, t0 = time.process_time(), _proc_cpu(self.proc.pid), time.perf_counter()
        sent = asyncio.run(_blast(self.port, message, count, concurrency))
        wall = time.perf_counter() - t0
        cpu, srv = time.process_time() - cpu0, _proc_cpu(self.proc.pid) - srv0
        if sent != count:
            raise RuntimeError(f"{self.name}: sent {sent} of {count}")
        return Result(count / wall, cpu / wall, srv / wall)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.home.cleanup()


def probe_create_cost(tmpdir: str, n: int = 100) -> float:
    """CPU seconds to create and write one 10 KB file in ``tmpdir``.

    The spool creates two files per message, the sink none, so a slow file system skews the
    ratio. Seen on this project's CI VM: ext4 without a journal re-checks recently deleted
    inodes on every create, so right after a mass deletion near ``tmpdir`` (for example a
    previous run's cleanup) creates cost ~0.8 ms instead of ~0.03 ms for a few minutes.
    """
    with tempfile.TemporaryDirectory(prefix="bench-probe-", dir=tmpdir) as d:
        t0 = time.process_time()
        for i in range(n):
            fd = os.open(os.path.join(d, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b"x" * 10240)
            os.close(fd)
        return (time.process_time() - t0) / n


def _default_tmpdir() -> str:
    """/var/tmp where it exists: disk-backed like a real spool (/tmp may be tmpfs, where fsync is
    free, or, on some machines, a directory whose inode group is slow to allocate in after heavy
    churn by other programs)."""
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=3000, help="messages per target per round")
    p.add_argument("--concurrency", type=int, default=10, help="concurrent SMTP sessions")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes")
    p.add_argument("--warmup", type=int, default=200, help="untimed messages per target")
    p.add_argument("--broker-cmd", default=SERVE_CMD,
                   help="command template for the broker (default: the full `broker serve`)")
    p.add_argument("--intake-only", action="store_true",
                   help="also measure the bare intake+spool (no pipeline) as 'intake'")
    p.add_argument("--sink-cmd", default=DEFAULT_SINK_CMD, help=argparse.SUPPRESS)
    p.add_argument("--tmpdir", default=_default_tmpdir(),
                   help="where the targets' temporary homes (the spool) go (default: %(default)s)")
    p.add_argument("--also", action="append", default=[], metavar="NAME=CMD",
                   help="another target interleaved with the two (e.g. a variant to compare)")
    args = p.parse_args(argv)

    message = make_message(args.size)
    print(f"intake bench: {args.count} x {len(message)} B messages, {args.concurrency} sessions,"
          f" spool under {args.tmpdir},"
          f" {args.rounds} rounds, {os.cpu_count()} CPUs")
    create = probe_create_cost(args.tmpdir)
    print(f"file create+write in {args.tmpdir}: {create * 1e6:.0f} us CPU"
          + ("  (slow: broker figures are pessimistic, see probe_create_cost)"
             if create > 200e-6 else ""))
    specs = [("sink", args.sink_cmd), ("broker", args.broker_cmd)]
    if args.intake_only:
        specs.append(("intake", DEFAULT_BROKER_CMD))
    specs += [tuple(a.split("=", 1)) for a in args.also]  # type: ignore[misc]
    targets: list[Target] = []
    results: dict[str, list[Result]] = {name: [] for name, _ in specs}
    try:
        for name, cmd in specs:
            targets.append(Target(name, cmd, args.tmpdir))
        for t in targets:
            t.run(message, args.warmup, args.concurrency)
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else targets[::-1]
            for t in order:
                results[t.name].append(t.run(message, args.count, args.concurrency))
            print(f"round {r + 1}: " + " | ".join(
                f"{t.name} {results[t.name][-1].rate:7.1f} msg/s"
                f" (client cpu {results[t.name][-1].client_cpu:4.0%},"
                f" server cpu {results[t.name][-1].server_cpu:4.0%})"
                for t in targets))
    finally:
        for t in targets:
            t.close()
    sink = statistics.median(x.rate for x in results["sink"])
    for name, runs in results.items():
        rate = statistics.median(x.rate for x in runs)
        ratios = ", ".join(f"{x.rate / y.rate:.2f}" for x, y in zip(runs, results["sink"],
                                                                     strict=True))
        print(f"median {name}: {rate:.1f} msg/s, ratio {name}/sink {rate / sink:.2f}"
              f" (per round: {ratios})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
