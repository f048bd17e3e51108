"""What a record and an approval cost, in instructions: a figure that does not swing with
the machine's load (benchmark 2's CPU side).

Runs the pipeline and the outbox in one process, with the bench's relay in a thread, under
`valgrind --tool=callgrind`, three times: warm-up only; warm-up and N records; warm-up, N
records and their N approvals. The differences, divided by N, are the instructions one
record and one approval cost (pipeline, outbox, and the relay taking their copies). The
same counts come out whatever else the machine does, so two checkouts can be compared
one after the other: run this script from each.

    python bench/instructions.py --records 30

Needs valgrind (Debian's `valgrind` package); about four minutes for 30.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _broker as B

WARM = 5


def workload(n: int, approvals: bool) -> None:
    """WARM records and approvals, then ``n`` records and (``approvals``) theirs."""
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp, \
            B.database(None, Path(tmp)) as url, B.Relay() as relay:
        home = Path(tmp) / "home"
        B.make_home(home, url, relay.port)
        run = B.InProcess.open(home, url)
        pipeline, sender, spool = run.pipeline, run.sender, run.spool

        def drain() -> None:
            while pipeline.run_once():
                pass
            while sender.run_once():
                pass

        def approve(keys: range) -> None:
            got = B.reviews(relay.recorder.snapshot())
            spool([(B.GUARDIAN, got[k].token_addr, B.approval(got[k])) for k in keys])
            drain()

        spool([(B.PROVIDER, B.CHILD_ADDR, B.record(k)) for k in range(WARM)])
        drain()
        approve(range(WARM))
        spool([(B.PROVIDER, B.CHILD_ADDR, B.record(k)) for k in range(WARM, WARM + n)])
        drain()
        if approvals:
            approve(range(WARM, WARM + n))
        reviews = len(B.reviews(relay.recorder.snapshot()))
        released = sum(len(v) for v in B.releases(relay.recorder.snapshot()).values())
        print(f"reviews {reviews} released {released}", file=sys.stderr)
        run.close()


def counted(n: int, approvals: bool) -> tuple[int, str]:
    """Instructions of one workload run under callgrind, and its summary line."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
           sys.executable, __file__, "--inner", str(n)] + (["--approvals"] if approvals else [])
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", proc.stderr)
    done = re.search(r"reviews \d+ released \d+", proc.stderr)
    if proc.returncode or not found or not done:
        sys.exit(f"the run under callgrind failed:\n{proc.stderr[-2000:]}")
    return int(found.group(1)), done.group(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=30)
    parser.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--approvals", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:
        workload(args.inner, args.approvals)
        return 0
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install -y valgrind)")
    n = args.records
    base, _ = counted(0, False)
    records, seen_r = counted(n, False)
    both, seen_b = counted(n, True)
    per_record = (records - base) / n
    per_approval = (both - records) / n
    print(f"instructions ({B.REPO.name}, SQLite, {n} records, {seen_b}):")
    print(f"  warm-up alone            {base / 1e6:10.1f} M")
    print(f"  per record               {per_record / 1e6:10.1f} M  (pipeline, outbox, relay)")
    print(f"  per approval             {per_approval / 1e6:10.1f} M  (pipeline, outbox, relay)")
    print(f"  records run: {seen_r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
