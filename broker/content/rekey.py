"""Key status and rotation: what is sealed under which key, and re-sealing it all.

`rotate` never loses anything, whatever the moment of a crash:

1. the new key is appended to the keyring file (written aside, fsync'd, renamed) before
   anything is re-sealed, so every blob stays openable by some key of the file;
2. each content and spool file is opened, checked, sealed under the new key into a new
   file, fsync'd, and renamed over the old one (content references do not change: they
   are keyed by the keyring's reference key, which rotation keeps);
3. each sealed database field (records.subject and .policy, deliveries.summary) is re-sealed in
   batches; on SQLite with secure_delete on and a WAL checkpoint afterwards, so the old
   ciphertext does not linger in free pages or the WAL; on PostgreSQL the two tables are
   rewritten (VACUUM FULL) for the same reason;
4. only with ``drop_old``, and only if a recount finds nothing left under an old key, the
   keyring is rewritten with the new key alone. By default old keys stay, so backups made
   before the rotation still open.

Run it with the broker stopped: a daemon still running seals new content under the key it
loaded at start (a second rotation, or `broker key status`, finds those leftovers).
"""

from __future__ import annotations

import base64
import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa

from broker.config import Settings
from broker.content.store import ContentStore
from broker.crypto import vault as vaults
from broker.db.engine import Database
from broker.intake.spool import Spool

# (table, id column, sealed column): every sealed database field.
SEALED_COLUMNS = (("records", "id", "subject"), ("records", "id", "policy"),
                  ("deliveries", "id", "summary"),
                  ("content_blobs", "ref", "data"))
BATCH = 500
PLAINTEXT = "plaintext"


@dataclass
class KeyCounts:
    """How many blobs each key id (hex) seals, per place; PLAINTEXT for unsealed ones."""

    content: Counter[str] = field(default_factory=Counter)
    spool: Counter[str] = field(default_factory=Counter)
    database: Counter[str] = field(default_factory=Counter)

    def total(self) -> Counter[str]:
        return self.content + self.spool + self.database


@dataclass
class RotateResult:
    new_key: str
    content: int = 0
    spool: int = 0
    database: int = 0
    errors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _hex(kid: bytes | None) -> str:
    return kid.hex() if kid is not None else PLAINTEXT


def _raw_table(name: str, id_col: str, col: str) -> sa.TableClause:
    """The table without its column types: sealed values as stored, not opened."""
    return sa.table(name, sa.column(id_col), sa.column(col))


def count(settings: Settings, vault: vaults.Vault, db: Database) -> KeyCounts:
    counts = KeyCounts()
    store = ContentStore(settings.content_dir, vault)
    for path in store.files():
        counts.content[_hex(store.key_id_of(path))] += 1
    spool = Spool(settings.spool_dir, vault=vault)
    for path in spool.message_files():
        blob = spool.stored_bytes_at(path)
        if blob is not None:
            counts.spool[_hex(vaults.blob_key_id(blob[:64]))] += 1
    with db.engine.connect() as conn:
        for table, id_col, col in SEALED_COLUMNS:
            t = _raw_table(table, id_col, col)
            for (value,) in conn.execute(sa.select(t.c[col]).where(t.c[col].is_not(None))):
                counts.database[_hex(vaults.text_key_id(value))] += 1
    return counts


def _batches(conn: sa.Connection, table: str, id_col: str, col: str) -> Iterator[list]:
    t = _raw_table(table, id_col, col)
    last = None
    while True:
        q = sa.select(t.c[id_col], t.c[col]).where(t.c[col].is_not(None))
        if last is not None:
            q = q.where(t.c[id_col] > last)
        rows = list(conn.execute(q.order_by(t.c[id_col]).limit(BATCH)))
        if not rows:
            return
        last = rows[-1][0]
        yield rows


