#!/usr/bin/env python3
"""Set-up-and-run for a fresh machine with only Python 3.11+.

    python3 dev.py demo     # the full provider -> parent -> school round trip
    python3 dev.py test     # the test suite, over this machine's CPUs (-n 0: one process)
    python3 dev.py bench    # the intake benchmark

Creates .venv beside this file and installs the project into it (again only when
pyproject.toml changed), then runs the command inside it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - a clear message on an old Python
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    if not PY.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    print("installing the broker and its test tools into .venv ...", flush=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"], check=True)
    stamp.write_text(want)


def parallel(rest: list[str]) -> list[str]:
    """pytest-xdist options: the suite spread over this machine's CPUs (at most four),
    unless the caller chose (``-n 0`` runs it in one process). Each worker gets a test
    database of its own on PostgreSQL (tests/conftest.py), so none sees another's tables.
    ``worksteal``: the long crash test must not leave a worker with a queue behind it."""
    if any(a.startswith(("-n", "--numprocesses")) or a in ("no:xdist", "-pno:xdist")
           for a in rest):
        return []
    return ["-n", "auto", "--maxprocesses", "4", "--dist", "worksteal"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench", "lint"):
        print(__doc__)
        return 2
    ensure_venv()
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        args = [str(BIN / "broker"), "demo", *rest]
    elif cmd == "test":
        args = [str(PY), "-m", "pytest", *parallel(rest), *rest]
    elif cmd == "bench":
        args = [str(PY), str(ROOT / "bench" / "intake.py"), *rest]
    else:
        args = [str(PY), "-m", "ruff", "check", str(ROOT)]
    return subprocess.run(args, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
