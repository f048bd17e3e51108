"""The listing views of `broker audit`, read without SQLAlchemy (issue 7, benchmark 4).

Why this exists: a new `broker audit --child X` process spent 0.6-1.1 s importing
SQLAlchemy, the ORM models and rich for a query of 3-8 ms. This module asks the same
questions as broker.audit.queries (disclosures, events, count_matching, child_slugs) with
the same SQL filters, order and limit, through the plain DB-API: `sqlite3` for SQLite, and
for PostgreSQL libpq itself through ctypes (the copy psycopg-binary ships, else the
system's), because importing psycopg alone takes over 100 ms. psycopg is the last resort.

It serves only what it can serve exactly. An unknown URL form, a database that is not at
the newest migration, a driver error or a sealed value it cannot open raises Unavailable,
and the caller takes the queries path, which then gives today's answer or today's error.
tests/test_audit_fastread.py holds both paths to the same rows and the same output.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.audit.rows import (
    DELIVERED,
    SUMMARY_BATCH,
    Disclosure,
    EventRow,
    day_start,
    delivery_id,
    disclosure,
    event_row,
    loads,
)

if TYPE_CHECKING:
    from broker.crypto.vault import Vault

VERSIONS = Path(__file__).resolve().parents[1] / "db" / "migrations" / "versions"
EVENT_COLUMNS = "seq, at, child, record_id, actor, actor_role, action, recipients, description"


class Unavailable(Exception):
    """This database cannot be read here; use broker.audit.queries instead."""


# -- connections --------------------------------------------------------------------------


class Reader:
    """One read-only transaction on the broker's database; SQL is written with `?`."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def bind_time(self, at: dt.datetime) -> Any:
        """A UTC instant as the `at` columns hold it: naive UTC (models.UTCDateTime)."""
        return at.astimezone(dt.UTC).replace(tzinfo=None)


class SqliteReader(Reader):
    """sqlite3, one deferred transaction (a reader never waits behind WAL writers)."""

    def __init__(self, path: str) -> None:
        import sqlite3
        from urllib.parse import quote

        self._errors = sqlite3.Error
        if not path or path == ":memory:" or not os.path.isfile(path):
            raise Unavailable(f"no SQLite file at {path!r}")
        try:
            # mode=rw: never create a database that is not there (the other path says why).
            self._conn = sqlite3.connect(
                f"file:{quote(path)}?mode=rw", uri=True, timeout=30, isolation_level=None
            )
            self._conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise Unavailable(f"sqlite: {exc}") from exc

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, tuple(params)).fetchall()
        except self._errors as exc:
            raise Unavailable(f"sqlite: {exc}") from exc

    def bind_time(self, at: dt.datetime) -> Any:
        # SQLAlchemy's SQLite DateTime storage format: compared as text.
        return super().bind_time(at).strftime("%Y-%m-%d %H:%M:%S.%f")

    def close(self) -> None:
        with suppress(self._errors):
            self._conn.execute("ROLLBACK")
        self._conn.close()


def _libpq_candidates() -> Iterator[str]:
    """libpq as psycopg-binary bundles it (what the other path uses), then the system's."""
    for entry in sys.path:
        if not entry or not os.path.isabs(entry):
            continue  # never a library from the working directory
        folder = os.path.join(entry, "psycopg_binary.libs")
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.startswith("libpq"):
                    yield os.path.join(folder, name)
    yield "libpq.so.5"
    yield "libpq.5.dylib"


_libpq: Any = None


