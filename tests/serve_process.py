"""`broker serve` as a real process, for the tests that kill it or run several.

In a session of its own, so SIGKILL takes the intake and its worker process down together
(as a power cut or the OOM killer would). Its log goes to a file: a pipe that nobody reads
would fill and stall it. Each start appends to the list of logs, so a failing test can
show every run's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServeProcess:
    """One `broker serve` (with its worker process, unless given roles) at a time."""

    def __init__(self, home: Path, db_url: str, name: str = "serve") -> None:
        self.home = home
        self.name = name
        self.env = {**os.environ, "BROKER_HOME": str(home), "BROKER_DATABASE_URL": db_url}
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self, *roles: str, timeout: float = 30.0) -> None:
        """Start and wait until it says it is serving (its log is shown if it never does)."""
        path = self.home.parent / f"{self.name}-{len(self.logs) + 1}.log"
        self.logs.append(path)
        args = [sys.executable, "-m", "broker.cli.main", "serve", "--log-level", "WARNING",
                *[x for role in roles for x in ("--role", role)]]
        with path.open("wb") as out:
            self.proc = subprocess.Popen(args, env=self.env, stderr=out,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while "broker serving" not in path.read_text(errors="replace"):
            assert self.proc.poll() is None, self.log_text()
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL to the whole session: no shutdown code runs anywhere."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (a clean stop), SIGKILL if it does not stop within 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in self.logs)
