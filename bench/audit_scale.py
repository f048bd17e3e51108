"""Bench: `broker audit` with a large audit log (issue 7, benchmark 4).

    python bench/audit_scale.py [--events 1000000] [--children 200] [--rounds 5]
                                [--pg URL] [--db sqlite postgresql]

For each database: a fresh home and database (a SQLite file in a temporary folder; a new
PostgreSQL database on the --pg server, dropped afterwards) migrated to head, holding
--events audit events spread over --children children, chained exactly as the broker
chains them (broker.audit.chain), with a sealed delivery summary behind every released
copy. Then, --rounds times each:

- the command as a user runs it (`broker audit --home H ...` in a new process), wall
  time including the Python start-up;
- the same command in this process (click's runner: no interpreter or import cost);
- the query alone, both ways: broker.audit.fastread (what the listing uses: plain
  sqlite3 or libpq, no SQLAlchemy) and broker.audit.queries (SQLAlchemy Core, what it
  falls back to); verify_log in one process, where the command splits a long log over
  one process per CPU.

Before timing, each listing is run once with `-X importtime` to show which path served
it: a new process that imports SQLAlchemy did not take the fast path.

The start-up floor is printed too (`python -c pass`, `broker --version`). The goal is
`broker audit --child X` under 100 ms and `broker audit verify` under 10 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, insert, make_url, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker import config
from broker.audit import fastread, queries
from broker.audit.chain import GENESIS, Event, event_hash
from broker.audit.log import verify_log
from broker.crypto import vault as vaults
from broker.db.engine import Database
from broker.db.migrate import upgrade
from broker.db.models import AuditEvent, AuditHead, Child, Delivery

BATCH = 20_000
START = dt.datetime(2024, 1, 1, 7, 0, tzinfo=dt.UTC)
SENDERS = ("lee@clinic.example", "park@school.example", "rivera@school.example",
           "müller@praxis.example", "nguyen@therapy.example")
RECIPIENTS = (("park@school.example", "Ms Park"), ("lee@clinic.example", "Dr Lee"),
              ("coach@school.example", "Coach Rivera"), ("zoe@praxis.example", "Zoë Müller"),
              ("office@district.example", "District Office"))
GUARDIANS = ("dana@home.example", "chris@home.example")


# -- building -------------------------------------------------------------------------


def _record_events(
    rng: random.Random, record: int, child: str, delivery: int
) -> list[tuple[str, str, str, list[str], dict[str, Any], int | None]]:
    """The events one record leaves, as the pipeline writes them: (action, actor,
    actor_role, recipients, description, delivery id). Delivered copies come last."""
    sender = rng.choice(SENDERS)
    guardian = rng.choice(GUARDIANS)
    sha = f"{rng.getrandbits(256):064x}"
    out: list[tuple[str, str, str, list[str], dict[str, Any], int | None]] = [
        ("received", sender, "provider", [],
         {"inbound": record, "sha256": sha, "size": rng.randint(2_000, 900_000)}, None),
        ("held", sender, "provider", [guardian],
         {"from": "received", "to": "held", "reasons": ["needs a guardian's decision"]}, None),
        ("review_requested", "broker", "broker", [guardian],
         {"version": 1, "expires": "in 14 days", "category": rng.choice(
             ["therapy", "school", "medical"])}, None),
        ("approval_recorded", guardian, "guardian", [],
         {"version": 1, "auth": "dkim", "decision": "approve"}, None),
    ]
    for email, name in rng.sample(RECIPIENTS, rng.randint(1, 3)):
        out.append(("delivered", "broker", "broker", [email], {
            "record": record, "delivery": delivery, "sha256": f"{rng.getrandbits(256):064x}",
            "message_id": f"<release.{record}.{delivery}@records.example>",
            "recipient_name": name, "released_by": guardian, "openpgp": "none",
            "basis": "parent-directed", "consent_id": None, "notices": ["FERPA"],
        }, delivery))
        delivery += 1
    return out


def build(
    url: str, vault: vaults.Vault, n_events: int, n_children: int, seed: int = 7
) -> None:
    """Children, release copies and n_events chained events, audit_head set: bulk
    inserts (COPY on PostgreSQL), the audit table's indexes made after the load."""
    db = Database(url)
    vaults.register(url, vault)
    slugs = [f"child{i:03d}" for i in range(1, n_children + 1)]
    with db.session() as s:
        s.add_all(Child(slug=slug, name=f"Child {slug[5:]}") for slug in slugs)
        s.flush()
        child_ids = {slug: cid for slug, cid in s.execute(select(Child.slug, Child.id))}
    events_t: Table = AuditEvent.__table__  # type: ignore[assignment]
    deliveries_t: Table = Delivery.__table__  # type: ignore[assignment]
    rng = random.Random(seed)
    step = dt.timedelta(days=730) / n_events  # two years of a busy broker

    def rows() -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
        seq, prev, record, delivery = 0, GENESIS, 0, 1
        while seq < n_events:
            record += 1
            child = rng.choice(slugs)
            for action, actor, role, recips, desc, did in _record_events(
                rng, record, child, delivery
            ):
                if seq >= n_events:
                    return
                seq += 1
                at = (START + step * seq).replace(microsecond=rng.randrange(1_000_000))
                desc = json.loads(json.dumps(desc, sort_keys=True))  # as record_event
                digest = event_hash(Event(
                    seq=seq, at=at.isoformat(timespec="microseconds"), child=child,
                    record_id=record, actor=actor, actor_role=role, action=action,
                    recipients=tuple(recips), description=desc, prev_hash=prev,
                ))
                ev = {
                    "seq": seq, "at": at, "child": child, "record_id": record,
                    "actor": actor, "actor_role": role, "action": action,
                    "recipients": json.dumps(recips),
                    "description": json.dumps(desc, sort_keys=True, ensure_ascii=False),
                    "prev_hash": prev, "hash": digest,
                }
                prev = digest
                copy = None
                if did is not None:
                    delivery = did + 1
                    copy = {
                        "id": did, "dedupe_key": f"release:{record}:{recips[0]}",
                        "kind": "release", "child_id": child_ids[child], "record_id": None,
                        "person_id": None, "recipient": recips[0],
                        "message_id": desc["message_id"], "content_ref": f"{did:064x}",
                        "sha256": desc["sha256"],
                        "summary": json.dumps({
                            "subject": f"Progress report {record}",
                            "attachments": [f"report-{record}.pdf"],
                            "released_by": desc["released_by"],
                            "recipient_name": desc["recipient_name"],
                        }, ensure_ascii=False, sort_keys=True),
                        "consent_id": None, "state": "sent", "attempts": 1,
                        "next_attempt_at": at, "last_error": "", "created_at": at,
                        "sent_at": at,
                    }
                yield ev, copy

    with db.engine.begin() as conn:
        indexes = list(events_t.indexes)
        for ix in indexes:
            ix.drop(conn)
        last: dict[str, Any] = {"seq": 0, "hash": GENESIS}
        writer = _copy_writer if db.is_postgres else _insert_writer
        evs: list[dict[str, Any]] = []
        copies: list[dict[str, Any]] = []
        for ev, copy in rows():
            evs.append(ev)
            if copy is not None:
                copies.append(copy)
            if len(evs) >= BATCH:
                # Copies first: nothing refers to them, but keep the order the broker has.
                writer(conn, deliveries_t, copies)
                writer(conn, events_t, evs)
                last = evs[-1]
                evs, copies = [], []
        if evs:
            writer(conn, deliveries_t, copies)
            writer(conn, events_t, evs)
            last = evs[-1]
        for ix in indexes:
            ix.create(conn)
        conn.execute(AuditHead.__table__.update().where(AuditHead.id == 1).values(
            seq=last["seq"], hash=last["hash"]))
        if db.is_postgres:
            conn.execute(text("SELECT setval(pg_get_serial_sequence('deliveries', 'id'), "
                              "(SELECT max(id) FROM deliveries))"))
    if db.is_postgres:
        # What autovacuum does after a load this size (visibility map and statistics).
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    db.dispose()


