"""Encryption at rest (DESIGN.md promise 7): a record's content is on no disk in the clear.

A record carrying a unique marker (subject, body, an attachment's name and text) goes the
whole way - provider sends, review, APPROVE, released - and then the database file(s), the
spool, the content store and every log line are searched as bytes, in the forms mail uses
(plain, base64 at every alignment, quoted-printable): zero hits. On PostgreSQL every text
column of every table is searched instead. Then: key rotation loses nothing and leaves no
old ciphertext behind, a wrong key fails clearly, and a key from the environment works.
"""

from __future__ import annotations

import base64
import logging
import os
import quopri
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import select

from broker.cli.main import cli
from broker.config import Settings
from broker.content.store import ContentStore
from broker.crypto import vault as vaults
from broker.db.models import ContentBlob
from broker.intake.spool import Envelope, Spool
from broker.runtime import Runtime
from tests.harness import DOMAIN, World, reply_to, report

MARKER = "Quillfeather Zanzibar-7731"
FILENAME = "Quillfeather Zanzibar-7731 notes.txt"


def forms(marker: str) -> list[bytes]:
    """The marker as bytes in every form a mail or a log could carry it."""
    raw = marker.encode("utf-8")
    out = {raw, raw.lower(), raw.upper(), quopri.encodestring(raw).rstrip(b"\n"),
           quopri.encodestring(raw, header=True)}
    for pad in range(3):  # base64 of the marker at each alignment within a longer text
        enc = base64.b64encode(b"x" * pad + raw)
        skip = (pad * 4 + 2) // 3 + 1  # drop characters that also encode the padding
        out.add(enc[skip:-4])
    return [f for f in out if len(f) >= 8]


def hits(data: bytes, where: str) -> list[str]:
    return [f"{where}: {form!r}" for form in forms(MARKER) if form in data]


def scan_tree(root: Path) -> list[str]:
    found: list[str] = []
    if root.exists():
        for path in root.rglob("*"):
            if path.is_file():
                found += hits(path.read_bytes(), str(path))
    return found


def marked_report():
    return report(
        subject=f"OT report - {MARKER}",
        body=f"Sam worked on handwriting.\n\nThe code word is {MARKER} for this month.\n",
        attachments=((FILENAME, "text/plain",
                      f"Notes: {MARKER} appears in the attachment too.\n".encode()),),
    )


