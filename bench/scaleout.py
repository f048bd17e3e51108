"""Bench: pipeline throughput with 1, 2, ... `broker serve --role pipeline` processes
sharing one home and one PostgreSQL.

    python bench/scaleout.py [--pg URL] [--count 300] [--workers 1 2]

For each worker count: a fresh database and home; an intake process spools --count
records over SMTP; then that many pipeline processes start together and the clock
runs until every message is an inbound row. Prints records/s.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import subprocess
import sys
import tempfile
import time
from email import policy
from pathlib import Path

from sqlalchemy import create_engine, func, make_url, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker import config
from broker.crypto import vault as vaults
from broker.db.engine import Database
from broker.db.migrate import upgrade
from broker.db.models import Inbound
from broker.team.apply import apply_team
from broker.team.spec import parse_team
from tests.harness import DOMAIN, TEAM, free_port, report


def _serve(home: Path, url: str, roles: tuple[str, ...], log: Path) -> subprocess.Popen:
    env = {**os.environ, "BROKER_HOME": str(home), "BROKER_DATABASE_URL": url}
    args = [sys.executable, "-m", "broker.cli.main", "serve", "--log-level", "WARNING",
            *[x for r in roles for x in ("--role", r)]]
    return subprocess.Popen(args, env=env, stderr=log.open("wb"))


def _wait_started(log: Path) -> None:
    while "broker serving" not in log.read_text(errors="replace"):
        time.sleep(0.05)


def run(pg: str, count: int, workers: int) -> float:
    base = make_url(pg)
    name = f"broker_bench_scaleout_{os.getpid()}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    procs: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp) / "home"
            home.mkdir()
            port = free_port()
            (home / config.CONFIG_NAME).write_text(config.render_config(
                domain=DOMAIN, listen=f"127.0.0.1:{port}", relay=f"127.0.0.1:{free_port()}",
                auth="token"))
            upgrade(url)
            vaults.register(url, vaults.create_keyring(home))
            db = Database(url)
            with db.session() as s:
                apply_team(s, parse_team(TEAM))
            log = Path(tmp) / "intake.log"
            intake = _serve(home, url, ("intake",), log)
            procs.append(intake)
            _wait_started(log)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                for i in range(count):
                    msg = report(subject=f"Report {i}", body=f"Report {i}: handwriting.")
                    smtp.sendmail("lee@clinic.example", [f"sam@{DOMAIN}"],
                                  msg.as_bytes(policy=policy.SMTP))
            started = time.monotonic()
            for k in range(workers):
                procs.append(_serve(home, url, ("pipeline",), Path(tmp) / f"w{k}.log"))
            while True:
                with db.read_session() as s:
                    done = s.scalar(select(func.count(Inbound.id)))
                if done >= count:
                    break
                time.sleep(0.1)
            # Includes the workers' start-up (about a second), the same for every count.
            elapsed = time.monotonic() - started
            db.dispose()
            for p in procs:
                p.terminate()
                p.wait(30)
            procs.clear()
            return count / elapsed
    finally:
        for p in procs:
            p.kill()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pg", default=os.environ.get(
        "BROKER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    for n in args.workers:
        rate = run(args.pg, args.count, n)
        print(f"{n} pipeline process(es): {rate:.1f} records/s ({args.count} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
