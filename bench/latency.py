"""Latency under load (issue 7, benchmark 2): a real `broker serve`, records paced by the clock.

Target: at a steady 50 msg/s of 10 KB records, provider-send -> review request accepted by
the relay p50 < 0.5 s and p99 < 2 s; parent APPROVE -> released copies accepted by the relay
p50 < 0.5 s.

Each round starts a fresh home and `broker serve` (--layout, see bench/_broker.py) whose relay
is an aiosmtpd server in this process that timestamps every message it accepts. Phase 1
sends --rate records/s for --duration s, open loop (each is due at start + i/rate, over
--connections SMTP sessions, whatever the broker answers), and waits for every review
request. Phase 2 replies APPROVE from the guardian to each review request's Reply-To,
paced the same way, and waits for both released copies (to the two school members).
Latencies count from the moment a message was due, so a slow intake is not hidden. A
pipeline slower than the rate shows as latency that grows through the run: the first and
last tenth of the sends are printed apart.

    .venv/bin/python bench/latency.py [--rate 50] [--duration 20] [--rounds 3]
        [--pg URL] [--layout serve|single|split|split2]
    .venv/bin/python bench/latency.py --sweep 10 20 30 40 50    # the sustainable rate
    .venv/bin/python bench/latency.py --profile 200             # where a record's time goes

--sweep runs one round per rate and prints the highest rate whose p99 (both latencies)
stays under 2 s. --profile runs the pipeline and the outbox in this process (cProfile) on a
pre-filled spool of records, then of approvals, and prints the functions with the largest
cumulative time per record. There is no bare-sink ratio here: the relay's accept time is
the end point, and a sink answers in well under a millisecond.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import resource
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _broker as B

P99_TARGET = 2.0


@dataclass
class Round:
    """One round's figures."""

    rate: float
    sent: int
    send_rate: float       # achieved: records answered 250 per second
    review_rate: float     # achieved: review requests accepted by the relay per second
    intake: B.Dist         # due -> 250 from the broker
    review: B.Dist         # due -> review request at the relay
    review_first: B.Dist   # the first tenth of the sends
    review_last: B.Dist    # the last tenth
    missing_reviews: int
    review_queued: B.Dist  # due -> review request queued in the outbox (pipeline done)
    review_outbox: B.Dist  # queued -> sent (commit wait + outbox)
    approve: B.Dist        # APPROVE due -> last released copy at the relay
    approve_queued: B.Dist
    approve_outbox: B.Dist
    timeline: str          # review requests accepted by the relay per 5 s
    approve_rate: float
    missing_releases: int
    cpu: dict[str, float]  # broker CPU seconds per process over the round
    errors: list[str]      # ERROR lines the broker logged
    load: float            # 1-minute load average at the end (others' work on the machine)