@pytest.fixture
def world(tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.delenv(vaults.ENV_VAR, raising=False)
    monkeypatch.setenv("BROKER_DATABASE_URL", db_url)  # for the CLI commands below
    caplog.set_level(logging.DEBUG, logger="broker")
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def release_marked(world: World) -> None:
    world.send(marked_report(), "lee@clinic.example", f"sam@{DOMAIN}")
    review = world.review()
    world.send(reply_to(review, "APPROVE"), "dana@home.example", str(review.msg["Reply-To"]))
    copies = world.wait_for(lambda m: m.rcpt_tos[0] in ("park@school.example",
                                                        "ortiz@school.example"), count=2)
    world.wait_state("released")
    world.wait_audit("delivered", count=2)
    # The flow really carried the marker: the released copies have it (in transit, by design).
    assert all(MARKER in c.text() for c in copies)


def cli_run(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--home", str(home)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def scan_database(world: World, db_url: str) -> list[str]:
    if db_url.startswith("sqlite"):
        path = Path(sa.make_url(db_url).database or "")
        found: list[str] = []
        for suffix in ("", "-wal", "-shm", "-journal"):
            p = path.with_name(path.name + suffix)
            if p.exists():
                found += hits(p.read_bytes(), str(p))
        return found
    found = []
    with world.db.engine.connect() as conn:
        cols = conn.execute(sa.text(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND data_type IN ('text', 'character varying')"))
        for table, column in list(cols):
            for form in forms(MARKER):
                n = conn.execute(sa.text(
                    f'SELECT count(*) FROM "{table}" WHERE strpos("{column}", :f) > 0'),
                    {"f": form.decode("ascii", "replace")}).scalar()
                if n:
                    found.append(f"{table}.{column}: {form!r}")
    return found


def test_marker_is_nowhere_at_rest(world: World, db_url: str, caplog: pytest.LogCaptureFixture,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    release_marked(world)
    world.stop_broker()  # everything flushed, WAL included
    found = scan_database(world, db_url)
    found += scan_tree(world.settings.spool_dir)
    found += scan_tree(world.settings.content_dir)
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()
    found += hits(logs, "log records")
    out, err = capfd.readouterr()
    found += hits(err.encode(), "stderr") + hits(out.encode(), "stdout")
    assert found == []
    with world.db.session() as s:
        blobs = s.scalars(select(ContentBlob.data)).all()
    assert blobs or list(world.settings.content_dir.rglob("*/*")), "content was stored"
    assert all(b.startswith("QlJLU") for b in blobs)  # every blob sealed
    mode = vaults.key_path(world.home).stat().st_mode & 0o777
    assert mode == 0o600

    # Still readable through the broker: the records list and the audit open what's sealed.
    assert world.record().subject == f"OT report - {MARKER}"
    listing = cli_run(world.home, "records", "--json")
    assert MARKER in listing
    audit = cli_run(world.home, "audit", "--json")
    assert audit.count(MARKER) >= 2 and FILENAME in audit
    # ...but the audit log itself holds no content.
    for event in world.audit():
        assert MARKER not in event.description, event.action


def _sealed_db_values(world: World) -> list[str]:
    with world.db.engine.connect() as conn:
        return [v for (v,) in conn.execute(sa.text(
            "SELECT subject FROM records UNION ALL SELECT summary FROM deliveries "
            "UNION ALL SELECT data FROM content_blobs")) if v]


def test_rotation_reseals_everything_and_loses_nothing(world: World, db_url: str) -> None:
    release_marked(world)
    world.stop_broker()
    settings = world.settings
    old_vault = vaults.load_vault(world.home)
    # Small content lives in the database; large content (here one item stored without a
    # session, as a 25 MB mail would be) in files: rotation must re-seal both.
    ContentStore(settings.content_dir, old_vault).put(b"file-backed " + MARKER.encode())
    old_files = {p: p.read_bytes() for p in settings.content_dir.rglob("*/*")}
    assert old_files
    # A message still waiting in the spool is re-sealed as well.
    spool = Spool(settings.spool_dir, commit="each", vault=old_vault)
    pending = b"Subject: waiting\r\n\r\nstill in the spool " + MARKER.encode() + b"\r\n"
    spool_id = spool.store(pending, Envelope.for_message(
        pending, mail_from="lee@clinic.example", rcpt_tos=[f"sam@{DOMAIN}"], peer="x", helo="x"))
    old_spool = spool.stored_bytes(spool_id) or b""
    old_values = _sealed_db_values(world)
    assert old_values and all(vaults.is_sealed_text(v) for v in old_values)

    out = cli_run(world.home, "key", "rotate")
    assert "old keys kept" in out
    new_vault = vaults.load_vault(world.home)
    assert len(new_vault.keys) == 2 and new_vault.current.id != old_vault.current.id

    # Every blob now sits under the new key; no old ciphertext is left on disk.
    store = ContentStore(settings.content_dir, new_vault)
    disk = b"".join(p.read_bytes() for p in settings.content_dir.rglob("*") if p.is_file())
    for path, blob in old_files.items():
        assert store.key_id_of(path) == new_vault.current.id
        assert blob[vaults.HEADER_LEN:] not in disk
    assert set(settings.content_dir.rglob("*/*")) == set(old_files)  # same references
    new_spool = Spool(settings.spool_dir, vault=new_vault)
    assert vaults.blob_key_id(new_spool.stored_bytes(spool_id) or b"") == new_vault.current.id
    assert old_spool[vaults.HEADER_LEN:] not in new_spool._path(spool_id, ".eml").read_bytes()
    assert new_spool.read(spool_id) == pending
    new_values = _sealed_db_values(world)
    assert all(vaults.text_key_id(v) == new_vault.current.id for v in new_values)
    if db_url.startswith("sqlite"):
        path = Path(sa.make_url(db_url).database or "")
        db_bytes = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        for value in old_values:
            assert value.encode() not in db_bytes

    # Nothing lost: records, documents and the audit still read.
    assert world.record().subject == f"OT report - {MARKER}"
    assert MARKER in cli_run(world.home, "records", "show", str(world.record().id))
    assert MARKER in cli_run(world.home, "audit")
    assert "0 / 0 / 0" not in cli_run(world.home, "key", "status")

    # Old backups still open with the kept key; --drop-old then forgets it.
    assert old_vault.current.id in new_vault.key_ids
    out = cli_run(world.home, "key", "rotate", "--drop-old")
    assert "dropped old key(s)" in out
    final = vaults.load_vault(world.home)
    assert len(final.keys) == 1
    assert MARKER in cli_run(world.home, "audit")
    assert world.record().subject == f"OT report - {MARKER}"
    for path in old_files:  # every file opens (and matches its reference) under the new key
        ContentStore(settings.content_dir, final).get(path.name)
    with pytest.raises(vaults.SealError):  # and the dropped key is really gone
        ContentStore(settings.content_dir, new_vault).get(next(iter(old_files)).name)


def test_wrong_key_or_tampering_fails_clearly(tmp_path: Path) -> None:
    right = vaults.Vault.from_keys([vaults.new_key()])
    wrong = vaults.Vault.from_keys([vaults.new_key()])
    blob = right.seal(MARKER.encode())
    assert MARKER.encode() not in blob and right.open(blob) == MARKER.encode()
    with pytest.raises(vaults.SealError, match="not in this keyring"):
        wrong.open(blob)
    # Same key id, other key material: authentication fails.
    forged = vaults.Vault([vaults.Key(vaults.new_key())], right.ref_key)
    relabelled = blob[:5] + forged.current.id + blob[9:]
    with pytest.raises(vaults.SealError):
        forged.open(relabelled)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(vaults.SealError, match="altered or damaged"):
        right.open(bytes(tampered))
    with pytest.raises(vaults.SealError, match="not sealed"):
        right.open(MARKER.encode() * 3)
    text = right.seal_text(MARKER)
    assert text.startswith(vaults.TEXT_PREFIX) and right.open_text(text) == MARKER
    with pytest.raises(vaults.SealError):
        wrong.open_text(text)

    store = ContentStore(tmp_path / "content", right)
    ref = store.put(MARKER.encode())
    assert ref != __import__("hashlib").sha256(MARKER.encode()).hexdigest()
    with pytest.raises(vaults.SealError, match="not in this keyring"):
        ContentStore(tmp_path / "content", wrong).get(ref)
    # A home whose key file is gone while content exists refuses to invent a new key.
    home = tmp_path
    with pytest.raises(vaults.VaultError, match="missing"):
        vaults.load_vault(home, create_if_fresh=True)


def test_key_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = vaults.new_key()
    monkeypatch.setenv(vaults.ENV_VAR, base64.b64encode(key).decode())
    home = tmp_path / "home"
    home.mkdir()
    settings = Settings(home=home, domain=DOMAIN,
                        database_url=f"sqlite:///{tmp_path / 'broker.db'}")
    rt = Runtime.open(settings)
    try:
        assert rt.vault.source == vaults.ENV_VAR
        assert not vaults.key_path(home).exists()  # no key file written
        ref = rt.content.put(MARKER.encode())
        assert rt.content.get(ref) == MARKER.encode()
        assert hits(b"".join(p.read_bytes() for p in settings.content_dir.rglob("*/*")),
                    "content") == []
    finally:
        rt.close()
    # The same key in a key file (as `broker init` derives its ref line) opens the same
    # content under the same references.
    monkeypatch.delenv(vaults.ENV_VAR)
    vaults.write_keyring(home, vaults.Vault.from_keys([key]))
    assert ContentStore(settings.content_dir, vaults.load_vault(home)).get(ref) == \
        MARKER.encode()
    # Several keys, newest last, seal with the newest.
    newer = vaults.new_key()
    monkeypatch.setenv(vaults.ENV_VAR, f"{base64.b64encode(key).decode()},"
                                       f"{base64.b64encode(newer).decode()}")
    ring = vaults.load_vault(home)
    assert ring.current.id == vaults.key_id(newer) and ring.ref_key == \
        vaults.derive_ref_key(key)
    monkeypatch.setenv(vaults.ENV_VAR, "not base64!")
    with pytest.raises(vaults.VaultError):
        vaults.load_vault(home)
    assert os.environ[vaults.ENV_VAR]
