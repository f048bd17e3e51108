"""Large mail does not stall small mail (issue 7, benchmark 3; aiosmtpd issue 293).

Target: while a 25 MB record with a 20-page PDF is received and processed, 10 KB records
keep p99 < 1 s from send to review request; the broker's peak RSS stays under 3x the
largest message in flight plus a fixed base.

Each round starts a fresh home and `broker serve` (--layout, see bench/_broker.py) with an
aiosmtpd relay in this process that timestamps what it accepts. After a warm-up, a paced
stream of 10 KB records runs for --duration s; --large-at s into it, --large-count large
records (a 20-page report PDF whose pages carry scanned-page JPEGs, the whole mail just
under the size limit with base64) are sent on their own connection, --large-gap s apart.
Small-record latency (due -> review request at the relay) is printed before, during
(from the first large send to the last large review request) and after; the large ones'
SMTP time and send -> review request; and each broker process's VmHWM (peak RSS) just
before the first large send (the small-mail baseline) and at the end.

    .venv/bin/python bench/large_mail.py [--rate 10] [--duration 30] [--large-count 1]
        [--rounds 1] [--pg URL] [--layout serve|single|split|split2]
    .venv/bin/python bench/large_mail.py --trace    # Python allocations at the peak
    .venv/bin/python bench/large_mail.py --stages   # resident memory by pipeline step
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _broker as B

LARGE_KEY = 800_000  # bench tags of the large records
SMALL_P99_TARGET = 1.0
PAGE_TEXT = (
    "Sam attended twelve sessions this term. Progress with articulation has been steady, "
    "and the home practice sheets were returned most weeks.",
    "Recommendations for school: seat Sam near the front, check understanding after "
    "instructions, and allow extra processing time before expecting an answer.",
    "Parents mentioned the family conflict during the call; the scanned notes follow.",
)


def scanned_report(pages: int, scan_bytes: int, seed: int = 7) -> bytes:
    """A report PDF: each page a heading, a few paragraphs and a scanned-note JPEG of
    about ``scan_bytes`` (noise, so it does not compress: the size is what it says)."""
    from fpdf import FPDF
    from PIL import Image

    rnd = random.Random(seed)
    side = int((scan_bytes / 0.84) ** 0.5)  # ~0.84 bytes per pixel, grey noise at q92
    pdf = FPDF(format="A4")
    pdf.set_margins(20, 20, 20)
    for n in range(pages):
        pdf.add_page()
        pdf.set_font("Helvetica", style="B", size=16)
        pdf.multi_cell(0, 8, f"Section {n + 1}: observations")
        pdf.ln(4)
        pdf.set_font("Helvetica", size=11)
        for para in PAGE_TEXT:
            pdf.multi_cell(0, 6, para)
            pdf.ln(3)
        img = Image.frombytes("L", (side, side), rnd.randbytes(side * side))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        buf.seek(0)
        pdf.image(buf, x=20, y=110, w=170)
    return bytes(pdf.output())


def large_record(n: int, limit: int, pages: int) -> bytes:
    """A record with the scanned report, sized to end just under ``limit`` bytes."""
    target = limit - 64 * 1024
    scan = int(target * 0.75 * 76 / 78) // pages  # base64 with CRLF every 76 bytes
    for _ in range(4):  # JPEG sizes are only roughly predictable: measure and rescale
        pdf = scanned_report(pages, scan)
        data = B.record(n, 10 * 1024,
                        attachments=[("annual-review.pdf", "application/pdf", pdf)])
        if target * 0.97 <= len(data) <= limit:
            return data
        scan = int(scan * target / len(data))
    raise SystemExit(f"could not size the large record under {limit} bytes ({len(data)})")


def retag(data: bytes, k: int) -> bytes:
    """The k-th copy of the large record: its own bench tag and Message-ID (a repeated
    Message-ID would be a resend of the same record)."""
    if k == 0:
        return data
    head, sep, body = data.partition(b"\r\n\r\n")
    head = head.replace(f"bench-{LARGE_KEY:06d}".encode(), f"bench-{LARGE_KEY + k:06d}".encode())
    head = head.replace(b"Message-ID: <", f"Message-ID: <large{k}.".encode(), 1)
    return head + sep + body


@dataclass
class SinkAnchor:
    """The large record sent to a bare aiosmtpd sink (bench/_sink.py, its own process):
    what receiving it costs without the broker, in time and in peak memory."""

    seconds: float  # median SMTP time, first byte to 250
    grew_kib: int  # the sink's VmHWM growth over its small-mail baseline


def sink_anchor(data: bytes, times: int = 3) -> SinkAnchor:
    """See SinkAnchor: a small message first sets the baseline, as for the broker."""
    import subprocess

    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_sink.py"))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            raise SystemExit(f"sink did not start: {line!r}")
        port = int(line.split()[2])
        small = B.Job(0, B.PROVIDER, B.CHILD_ADDR, B.record(0))
        queue0: asyncio.Queue[B.Job | None] = asyncio.Queue()
        queue0.put_nowait(small)
        queue0.put_nowait(None)
        asyncio.run(B._connection(port, queue0))
        base = B.vm_kib(proc.pid)
        out = []
        for _ in range(times):
            job = B.Job(0, B.PROVIDER, B.CHILD_ADDR, data)
            queue: asyncio.Queue[B.Job | None] = asyncio.Queue()
            queue.put_nowait(job)
            queue.put_nowait(None)
            asyncio.run(B._connection(port, queue))
            out.append(job.acked - job.started)
        return SinkAnchor(statistics.median(out), B.vm_kib(proc.pid) - base)
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Round:
    small_before: B.Dist
    small_during: B.Dist
    small_after: B.Dist
    small_all: B.Dist
    intake_before: B.Dist        # due -> 250 from the broker, small records
    intake_during: B.Dist
    missing_small: int
    large_size: int
    large_smtp: list[float]      # seconds from the first byte to 250
    large_review: list[float]    # due -> review request (NaN if none came)
    window: float                # seconds from the first large send to the last review
    rss: dict[str, tuple[int, int, int]]  # name -> (baseline VmHWM, peak VmHWM, end VmRSS) KiB
    errors: list[str]
    load: float


async def _stream(port: int, small: list[B.Job], large: list[B.Job], args: argparse.Namespace,
                  pids: dict[str, int], base: dict[str, int]) -> None:
    """The paced small stream and, on a connection of their own, the large records."""
    t0 = time.monotonic() + 0.2

    async def large_sends() -> None:
        for k, job in enumerate(large):
            job.due = t0 + args.large_at + k * args.large_gap
            await asyncio.sleep(max(0.0, job.due - time.monotonic()))
            if k == 0:
                base.update({name: B.vm_kib(pid) for name, pid in pids.items()})
            queue: asyncio.Queue[B.Job | None] = asyncio.Queue()
            queue.put_nowait(job)
            queue.put_nowait(None)
            await B._connection(port, queue)

    await asyncio.gather(B.send_paced(port, small, args.rate, args.connections, start=t0),
                         large_sends())


def run_round(args: argparse.Namespace, large_data: bytes) -> Round:
    count = int(args.rate * args.duration)
    with tempfile.TemporaryDirectory(prefix="bench-large-", dir=args.tmpdir) as tmp, \
            B.database(args.pg, Path(tmp)) as url, B.Relay() as relay:
        home = Path(tmp) / "home"
        port = B.make_home(home, url, relay.port, pgp_key=not args.no_pgp_key)
        broker = B.Broker(home, url, args.layout, Path(tmp))
        try:
            B.warm_up(port, relay, args.warmup, 10 * 1024, args.connections, args.drain)
            pids = broker.pids()
            small = [B.Job(n, B.PROVIDER, B.CHILD_ADDR, B.record(n)) for n in range(count)]
            large = [B.Job(LARGE_KEY + k, B.PROVIDER, B.CHILD_ADDR, retag(large_data, k))
                     for k in range(args.large_count)]
            base: dict[str, int] = {}
            asyncio.run(_stream(port, small, large, args, pids, base))
            want = {j.key for j in small + large}
            B.wait_until(lambda: want <= set(B.reviews(relay.recorder.snapshot())), args.drain)
            got = B.reviews(relay.recorder.snapshot())
            rss = {name: (base.get(name, 0), B.vm_kib(pid), B.vm_kib(pid, "VmRSS"))
                   for name, pid in pids.items()}
        finally:
            broker.stop()
        start = min(j.due for j in large)
        reviewed_large = [got[j.key].at for j in large if j.key in got]
        end = max(reviewed_large) if reviewed_large else max(j.acked for j in large)
        lat = {j.key: got[j.key].at - j.due for j in small if j.key in got}
        before = [j.key for j in small if j.due < start]
        during = [j.key for j in small if start <= j.due <= end]
        after = [j.key for j in small if j.due > end]
        return Round(
            small_before=B.Dist.of([lat[k] for k in before if k in lat]),
            small_during=B.Dist.of([lat[k] for k in during if k in lat]),
            small_after=B.Dist.of([lat[k] for k in after if k in lat]),
            small_all=B.Dist.of(list(lat.values())),
            intake_before=B.Dist.of([j.acked - j.due for j in small if j.due < start]),
            intake_during=B.Dist.of([j.acked - j.due for j in small if start <= j.due <= end]),
            missing_small=len(small) - len(lat),
            large_size=len(large_data),
            large_smtp=[j.acked - j.started for j in large],
            large_review=[got[j.key].at - j.due if j.key in got else float("nan")
                          for j in large],
            window=end - start, rss=rss, errors=broker.errors(), load=os.getloadavg()[0],
        )


def print_round(r: Round, label: str, anchor: SinkAnchor) -> None:
    sink = anchor.seconds
    mb = r.large_size / 1e6
    print(f"{label}: large record {mb:.1f} MB; window from first large send to last large "
          f"review request {r.window:.1f} s; load average {r.load:.1f}"
          + (f"; {len(r.errors)} ERROR log lines" if r.errors else ""))
    for line in dict.fromkeys(e.split(" ERROR ", 1)[1] for e in r.errors[:50]):
        print(f"    broker ERROR: {line[:160]}")
    print(f"  small, before large       {r.small_before.row()}")
    print(f"  small, during large       {r.small_during.row()}")
    print(f"  small, after large        {r.small_after.row()}")
    print(f"  small, all                {r.small_all.row()}"
          + (f"  MISSING {r.missing_small}" if r.missing_small else ""))
    print(f"  small SMTP 250, before    {r.intake_before.row()}")
    print(f"  small SMTP 250, during    {r.intake_during.row()}")
    for k, (smtp, review) in enumerate(zip(r.large_smtp, r.large_review, strict=True)):
        print(f"  large #{k + 1}: SMTP {smtp:.2f} s (bare sink {sink:.2f} s, ratio "
              f"{smtp / sink:.1f}), send -> review request {review:.2f} s")
    print("  peak RSS per broker process (VmHWM): baseline (small mail only) -> end;"
          f" allowance 3 x largest message = {3 * mb:.0f} MB")
    sink_grew = anchor.grew_kib / 1024
    print(f"    {'bare sink':12s} +{sink_grew:.0f} MB = {sink_grew * 1.048576 / mb:.1f}x the"
          " message (aiosmtpd alone receiving it: its share of the intake's figure)")
    for name, (base, peak, now) in r.rss.items():
        grew = (peak - base) / 1024
        print(f"    {name:12s} {base / 1024:7.0f} MB -> {peak / 1024:7.0f} MB "
              f"(+{grew:.0f} MB = {grew * 1.048576 / mb:.1f}x the message; RSS now "
              f"{now / 1024:.0f} MB)  {'OK' if grew * 1.048576 <= 3 * mb else 'OVER'}")


@contextlib.contextmanager
def pipeline_home(args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """(runtime, pipeline) of a fresh home and database in this process, one small record
    already taken in (imports and caches warm), for the in-process modes."""
    from broker import config
    from broker.intake.pipeline import Pipeline
    from broker.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="bench-large-", dir=args.tmpdir) as tmp, \
            B.database(args.pg, Path(tmp)) as url, B.Relay() as relay:
        home = Path(tmp) / "home"
        B.make_home(home, url, relay.port, pgp_key=not args.no_pgp_key)
        settings = config.Settings(**{**config.load(home).__dict__, "database_url": url})
        rt = Runtime.open(settings)
        try:
            pipeline = Pipeline(rt)
            pipeline.notify(spool(rt, B.record(1)))
            while pipeline.run_once():
                pass
            yield rt, pipeline
        finally:
            rt.close()


def spool(rt: Any, data: bytes) -> str:
    """``data`` stored in the home's spool as the provider's mail to the child."""
    from broker.intake.spool import Envelope

    return rt.spool.store(data, Envelope.for_message(
        data, mail_from=B.PROVIDER, rcpt_tos=(B.CHILD_ADDR,), peer="127.0.0.1",
        helo="bench.example"))


def trace(args: argparse.Namespace, large_data: bytes) -> int:
    """The pipeline in this process on the large record, three times: timed (and this
    process's VmHWM growth), under cProfile (where the time goes), under tracemalloc
    (which Python allocations make the peak; C libraries such as PDFium are not traced)."""
    import cProfile
    import threading
    import tracemalloc

    with pipeline_home(args) as (rt, pipeline):

        def one(k: int) -> float:
            pipeline.notify(spool(rt, retag(large_data, k + 1)))
            t0 = time.perf_counter()
            while pipeline.run_once():
                pass
            return time.perf_counter() - t0

        hwm0 = B.vm_kib(os.getpid())
        wall = one(0)
        hwm1 = B.vm_kib(os.getpid())
        print(f"pipeline, one {len(large_data) / 1e6:.1f} MB record in this process: {wall:.2f} s;"
              f" VmHWM {hwm0 / 1024:.0f} -> {hwm1 / 1024:.0f} MB "
              f"(+{(hwm1 - hwm0) / 1024:.0f} MB = "
              f"{(hwm1 - hwm0) * 1024 / len(large_data):.1f}x the message)")
        prof = cProfile.Profile()
        prof.enable()
        one(1)
        prof.disable()
        import pstats

        st = pstats.Stats(prof)
        rows = sorted(st.stats.items(), key=lambda kv: kv[1][3], reverse=True)  # type: ignore[attr-defined]
        own = str(B.REPO / "broker") + os.sep
        print("  cProfile, the broker's own functions by cumulative time (s):")
        for (path, line, func), (_cc, nc, _tt, ct, _callers) in [
                kv for kv in rows if kv[0][0].startswith(own)][:args.top]:
            print(f"    {ct:7.2f} s  {nc:6d} calls  {func} ({path[len(str(B.REPO)) + 1:]}:{line})")
        print("  cProfile, top self time (s):")
        for (path, line, func), (_cc, nc, tt, _ct, _callers) in sorted(
                st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]:  # type: ignore[attr-defined]
            print(f"    {tt:7.2f} s  {nc:6d} calls  {func} ({Path(path).name}:{line})")

        tracemalloc.start(40)
        best: list[object] = [0, None]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                cur = tracemalloc.get_traced_memory()[0]
                if cur > int(best[0]) * 1.05:  # type: ignore[call-overload]
                    best[:] = [cur, tracemalloc.take_snapshot()]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        one(2)
        done.set()
        sampler.join()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"  tracemalloc: Python peak {peak / 1e6:.0f} MB "
              f"({peak / len(large_data):.1f}x the message); at the largest sample "
              f"({int(best[0]) / 1e6:.0f} MB) the biggest live allocations:")  # type: ignore[call-overload]
        snap = best[1]
        if isinstance(snap, tracemalloc.Snapshot):
            own = str(B.REPO / "broker")
            for stat in snap.statistics("traceback")[:10]:
                frame = stat.traceback[-1]  # the allocating line (most recent call last)
                caller = next((f for f in reversed(stat.traceback)
                               if f.filename.startswith(own)), None)
                where = (f" <- {caller.filename[len(str(B.REPO)) + 1:]}:{caller.lineno}"
                         if caller else "")
                print(f"    {stat.size / 1e6:7.1f} MB  {stat.count:7d} blocks  "
                      f"{Path(frame.filename).name}:{frame.lineno}{where}")
    return 0


# The pipeline's steps that --stages names, as (module, owner, function): RSS samples are
# labelled with the innermost of these running at the time.
STAGES = (
    ("broker.intake.spool", "Spool", "read"),
    ("broker.intake.spool", "Spool", "read_buffer"),
    ("broker.intake.pipeline", "Pipeline", "_store_large"),
    ("broker.intake.pipeline", "Pipeline", "_parse_large"),
    ("broker.intake.pipeline", "Pipeline", "_take_in_batch"),
    ("broker.intake.pipeline", "", "parse_message"),
    ("broker.intake.pipeline", "", "document_to_bytes"),
    ("broker.mail.parse", "", "_mailparser_from_pieces"),
    ("broker.mail.parse", "", "extract"),
    ("broker.content.store", "ContentStore", "put"),
)


def stages(args: argparse.Namespace, large_data: bytes) -> int:
    """The pipeline on the large record in a fresh process (here, the memory freed after
    building the PDF would be reused and hide the growth), fed the record on stdin."""
    child = [sys.executable, __file__, "--stages-child", "--tmpdir", args.tmpdir]
    child += (["--pg", args.pg] if args.pg else []) + (["--no-pgp-key"] if args.no_pgp_key
                                                      else [])
    return subprocess.run(child, input=large_data).returncode


def stages_child(args: argparse.Namespace) -> int:
    """The pipeline in this process on the record read from stdin, its resident memory
    sampled every 2 ms and labelled with the step it is in (STAGES): where the process's
    peak is, which tracemalloc (Python allocations only) cannot say."""
    import functools
    import gc
    import importlib
    import threading

    from broker.memory import return_large_blocks

    return_large_blocks()  # as `broker serve` does
    step = ["-"]
    for module, owner, name in STAGES:
        holder = importlib.import_module(module)
        holder = getattr(holder, owner) if owner else holder
        real = getattr(holder, name)

        def labelled(*a, _real=real, _name=name, **kw):
            outer, step[0] = step[0], _name
            try:
                return _real(*a, **kw)
            finally:
                step[0] = outer

        setattr(holder, name, functools.wraps(real)(labelled))
    with pipeline_home(args) as (rt, pipeline):
        large_data = sys.stdin.buffer.read()
        size = len(large_data)
        spool_id = spool(rt, large_data)
        del large_data
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from here
        base = B.vm_kib(os.getpid(), "VmRSS")
        samples: list[tuple[int, str]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                samples.append((B.vm_kib(os.getpid(), "VmRSS"), step[0]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        pipeline.notify(spool_id)
        while pipeline.run_once():
            pass
        done.set()
        sampler.join()
        peak = B.vm_kib(os.getpid())
        print(f"pipeline, one {size / 1e6:.1f} MB record in a fresh process: VmHWM "
              f"+{(peak - base) / 1024:.0f} MB over {base / 1024:.0f} MB "
              f"({(peak - base) * 1024 / size:.1f}x the message); the highest RSS sampled "
              f"in each step:")
        highest: dict[str, int] = {}
        for kib, name in samples:
            highest[name] = max(highest.get(name, 0), kib)
        for name, kib in sorted(highest.items(), key=lambda kv: -kv[1]):
            print(f"    +{(kib - base) / 1024:5.0f} MB  {name}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=10.0, help="small records per second, paced")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of the small stream")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--connections", type=int, default=4, help="SMTP sessions for small mail")
    p.add_argument("--large-count", type=int, default=1)
    p.add_argument("--large-at", type=float, default=8.0, help="seconds into the stream")
    p.add_argument("--large-gap", type=float, default=5.0, help="seconds between large sends")
    p.add_argument("--large-size", type=int, default=25 * 1024 * 1024 - 256 * 1024,
                   help="bytes of the large record as sent (the limit is 25 MB)")
    p.add_argument("--pages", type=int, default=20)
    p.add_argument("--layout", choices=sorted(B.LAYOUTS), default="serve")
    p.add_argument("--pg", nargs="?", const=B.PG_DEFAULT, default=None, metavar="URL")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--drain", type=float, default=240.0)
    p.add_argument("--no-pgp-key", action="store_true")
    p.add_argument("--tmpdir", default=B.default_tmpdir())
    p.add_argument("--trace", action="store_true",
                   help="instead: the pipeline in this process on the large record, "
                   "timed, profiled and memory-traced")
    p.add_argument("--stages", action="store_true",
                   help="instead: the pipeline in this process on the large record, its "
                   "resident memory sampled and named by step")
    p.add_argument("--stages-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    if args.stages_child:
        return stages_child(args)
    t = time.perf_counter()
    large = large_record(LARGE_KEY, args.large_size, args.pages)
    if args.trace:
        return trace(args, large)
    if args.stages:
        return stages(args, large)
    print(f"large-mail bench: {args.large_count} x {len(large)} B record ({args.pages}-page "
          f"PDF, built in {time.perf_counter() - t:.1f} s) during {args.rate:g}/s x 10 KB "
          f"for {args.duration:g} s; layout {args.layout}, "
          f"{'PostgreSQL' if args.pg else 'SQLite'}, {os.cpu_count()} CPUs, "
          f"{socket.gethostname()}, python {sys.version.split()[0]}")
    sink = sink_anchor(large)
    rounds = []
    for k in range(args.rounds):
        rounds.append(run_round(args, large))
        print_round(rounds[-1], f"round {k + 1}", sink)
    if len(rounds) > 1:
        during = B.median_dist([r.small_during for r in rounds])
        print(f"median of {len(rounds)} rounds, small during large: {during.row()}")
    worst = statistics.median(r.small_during.p99 for r in rounds)
    print(f"small p99 during large {worst * 1000:.0f} ms: target < "
          f"{SMALL_P99_TARGET * 1000:.0f} ms {'MET' if worst < SMALL_P99_TARGET else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