def run_round(args: argparse.Namespace, rate: float) -> Round:
    """One fresh home and broker: records at `rate`, then approvals at `rate`."""
    count = max(1, int(rate * args.duration))
    with tempfile.TemporaryDirectory(prefix="bench-latency-", dir=args.tmpdir) as tmp, \
            B.database(args.pg, Path(tmp)) as url, B.Relay() as relay:
        home = Path(tmp) / "home"
        port = B.make_home(home, url, relay.port, pgp_key=not args.no_pgp_key)
        broker = B.Broker(home, url, args.layout, Path(tmp))
        try:
            B.warm_up(port, relay, args.warmup, args.size, args.connections,
                      args.drain)
            pids = broker.pids()
            cpu0 = {k: B.proc_cpu(p) for k, p in pids.items()}
            bench0 = _own_cpu()
            jobs = [B.Job(n, B.PROVIDER, B.CHILD_ADDR, B.record(n, args.size))
                    for n in range(count)]
            asyncio.run(B.send_paced(port, jobs, rate, args.connections))

            def measured() -> dict[int, B.Review]:
                return {k: r for k, r in B.reviews(relay.recorder.snapshot()).items()
                        if k < B.WARM_KEY}

            B.wait_until(lambda: len(measured()) >= count, args.drain)
            got = measured()
            lat = [got[j.key].at - j.due for j in jobs if j.key in got]
            tenth = max(1, count // 10)
            first = [got[j.key].at - j.due for j in jobs[:tenth] if j.key in got]
            last = [got[j.key].at - j.due for j in jobs[-tenth:] if j.key in got]
            done = [got[j.key].at for j in jobs if j.key in got]
            review_rate = len(done) / (max(done) - jobs[0].due) if done else 0.0

            approvals = [B.Job(n, B.GUARDIAN, r.token_addr, B.approval(r))
                         for n, r in sorted(got.items())]
            copies = len(B.SCHOOL)
            asyncio.run(B.send_paced(port, approvals, rate, args.connections))

            def released() -> int:
                rel = B.releases(relay.recorder.snapshot())
                return sum(1 for a in approvals if len(rel.get(a.key, ())) >= copies)

            B.wait_until(lambda: released() >= len(approvals), args.drain)
            rel = B.releases(relay.recorder.snapshot())
            alat = [max(rel[a.key]) - a.due for a in approvals
                    if len(rel.get(a.key, ())) >= copies]
            ends = [max(rel[a.key]) for a in approvals if len(rel.get(a.key, ())) >= copies]
            approve_rate = len(ends) / (max(ends) - approvals[0].due) if ends else 0.0
            cpu = {k: B.proc_cpu(p) - cpu0[k] for k, p in pids.items()}
            # This process too: the load generator and the relay share the machine.
            cpu["bench (sender and relay)"] = _own_cpu() - bench0
        finally:
            broker.stop()
        due = {j.key: j.due for j in jobs}
        adue = {a.key: a.due for a in approvals}
        rq = {k: v[0] for k, v in B.stages(url, "review").items() if k in due}
        rl = {k: v for k, v in B.stages(url, "release").items()
              if k in adue and all(x.sent for x in v)}
        t0 = jobs[0].due
        buckets: dict[int, int] = {}
        for k in due:
            if k in got:
                slot = int((got[k].at - t0) // 5)
                buckets[slot] = buckets.get(slot, 0) + 1
        timeline = " ".join(f"{buckets.get(b, 0)}" for b in range(max(buckets, default=-1) + 1))
        acked = [j.acked for j in jobs if j.acked]
        return Round(
            rate=rate, sent=count,
            send_rate=len(acked) / (max(acked) - jobs[0].due) if acked else 0.0,
            review_rate=review_rate,
            intake=B.Dist.of([j.acked - j.due for j in jobs if j.acked]),
            review=B.Dist.of(lat), review_first=B.Dist.of(first), review_last=B.Dist.of(last),
            missing_reviews=count - len(lat),
            review_queued=B.Dist.of([v.queued - due[k] for k, v in rq.items()]),
            review_outbox=B.Dist.of([v.sent - v.queued for v in rq.values() if v.sent]),
            approve=B.Dist.of(alat), approve_rate=approve_rate,
            approve_queued=B.Dist.of([max(x.queued for x in v) - adue[k]
                                      for k, v in rl.items()]),
            approve_outbox=B.Dist.of([max(x.sent or 0 for x in v) - max(x.queued for x in v)
                                      for k, v in rl.items()]),
            timeline=timeline,
            missing_releases=len(approvals) - len(alat),
            cpu=cpu, errors=broker.errors(), load=os.getloadavg()[0],
        )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def print_round(r: Round, label: str) -> None:
    print(f"{label}: {r.sent} records at {r.rate:g}/s paced; intake answered "
          f"{r.send_rate:.1f}/s, review requests {r.review_rate:.1f}/s, releases "
          f"{r.approve_rate:.1f}/s; broker CPU "
          + ", ".join(f"{k} {v:.1f}s" for k, v in r.cpu.items())
          + f"; load average {r.load:.1f}"
          + (f"; {len(r.errors)} ERROR log lines" if r.errors else ""))
    for line in dict.fromkeys(e.split(" ERROR ", 1)[1] for e in r.errors[:50]):
        print(f"    broker ERROR: {line[:160]}")
    print(f"  send -> 250 (intake)      {r.intake.row()}")
    print(f"  send -> review request    {r.review.row()}"
          + (f"  MISSING {r.missing_reviews}" if r.missing_reviews else ""))
    print(f"     first tenth of sends   {r.review_first.row()}")
    print(f"     last tenth of sends    {r.review_last.row()}")
    print(f"     send -> queued (pipeline) {r.review_queued.row()}")
    print(f"     queued -> sent (outbox)   {r.review_outbox.row()}")
    print(f"  APPROVE -> both copies    {r.approve.row()}"
          + (f"  MISSING {r.missing_releases}" if r.missing_releases else ""))
    print(f"     APPROVE -> queued         {r.approve_queued.row()}")
    print(f"     queued -> sent (outbox)   {r.approve_outbox.row()}")
    print(f"  review requests at the relay per 5 s from the first send: {r.timeline}")
    broker_cpu = sum(v for k, v in r.cpu.items() if not k.startswith("bench"))
    if r.sent:
        # What one record and its approval cost the broker, whatever the load, and so the
        # most this machine's CPUs could carry: records at R, then approvals at R (this
        # bench's two phases), each about half the cost, with nothing else running.
        per = broker_cpu / r.sent
        cpus = os.cpu_count() or 1
        print(f"  broker CPU per record and its approval: {per * 1000:.1f} ms (all its "
              f"processes); ceiling on {cpus} CPUs, load generator and relay not counted: "
              f"{2 * cpus / per:.0f}/s")


def main_rounds(args: argparse.Namespace) -> int:
    rounds = []
    for k in range(args.rounds):
        rounds.append(run_round(args, args.rate))
        print_round(rounds[-1], f"round {k + 1}")
    review = B.median_dist([r.review for r in rounds])
    approve = B.median_dist([r.approve for r in rounds])
    print(f"median of {len(rounds)} rounds at {args.rate:g} msg/s ({args.layout}, "
          f"{'PostgreSQL' if args.pg else 'SQLite'}):")
    print(f"  send -> review request    {review.row()}   "
          f"target p50 < 500 ms, p99 < 2000 ms: "
          f"{'MET' if review.p50 < 0.5 and review.p99 < 2 else 'NOT MET'}")
    print(f"  APPROVE -> both copies    {approve.row()}   target p50 < 500 ms: "
          f"{'MET' if approve.p50 < 0.5 else 'NOT MET'}")
    print(f"  achieved: review requests "
          f"{statistics.median(r.review_rate for r in rounds):.1f}/s, releases "
          f"{statistics.median(r.approve_rate for r in rounds):.1f}/s")
    return 0


def main_sweep(args: argparse.Namespace) -> int:
    results = []
    for rate in args.sweep:
        results.append(run_round(args, rate))
        print_round(results[-1], f"rate {rate:g}/s")
    print(f"sweep ({args.layout}, {'PostgreSQL' if args.pg else 'SQLite'}, "
          f"{args.duration:g} s per rate):")
    print("   rate  review p50   p99      approve p50   p99      achieved review/s")
    for r in results:
        print(f"  {r.rate:5g}  {r.review.p50 * 1000:7.0f} {r.review.p99 * 1000:7.0f} ms"
              f"   {r.approve.p50 * 1000:7.0f} {r.approve.p99 * 1000:7.0f} ms"
              f"   {r.review_rate:6.1f}")
    ok = [r.rate for r in results if r.review.p99 < P99_TARGET and r.approve.p99 < P99_TARGET
          and not r.missing_reviews and not r.missing_releases]
    print(f"sustainable rate (p99 < {P99_TARGET:g} s for both): "
          + (f"{max(ok):g} msg/s" if ok else f"below {min(args.sweep):g} msg/s"))
    return 0


# -- profile --------------------------------------------------------------------------------


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    repo = str(B.REPO) + os.sep
    return path[len(repo):] if path.startswith(repo) else path


def print_profile(prof: cProfile.Profile, n: int, top: int, title: str) -> None:
    """The functions with the largest cumulative time, in ms per record."""
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][3], reverse=True)  # type: ignore[attr-defined]
    total = st.total_tt  # type: ignore[attr-defined]
    print(f"{title}: {total / n * 1000:.1f} ms CPU-profiled per item ({n} items)")
    print("   cum ms/item  self ms/item  calls/item  function")
    for (path, line, func), (_cc, nc, tt, ct, _callers) in rows[:top]:
        print(f"   {ct / n * 1000:10.2f}  {tt / n * 1000:11.2f}  {nc / n:10.1f}  "
              f"{func} ({_short(path)}:{line})")
    print("   the broker's own functions (cumulative):")
    own = str(B.REPO / "broker") + os.sep
    for (path, line, func), (_cc, nc, tt, ct, _callers) in [
            kv for kv in rows if kv[0][0].startswith(own)][:top]:
        print(f"   {ct / n * 1000:10.2f}  {tt / n * 1000:11.2f}  {nc / n:10.1f}  "
              f"{func} ({_short(path)}:{line})")
    print("   top self time:")
    for (path, line, func), (_cc, nc, tt, _ct, _callers) in sorted(
            st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]:  # type: ignore[attr-defined]
        print(f"   {tt / n * 1000:10.2f} ms/item  {nc / n:8.1f} calls  "
              f"{func} ({_short(path)}:{line})")


