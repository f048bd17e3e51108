"""Bench target: a real `broker serve` in a fresh home, with a sink as its relay.

    python bench/_serve_target.py --home DIR --port PORT [--role intake ... | --single-process]

Creates the home (SQLite), applies a team in which the bench's sender is a provider,
starts a bare sink as the relay, then runs `broker serve` in this process until
SIGTERM, so the bench measures the daemon a user runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

TEAM = """
[child]
slug = "sam"
name = "Sam Rivera"

[[guardians]]
name = "Dana Rivera"
email = "dana@home.example"

[[members]]
name = "OT"
email = "ot@clinic.example"
role = "provider"
tags = ["ot"]

[[members]]
name = "Ms Park"
email = "park@school.example"
role = "school"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True, type=Path)
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--role", action="append", default=[])
    p.add_argument("--single-process", action="store_true",
                   help="every role in the one `broker serve` process")
    p.add_argument("--burst-rate", type=float, default=None,
                   help="[smtp] burst_rate for this home (0: the pipeline never waits)")
    args = p.parse_args()
    relay_port = _free_port()
    sink = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_sink.py")),
                             "--port", str(relay_port)], stdout=subprocess.DEVNULL)
    home = args.home / "broker"
    env = {**os.environ, "BROKER_HOME": str(home)}
    broker = [sys.executable, "-m", "broker.cli.main"]
    listen, relay = f"127.0.0.1:{args.port}", f"127.0.0.1:{relay_port}"
    subprocess.run([*broker, "init", "--domain", "records.example", "--listen", listen,
                    "--relay", relay], env=env, check=True, stdout=subprocess.DEVNULL)
    # The bench's one client address stands for many senders (or a local MTA in front):
    # the per-address session limit (20 by default) would refuse the 50-session runs.
    toml = home / "broker.toml"
    text = toml.read_text().replace("limit_loopback = true", "limit_loopback = false")
    if args.burst_rate is not None:
        if "burst_rate = 200" not in text:
            raise SystemExit("broker.toml has no `burst_rate = 200` line to change")
        text = text.replace("burst_rate = 200", f"burst_rate = {args.burst_rate:g}")
    toml.write_text(text)
    team = args.home / "team.toml"
    team.write_text(TEAM)
    subprocess.run([*broker, "apply", str(team)], env=env, check=True, stdout=subprocess.DEVNULL)
    roles = [x for r in args.role for x in ("--role", r)]
    if args.single_process:
        roles.append("--single-process")
    serve = subprocess.Popen([*broker, "serve", "--log-level", "WARNING", *roles], env=env)
    signal.signal(signal.SIGTERM, lambda *_: serve.terminate())
    code = serve.wait()
    sink.terminate()
    sink.wait()
    return code


if __name__ == "__main__":
    sys.exit(main())