def _load_libpq() -> Any:
    """The libpq shared library with the few signatures used here, or None."""
    global _libpq
    if _libpq is not None:
        return _libpq or None
    import ctypes

    lib = None
    for path in _libpq_candidates():
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError:
            continue
    if lib is None:
        _libpq = False
        return None
    p, s, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for name, res, args in (
        ("PQconnectdb", p, [s]),
        ("PQstatus", i, [p]),
        ("PQerrorMessage", s, [p]),
        ("PQsetClientEncoding", i, [p, s]),
        ("PQfinish", None, [p]),
        ("PQexecParams", p, [p, s, i, p, ctypes.POINTER(s), p, p, i]),
        ("PQresultStatus", i, [p]),
        ("PQresultErrorMessage", s, [p]),
        ("PQntuples", i, [p]),
        ("PQnfields", i, [p]),
        ("PQgetisnull", i, [p, i, i]),
        ("PQgetvalue", s, [p, i, i]),
        ("PQclear", None, [p]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    _libpq = lib
    return lib


PGRES_COMMAND_OK, PGRES_TUPLES_OK = 1, 2


class LibpqReader(Reader):
    """libpq through ctypes: every value comes back as text (or None for NULL)."""

    def __init__(self, lib: Any, conninfo: str) -> None:
        import ctypes

        self._lib = lib
        self._char_p = ctypes.c_char_p
        self._conn = lib.PQconnectdb(conninfo.encode("utf-8"))
        if not self._conn or lib.PQstatus(self._conn) != 0:
            message = lib.PQerrorMessage(self._conn) if self._conn else b"out of memory"
            if self._conn:
                lib.PQfinish(self._conn)
            raise Unavailable(f"postgresql: {message.decode('utf-8', 'replace').strip()}")
        lib.PQsetClientEncoding(self._conn, b"UTF8")
        self.rows("BEGIN READ ONLY")

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        lib = self._lib
        n = 0

        def number(_: re.Match[str]) -> str:
            nonlocal n
            n += 1
            return f"${n}"

        text = re.sub(r"\?", number, sql)
        values = (self._char_p * max(len(params), 1))(
            *(None if v is None else str(v).encode("utf-8") for v in params)
        )
        res = lib.PQexecParams(self._conn, text.encode("utf-8"), len(params), None,
                               values, None, None, 0)
        try:
            status = lib.PQresultStatus(res) if res else -1
            if status not in (PGRES_COMMAND_OK, PGRES_TUPLES_OK):
                why = lib.PQresultErrorMessage(res) if res else lib.PQerrorMessage(self._conn)
                raise Unavailable(f"postgresql: {why.decode('utf-8', 'replace').strip()}")
            cols = range(lib.PQnfields(res))
            value, isnull = lib.PQgetvalue, lib.PQgetisnull
            out = []
            for r in range(lib.PQntuples(res)):
                row = []
                for c in cols:
                    raw = value(res, r, c)  # b"" for NULL too: only then ask which
                    row.append(raw.decode("utf-8") if raw or not isnull(res, r, c) else None)
                out.append(tuple(row))
            return out
        finally:
            if res:
                lib.PQclear(res)

    def bind_time(self, at: dt.datetime) -> Any:
        return super().bind_time(at).isoformat(sep=" ")

    def close(self) -> None:
        self._lib.PQfinish(self._conn)


class PsycopgReader(Reader):
    """psycopg, when no libpq can be loaded directly (correct, but not fast to import)."""

    def __init__(self, conninfo: str) -> None:
        import psycopg

        self._errors = psycopg.Error
        try:
            self._conn = psycopg.connect(conninfo)
        except psycopg.Error as exc:
            raise Unavailable(f"postgresql: {exc}") from exc

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()
        except self._errors as exc:
            raise Unavailable(f"postgresql: {exc}") from exc

    def close(self) -> None:
        self._conn.rollback()
        self._conn.close()


SQLITE_PREFIXES = ("sqlite:///", "sqlite+pysqlite:///")
# The documented form and the one driver installed; others (psycopg2, "postgres://")
# are left to SQLAlchemy, which serves or refuses them as it always has.
POSTGRES_SCHEMES = ("postgresql+psycopg",)


def connect(url: str) -> Reader:
    """A reader for a database URL as broker.toml gives it; Unavailable for any other form."""
    for prefix in SQLITE_PREFIXES:
        if url.startswith(prefix):
            path = url[len(prefix):]
            if "?" in path or "%" in path:
                raise Unavailable("a SQLite URL with options or escapes")
            return SqliteReader(path)
    scheme, sep, rest = url.partition("://")
    if sep and scheme in POSTGRES_SCHEMES:
        conninfo = "postgresql://" + rest  # libpq reads the same URI without the driver
        lib = _load_libpq()
        return LibpqReader(lib, conninfo) if lib is not None else PsycopgReader(conninfo)
    raise Unavailable(f"no fast reader for {scheme or url!r} URLs")


def head_revision(folder: Path = VERSIONS) -> str:
    """The newest migration, read from the migration files (importing Alembic is slow)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    pattern = re.compile(r"^(down_revision|revision)\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", re.M)
    for path in folder.glob("*.py"):
        for name, value in pattern.findall(path.read_text(encoding="utf-8")):
            (parents if name == "down_revision" else revisions).add(value)
    heads = revisions - parents
    if len(heads) != 1:
        raise Unavailable(f"migration heads {sorted(heads)}: not one")
    return heads.pop()


@contextmanager
def open_reader(url: str) -> Iterator[Reader]:
    """A reader on a database whose schema is at the newest migration. Anything else
    (older, newer, not migrated) is Unavailable: the queries path behaves as it always
    has on such a database."""
    reader = connect(url)
    try:
        versions = [v for (v,) in reader.rows("SELECT version_num FROM alembic_version")]
        if versions != [head_revision()]:
            raise Unavailable(f"schema at {versions}, not at the newest migration")
        yield reader
    finally:
        reader.close()


# -- the questions ------------------------------------------------------------------------


Filters = tuple[str | None, dt.date | None, dt.date | None, int | None]


def _where(reader: Reader, filters: Filters, clauses: list[str],
           params: list[Any]) -> str:
    """The shared filters of queries._where, in its order; `until` is inclusive."""
    child, since, until, record_id = filters
    if child is not None:
        clauses.append("child = ?")
        params.append(child)
    if record_id is not None:
        clauses.append("record_id = ?")
        params.append(record_id)
    if since is not None:
        clauses.append("at >= ?")
        params.append(reader.bind_time(day_start(since)))
    if until is not None:
        clauses.append("at < ?")
        params.append(reader.bind_time(day_start(until + dt.timedelta(days=1))))
    return f" WHERE {' AND '.join(clauses)}" if clauses else ""


def _latest(reader: Reader, filters: Filters, clauses: list[str], params: list[Any],
            limit: int | None) -> list[tuple[Any, ...]]:
    """As queries._latest: oldest first; with a limit, the latest `limit` read newest
    first from the index. By seq for one record, else by time then seq (chain order)."""
    where = _where(reader, filters, clauses, params)
    order = ["seq"] if filters[3] is not None else ["at", "seq"]
    if not limit:
        sql = f"SELECT {EVENT_COLUMNS} FROM audit_events{where} ORDER BY {', '.join(order)}"
        return reader.rows(sql, params)
    desc = ", ".join(f"{c} DESC" for c in order)
    sql = f"SELECT {EVENT_COLUMNS} FROM audit_events{where} ORDER BY {desc} LIMIT ?"
    rows = reader.rows(sql, [*params, limit])
    rows.reverse()
    return rows


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _time(value: Any) -> dt.datetime:
    """Naive UTC as a driver hands it back (text or datetime), made aware UTC."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.UTC)


def _summaries(reader: Reader, vault: Vault | None,
               delivery_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Opened summaries of these deliveries (deliveries.summary is sealed), by id; a value
    written before sealing is read as it is, like models.SealedText does."""
    from broker.crypto.vault import SealError, is_sealed_text

    out: dict[int, dict[str, Any]] = {}
    unique = sorted(set(delivery_ids))
    for i in range(0, len(unique), SUMMARY_BATCH):
        chunk = unique[i : i + SUMMARY_BATCH]
        marks = ", ".join("?" for _ in chunk)
        for did, summary in reader.rows(
            f"SELECT id, summary FROM deliveries WHERE id IN ({marks})", chunk
        ):
            if summary is not None and is_sealed_text(summary):
                if vault is None:
                    raise Unavailable("a sealed summary and no content key")
                try:
                    summary = vault.open_text(summary)
                except SealError as exc:
                    raise Unavailable(f"summary of delivery {did}: {exc}") from exc
            loaded = loads(summary, {})
            out[int(did)] = loaded if isinstance(loaded, dict) else {}
    return out


def _to_disclosure(row: tuple[Any, ...], summary: dict[str, Any] | None,
                   desc: Any) -> Disclosure:
    seq, at, child, record_id, _actor, _role, _action, recipients, _ = row
    return disclosure(int(seq), _time(at), child, _int(record_id), recipients, desc, summary)


def disclosures(
    reader: Reader,
    vault: Vault | None,
    child: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    record_id: int | None = None,
    limit: int | None = None,
) -> list[Disclosure]:
    """As queries.disclosures: released copies oldest first, or only the latest `limit`."""
    rows = _latest(reader, (child, since, until, record_id), ["action = ?"], [DELIVERED],
                   limit)
    descs = [loads(row[8], {}) for row in rows]
    ids = [delivery_id(desc) for desc in descs]
    wanted = [d for d in ids if d is not None]
    summaries = _summaries(reader, vault, wanted) if wanted else {}
    return [
        _to_disclosure(row, summaries.get(d) if d is not None else None, desc)
        for row, desc, d in zip(rows, descs, ids, strict=True)
    ]


def _to_event(row: tuple[Any, ...]) -> EventRow:
    seq, at, child, record_id, actor, actor_role, action, recipients, description = row
    return event_row(int(seq), _time(at), child, _int(record_id), actor, actor_role, action,
                     recipients, description)


def events(
    reader: Reader,
    child: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    record_id: int | None = None,
    limit: int | None = None,
) -> list[EventRow]:
    """As queries.events: every matching event in chain order, or the latest `limit`."""
    return [_to_event(row) for row in
            _latest(reader, (child, since, until, record_id), [], [], limit)]


def count_matching(
    reader: Reader,
    child: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    record_id: int | None = None,
    *,
    disclosures_only: bool,
) -> int:
    """As queries.count_matching: how many match, counted in the index."""
    clauses, params = (["action = ?"], [DELIVERED]) if disclosures_only else ([], [])
    where = _where(reader, (child, since, until, record_id), clauses, params)
    rows = reader.rows(f"SELECT count(*) FROM audit_events{where}", params)
    return int(rows[0][0] or 0)


def child_slugs(reader: Reader) -> list[str]:
    """Known children, so a mistyped --child is an error rather than an empty answer."""
    return [slug for (slug,) in reader.rows("SELECT slug FROM children ORDER BY slug")]