def reseal_database(db: Database, vault: vaults.Vault) -> int:
    """Re-seal every sealed field (and seal legacy plaintext) under the current key."""
    changed = 0
    sqlite = db.engine.dialect.name == "sqlite"
    current = vault.current.id
    with db.engine.connect() as conn:
        if sqlite:
            # On the raw connection, outside a transaction (the engine begins IMMEDIATE).
            conn.connection.driver_connection.execute("PRAGMA secure_delete=ON")
        for table, id_col, col in SEALED_COLUMNS:
            t = _raw_table(table, id_col, col)
            for rows in _batches(conn, table, id_col, col):
                for rid, value in rows:
                    kid = vaults.text_key_id(value)
                    if kid == current:
                        continue
                    # Re-sealed as bytes: content blobs are binary, text fields UTF-8.
                    plain = (vault.open(base64.b64decode(value)) if kid is not None
                             else value.encode("utf-8"))
                    resealed = base64.b64encode(vault.seal(plain)).decode("ascii")
                    conn.execute(sa.update(t).where(t.c[id_col] == rid)
                                 .values({col: resealed}))
                    changed += 1
                conn.commit()
        if sqlite:
            conn.commit()
            conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if db.engine.dialect.name == "postgresql" and changed:
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM FULL records, deliveries, content_blobs")
    return changed


def rotate(settings: Settings, *, drop_old: bool = False,
           progress: Callable[[str], None] = lambda _msg: None) -> RotateResult:
    home = settings.home
    old = vaults.load_vault(home)
    if old.source == vaults.ENV_VAR:
        raise vaults.VaultError(
            f"the keys come from {vaults.ENV_VAR}, so the broker cannot add one: put a new "
            f"key after the old ones there (newest last) and run `broker key rotate` again "
            f"with --reseal-only")
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    fresh = vaults.Key(vaults.new_key(), created)
    while fresh.id in old.key_ids:  # a 4-byte id collision: astronomically rare, but cheap
        fresh = vaults.Key(vaults.new_key(), created)
    new = vaults.Vault([*old.keys, fresh], old.ref_key, old.source)
    vaults.write_keyring(home, new)
    progress(f"new key {fresh.hex_id} is current (written to {vaults.key_path(home)})")
    result = reseal(settings, new)
    result.new_key = fresh.hex_id
    if drop_old:
        result.dropped = drop_old_keys(settings, new, result)
    return result


def reseal(settings: Settings, vault: vaults.Vault) -> RotateResult:
    """Re-seal everything under the vault's current key; errors are collected, not fatal
    (the file or field in question stays as it was, still openable by its old key)."""
    vaults.register(settings.database_url, vault)
    result = RotateResult(new_key=vault.current.hex_id)
    store = ContentStore(settings.content_dir, vault)
    for path in list(store.files()):
        try:
            result.content += store.reseal(path)
        except (vaults.SealError, OSError) as exc:
            result.errors.append(f"content {path.name}: {exc}")
    spool = Spool(settings.spool_dir, vault=vault)
    for path in spool.message_files():
        try:
            result.spool += spool.reseal(path)
        except (vaults.SealError, OSError) as exc:
            result.errors.append(f"spool {path.name}: {exc}")
    db = Database(settings.database_url)
    try:
        result.database = reseal_database(db, vault)
    except vaults.SealError as exc:
        result.errors.append(f"database: {exc}")
    finally:
        db.dispose()
    return result


def drop_old_keys(settings: Settings, vault: vaults.Vault, result: RotateResult) -> list[str]:
    """Keep only the current key, if a recount finds nothing sealed under another."""
    if result.errors:
        raise vaults.VaultError("not dropping old keys: some content could not be re-sealed")
    if vault.source == vaults.ENV_VAR:
        raise vaults.VaultError(f"the keys come from {vaults.ENV_VAR}: remove the old ones "
                                "there yourself (everything is re-sealed under the newest)")
    db = Database(settings.database_url)
    try:
        left = count(settings, vault, db).total()
    finally:
        db.dispose()
    others = {k: n for k, n in left.items() if k != vault.current.hex_id and n}
    if others:
        raise vaults.VaultError(
            "not dropping old keys: still sealed under them (is the broker running?): "
            + ", ".join(f"{k}: {n}" for k, n in sorted(others.items())))
    dropped = [k.hex_id for k in vault.keys[:-1]]
    kept = vaults.Vault([vault.current], vault.ref_key, vault.source)
    vaults.write_keyring(settings.home, kept)
    vaults.register(settings.database_url, kept)
    return dropped