def _insert_writer(conn: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(insert(table), rows)


def _copy_writer(conn: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    """COPY, with the columns' own bind conversions (UTC datetimes, sealed text)."""
    if not rows:
        return
    dialect = conn.dialect
    cols = list(rows[0])
    procs = [table.c[c].type.bind_processor(dialect) for c in cols]
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(
        f"COPY {table.name} ({', '.join(cols)}) FROM STDIN"
    ) as copy:
        for row in rows:
            copy.write_row([
                p(row[c]) if p is not None else row[c] for c, p in zip(cols, procs, strict=True)
            ])


def make_home(root: Path, url: str) -> tuple[Path, vaults.Vault]:
    """A home whose broker.toml names the database, and its content key."""
    home = root / "home"
    home.mkdir()
    body = config.render_config(domain="records.example", listen="127.0.0.1:2525",
                                relay="127.0.0.1:2526")
    body, n = re.subn(r'(\[database\][^\[]*?)url = ""', rf'\1url = "{url}"', body)
    assert n == 1, "broker.toml template changed: no [database] url"
    (home / config.CONFIG_NAME).write_text(body, encoding="utf-8")
    assert config.load(home).database_url == url
    return home, vaults.create_keyring(home)


# -- timing ---------------------------------------------------------------------------


def _times(fn: Callable[[], object], rounds: int) -> tuple[list[float], list[float]]:
    """Wall times, and this process's CPU times (its own share of the work)."""
    wall, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def _broker_cmd() -> list[str]:
    script = Path(sys.executable).with_name("broker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "broker.cli.main"]


# Where a new process's bytecode is cached when the environment forbids writing it
# beside the sources (PYTHONDONTWRITEBYTECODE): without a cache every run compiles the
# broker's modules again, which no installed broker does. Set by main().
PYCACHE: dict[str, str] = {}


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a timed new process: as this one, bytecode cached (see PYCACHE)."""
    out = dict(os.environ if env is None else env)
    if out.pop("PYTHONDONTWRITEBYTECODE", None) and PYCACHE:
        out["PYTHONPYCACHEPREFIX"] = PYCACHE["dir"]
    return out


def _subprocess(args: list[str], env: dict[str, str]) -> Callable[[], None]:
    env = cli_env(env)

    def run() -> None:
        done = subprocess.run(args, env=env, capture_output=True)
        if done.returncode != 0:
            raise SystemExit(f"{args[1:]} failed: {done.stderr.decode(errors='replace')}")

    run()  # warm-up, untimed: the bytecode cache and the OS's file cache
    return run


def _in_process(home: Path, args: list[str]) -> Callable[[], None]:
    from click.testing import CliRunner

    from broker.cli.audit import audit

    def run() -> None:
        result = CliRunner().invoke(audit, ["--home", str(home), *args])
        if result.exit_code != 0:
            raise SystemExit(f"{args} failed: {result.output}")

    return run


def measure(label: str, home: Path, url: str, child: str, rounds: int) -> list[tuple]:
    """Rows of (database, what, how, times)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_DATABASE_URL", "BROKER_HOME", "BROKER_CONTENT_KEY")}
    cmd = [*_broker_cmd(), "audit", "--home", str(home)]
    db = Database(url)
    vaults.register(url, vaults.load_vault(home))
    out: list[tuple] = []

    from broker.cli.audit import TABLE_LIMIT

    def listing(disclosures: bool, limit: int | None) -> Callable[[], None]:
        """What the command asks the database: the latest rows and how many there are
        (the table), or all of them (an export)."""
        fetch = queries.disclosures if disclosures else queries.events

        def run() -> None:
            with db.read_session() as s:
                fetch(s, child, limit=limit)
                if limit:
                    queries.count_matching(s, child, disclosures_only=disclosures)

        return run

    def fast_listing(disclosures: bool, limit: int | None) -> Callable[[], None]:
        """The same through broker.audit.fastread (a new reader each time, as a process
        opens one)."""
        vault = vaults.load_vault(home)

        def run() -> None:
            with fastread.open_reader(url) as reader:
                if disclosures:
                    fastread.disclosures(reader, vault, child, limit=limit)
                else:
                    fastread.events(reader, child, limit=limit)
                if limit:
                    fastread.count_matching(reader, child, disclosures_only=disclosures)

        return run

    def query_verify() -> None:
        with db.read_session() as s:
            verdict = verify_log(s)  # one process
        assert verdict.ok, verdict

    cases: list[tuple[str, list[str], Callable[[], None], Callable[[], None] | None]] = [
        (f"audit --child {child}", ["--child", child], listing(True, TABLE_LIMIT),
         fast_listing(True, TABLE_LIMIT)),
        (f"audit --child {child} --json", ["--child", child, "--json"], listing(True, None),
         fast_listing(True, None)),
        (f"audit --child {child} --all", ["--child", child, "--all"],
         listing(False, TABLE_LIMIT), fast_listing(False, TABLE_LIMIT)),
        ("audit verify", ["verify"], query_verify, None),
    ]
    for what, args, query, fast_query in cases:
        r = 3 if args == ["verify"] else rounds
        if fast_query is not None:
            print(f"{label}: {what} as a new process: {_which_path(home, args, env)}",
                  flush=True)
        out.append((label, what, "CLI process", _times(_subprocess([*cmd, *args], env), r)))
        if fast_query is not None:
            # The same listing through click, as every listing ran before the entry point
            # (broker.cli.entry) read its arguments itself, timed right after the above.
            click_cmd = [sys.executable, "-m", "broker.cli.main", *cmd[-3:]]
            out.append((label, what, "through click", _times(
                _subprocess([*click_cmd, *args], env), r)))
        with redirect_stdout(io.StringIO()):
            out.append((label, what, "in process", _times(_in_process(home, args), r)))
        if fast_query is not None:
            out.append((label, what, "fast query", _times(fast_query, r)))
        how = "1 process" if args == ["verify"] else "query only"
        out.append((label, what, how, _times(query, r)))
        print(f"{label}: measured {what} (load average {_load()})", flush=True)
    db.dispose()
    return out


def _which_path(home: Path, args: list[str], env: dict[str, str]) -> str:
    """Which read path a new `broker audit` process took, from what it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "broker", "audit", "--home",
         str(home), *args], env=cli_env(env), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{args} failed: {done.stderr[-2000:]}")
    heavy = sorted({line.split("|")[-1].strip().split(".")[0]
                    for line in done.stderr.splitlines() if line.startswith("import time:")}
                   & {"sqlalchemy", "rich", "psycopg", "alembic", "click"})
    return (f"SQLAlchemy path (imported {', '.join(heavy)})" if "sqlalchemy" in heavy
            else f"fast path (heavy imports: {', '.join(heavy) or 'none'})")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def floor(rounds: int) -> list[tuple]:
    """What any command pays before it does anything."""
    return [
        ("-", "python -c pass", "CLI process",
         _times(_subprocess([sys.executable, "-c", "pass"], dict(os.environ)), rounds)),
        ("-", "broker --version", "CLI process",
         _times(_subprocess([*_broker_cmd(), "--version"], dict(os.environ)), rounds)),
        ("-", "imports of `broker audit` listing", "CLI process",
         _times(_subprocess([sys.executable, "-c", "import broker.cli.entry, "
                             "broker.audit.listing, broker.config, broker.audit.fastread, "
                             "broker.crypto.vault, sqlite3, ctypes"],
                            dict(os.environ)), rounds)),
        ("-", "... and click (before: every command)", "CLI process",
         _times(_subprocess([sys.executable, "-c", "import broker.cli.main, "
                             "broker.cli.audit, broker.cli.context, broker.audit.fastread, "
                             "broker.crypto.vault, sqlite3, ctypes"],
                            dict(os.environ)), rounds)),
    ]


def explain(url: str, child: str) -> str:
    """The plan of the default listing's query (the latest disclosures of one child), to
    see it reads them from the child index, not the whole log."""
    from broker.cli.audit import TABLE_LIMIT

    engine: Engine = create_engine(url)
    query = queries._filtered(
        select(queries.TABLE).where(AuditEvent.action == queries.DELIVERED),
        child, None, None, None, newest_first=True,
    ).limit(TABLE_LIMIT)
    compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        lines = [" ".join(str(c) for c in row) for row in conn.exec_driver_sql(
            prefix + str(compiled))]
    engine.dispose()
    return "\n".join(lines)


def run_backend(name: str, pg: str, args: argparse.Namespace) -> list[tuple]:
    with tempfile.TemporaryDirectory() as tmp:
        admin = None
        if name == "sqlite":
            url = f"sqlite:///{Path(tmp) / 'broker.db'}"
        else:
            base = make_url(pg)
            dbname = f"broker_bench_audit_{os.getpid()}"
            admin = create_engine(base, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
                conn.execute(text(f'CREATE DATABASE "{dbname}"'))
            url = base.set(database=dbname).render_as_string(hide_password=False)
        try:
            home, vault = make_home(Path(tmp), url)
            upgrade(url)
            t0 = time.perf_counter()
            build(url, vault, args.events, args.children)
            print(f"{name}: built {args.events:,} events over {args.children} children "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
            child = f"child{(args.children + 1) // 2:03d}"
            print(f"{name}: plan of `audit --child {child}`:\n  "
                  + explain(url, child).replace("\n", "\n  "), flush=True)
            return measure(name, home, url, child, args.rounds)
        finally:
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
                admin.dispose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pg", default=os.environ.get(
        "BROKER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--children", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--db", nargs="+", choices=["sqlite", "postgresql"],
                   default=["sqlite", "postgresql"])
    args = p.parse_args()
    cache = tempfile.TemporaryDirectory(prefix="audit-scale-pycache-")
    PYCACHE["dir"] = cache.name
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print(f"PYTHONDONTWRITEBYTECODE is set: timed processes cache bytecode in "
              f"{cache.name}", flush=True)
    results = floor(args.rounds)
    for name in args.db:
        results += run_backend(name, args.pg, args)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{cpus} CPUs; load average now {_load()}. cpu: this process only (not the "
          "child process of a CLI run, nor verify's worker processes).")
    print(f"{'database':<11} {'command':<36} {'how':<12} {'median':>9} {'max':>9} "
          f"{'cpu':>9}")
    for db_name, what, how, (wall, cpu) in results:
        cpu_text = f"{statistics.median(cpu) * 1000:>7.0f}ms" if how != "CLI process" else ""
        print(f"{db_name:<11} {what:<36} {how:<12} {statistics.median(wall) * 1000:>7.0f}ms "
              f"{max(wall) * 1000:>7.0f}ms {cpu_text:>9}")
    cache.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