# Wall-clock timers (no profiler overhead) around the steps the profile points at;
# inclusive: a timer's figure contains the timers nested inside it.
TIMED = (
    "broker.intake.pipeline.Pipeline.process_batch",
    "broker.intake.pipeline.Pipeline._new_record",
    "broker.review.replies.handle_reply",
    "broker.release.approve.release",
    "broker.mail.parse.parse_message",
    "broker.policy.evaluate.evaluate",
    "broker.review.notify.Notifier.review_request",
    "broker.review.notify.Notifier.notice",
    "broker.mail.compose.compose",
    "broker.crypto.outbound.protect",
    "broker.crypto.pgpmime.sign_message",
    "broker.crypto.pgp.sign_detached",
    "broker.release.outbox.enqueue",
    "broker.content.store.ContentStore.put",
    "broker.review.tokens.issue",
    "broker.release.sender.OutboxSender.run_once",
    "broker.release.relay.RelayClient.send",
)


class Timers:
    """Wraps each function in TIMED, wherever a module imported it by name, with a
    perf_counter that adds up its wall time and calls."""

    def __init__(self) -> None:
        self.total: dict[str, float] = dict.fromkeys(TIMED, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(TIMED, 0)
        self._undo: list[tuple[object, str, object]] = []

    def install(self) -> None:
        import functools
        import importlib

        for name in TIMED:
            parts = name.split(".")
            for cut in range(len(parts) - 1, 0, -1):
                try:
                    owner: object = importlib.import_module(".".join(parts[:cut]))
                    break
                except ImportError:
                    continue
            for attr in parts[cut:-1]:
                owner = getattr(owner, attr)
            original = getattr(owner, parts[-1])

            def wrapper(*a: object, _f: object = original, _n: str = name,
                        **kw: object) -> object:
                t0 = time.perf_counter()
                try:
                    return _f(*a, **kw)  # type: ignore[operator]
                finally:
                    self.total[_n] += time.perf_counter() - t0
                    self.calls[_n] += 1

            functools.update_wrapper(wrapper, original)  # type: ignore[arg-type]
            targets = [(owner, parts[-1])]
            if isinstance(owner, type(sys)):  # a module: also where it was imported by name
                targets += [(m, k) for m in list(sys.modules.values()) if m is not None
                            and m is not owner and str(getattr(m, "__name__", ""))
                            .startswith("broker") for k, v in vars(m).items() if v is original]
            for obj, attr in targets:
                self._undo.append((obj, attr, original))
                setattr(obj, attr, wrapper)

    def uninstall(self) -> None:
        for obj, attr, original in reversed(self._undo):
            setattr(obj, attr, original)
        self._undo.clear()

    def reset(self) -> None:
        self.total = dict.fromkeys(TIMED, 0.0)
        self.calls = dict.fromkeys(TIMED, 0)

    def print(self, n: int, title: str) -> None:
        print(f"{title}: wall ms per item (inclusive), no profiler ({n} items)")
        for name in TIMED:
            if self.calls[name]:
                print(f"   {self.total[name] / n * 1000:8.2f} ms  {self.calls[name] / n:5.1f} "
                      f"calls  {name.removeprefix('broker.')}")


def main_profile(args: argparse.Namespace) -> int:
    """Pipeline and outbox in this process on a pre-filled spool: unprofiled wall time per
    record first (half the records), then cProfile over the other half."""
    n = args.profile
    with tempfile.TemporaryDirectory(prefix="bench-profile-", dir=args.tmpdir) as tmp, \
            B.database(args.pg, Path(tmp)) as url, B.Relay() as relay:
        home = Path(tmp) / "home"
        B.make_home(home, url, relay.port, pgp_key=not args.no_pgp_key)
        if args.history:
            t0 = time.perf_counter()
            B.fill_history(url, args.history)
            print(f"history: {args.history:,} copies sent before today "
                  f"(filled in {time.perf_counter() - t0:.1f} s)")
        run = B.InProcess.open(home, url)
        pipeline, sender, spool = run.pipeline, run.sender, run.spool

        def drain(prof: cProfile.Profile | None) -> tuple[float, float]:
            """Run the pipeline, then the outbox, until idle: (pipeline s, outbox s)."""
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            while pipeline.run_once():
                pass
            t1 = time.perf_counter()
            while sender.run_once():
                pass
            if prof:
                prof.disable()
            return t1 - t0, time.perf_counter() - t1

        def profiled_drain() -> tuple[cProfile.Profile, float, cProfile.Profile, float]:
            """The pipeline until idle, then the outbox, each under its own profiler:
            (pipeline profile, its seconds, outbox profile, its seconds)."""
            out: list[cProfile.Profile | float] = []
            for step in (pipeline.run_once, sender.run_once):
                prof = cProfile.Profile()
                t0 = time.perf_counter()
                prof.enable()
                while step():
                    pass
                prof.disable()
                out += [prof, time.perf_counter() - t0]
            return out[0], out[1], out[2], out[3]  # type: ignore[return-value]

        timers = Timers()
        timers.install()
        half = max(1, n // 2)
        phases = [("records", lambda lo, hi: [(B.PROVIDER, B.CHILD_ADDR, B.record(k, args.size))
                                              for k in range(lo, hi)])]
        results: dict[str, list[tuple[float, float]]] = {}
        for name, make in phases:
            spool(make(0, half))
            timers.reset()
            results[name] = [drain(None)]
            timers.print(half, f"{name} (pipeline, then outbox)")
            spool(make(half, n))
            timers.uninstall()
            prof_p, tp, prof_o, to = profiled_drain()
            results[name].append((tp, to))
            timers.install()
            m = n - half
            (up, uo), (pp, po) = results[name]
            print(f"{name}: unprofiled {up / half * 1000:.1f} ms pipeline + "
                  f"{uo / half * 1000:.1f} ms outbox per record ({half} records, "
                  f"{half / (up + uo):.1f} records/s); profiled {pp / m * 1000:.1f} + "
                  f"{po / m * 1000:.1f} ms")
            print_profile(prof_p, m, args.top, f"pipeline, {name}")
            print_profile(prof_o, m, args.top // 2, f"outbox, {name}")

        got = B.reviews(relay.recorder.snapshot())
        keys = sorted(got)
        lo, hi = keys[:half], keys[half:]
        spool([(B.GUARDIAN, got[k].token_addr, B.approval(got[k])) for k in lo])
        timers.reset()
        up, uo = drain(None)
        timers.print(len(lo), "approvals (pipeline, then outbox)")
        timers.uninstall()
        spool([(B.GUARDIAN, got[k].token_addr, B.approval(got[k])) for k in hi])
        prof_p, pp, prof_o, po = profiled_drain()
        rel = B.releases(relay.recorder.snapshot())
        print(f"approvals: unprofiled {up / len(lo) * 1000:.1f} ms pipeline + "
              f"{uo / len(lo) * 1000:.1f} ms outbox per approval ({len(lo)}); profiled "
              f"{pp / max(1, len(hi)) * 1000:.1f} + {po / max(1, len(hi)) * 1000:.1f} ms; "
              f"{sum(len(v) for v in rel.values())} copies released")
        print_profile(prof_p, max(1, len(hi)), args.top, "pipeline, approvals")
        print_profile(prof_o, max(1, len(hi)), args.top // 2, "outbox, approvals")
        run.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=50.0, help="records per second, paced")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of sending per phase")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=10 * 1024, help="record size in bytes")
    p.add_argument("--connections", type=int, default=8, help="concurrent SMTP sessions")
    p.add_argument("--layout", choices=sorted(B.LAYOUTS), default="serve")
    p.add_argument("--pg", nargs="?", const=B.PG_DEFAULT, default=None, metavar="URL",
                   help="PostgreSQL server (a fresh database per round); SQLite without")
    p.add_argument("--drain", type=float, default=180.0,
                   help="seconds to wait for the broker to finish after the last send")
    p.add_argument("--warmup", type=int, default=20,
                   help="records sent and approved before measuring (not counted)")
    p.add_argument("--no-pgp-key", action="store_true",
                   help="a home without the broker's OpenPGP key (nothing signed)")
    p.add_argument("--sweep", type=float, nargs="+", metavar="RATE")
    p.add_argument("--profile", type=int, metavar="N", help="profile N records in-process")
    p.add_argument("--top", type=int, default=30, help="rows of the profile")
    p.add_argument("--history", type=int, default=0, metavar="N",
                   help="with --profile: N copies already sent before today (a home in use)")
    p.add_argument("--tmpdir", default=B.default_tmpdir())
    args = p.parse_args()
    if args.layout == "split2" and not args.pg:
        p.error("--layout split2 needs --pg (two pipelines on SQLite only wait on each other)")
    print(f"latency bench: {args.size} B records, {args.connections} connections, layout "
          f"{args.layout}, {'PostgreSQL' if args.pg else 'SQLite'}, {os.cpu_count()} CPUs, "
          f"{socket.gethostname()}, python {sys.version.split()[0]}")
    if args.profile:
        return main_profile(args)
    if args.sweep:
        return main_sweep(args)
    return main_rounds(args)


if __name__ == "__main__":
    sys.exit(main())
