"""A large message read a piece at a time: from the sealed spool file, through the vault,
into the MIME parser, so the worker never holds the whole plaintext beside the parser's own
copy of it (issue 7, benchmark 3: peak memory under 3x the largest message).

The pieces are authenticated only after the last one: whatever was made of them must be
thrown away when that fails, and these tests check that it is. The pipeline's side (its
memory, and a file damaged between its reads) is in tests/test_pipeline_large.py."""

from __future__ import annotations

import os
from email import policy
from pathlib import Path

import pytest

from broker.crypto import vault as vaults
from broker.intake.spool import Envelope, Spool, SpoolCorrupt
from broker.mail.parse import ParseFailed, parse_message
from tests.harness import DOMAIN, report


def sealed_pieces(vault: vaults.Vault, blob: bytes, tmp_path: Path, piece: int) -> list[bytes]:
    path = tmp_path / "blob"
    path.write_bytes(b"lead-in" + blob)
    with open(path, "rb") as f:
        f.seek(len(b"lead-in"))
        return list(vault.open_pieces(f, len(blob), piece=piece))


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 100_003])
@pytest.mark.parametrize("piece", [7, 4096, 1 << 20])
def test_the_pieces_are_the_sealed_bytes(tmp_path: Path, size: int, piece: int) -> None:
    vault = vaults.Vault.from_keys([vaults.new_key()])
    data = os.urandom(size)
    pieces = sealed_pieces(vault, vault.seal(data), tmp_path, piece)
    assert b"".join(pieces) == data == vault.open(vault.seal(data))
    assert all(len(p) <= piece for p in pieces)


def test_altered_cut_or_foreign_sealed_bytes_fail(tmp_path: Path) -> None:
    vault = vaults.Vault.from_keys([vaults.new_key()])
    data = os.urandom(50_000)
    blob = vault.seal(data)

    altered = bytearray(blob)
    altered[len(blob) // 2] ^= 1
    handed_out: list[bytes] = []
    path = tmp_path / "altered"
    path.write_bytes(altered)
    with open(path, "rb") as f, pytest.raises(vaults.SealError, match="altered or damaged"):
        for piece in vault.open_pieces(f, len(altered), piece=8192):
            handed_out.append(piece)
    # The failure comes after the last piece: the caller must throw the pieces away.
    assert sum(map(len, handed_out)) == len(data)

    with pytest.raises(vaults.SealError, match="altered or damaged"):
        sealed_pieces(vault, bytes(blob[:-1]) + bytes([blob[-1] ^ 1]), tmp_path, 8192)
    with pytest.raises(vaults.SealError, match="ends early"):
        path.write_bytes(blob[:-100])
        with open(path, "rb") as f:
            list(vault.open_pieces(f, len(blob), piece=8192))
    with pytest.raises(vaults.SealError, match="not in this keyring"):
        sealed_pieces(vaults.Vault.from_keys([vaults.new_key()]), blob, tmp_path, 8192)
    with pytest.raises(vaults.SealError, match="not sealed"):
        sealed_pieces(vault, data, tmp_path, 8192)


def store(spool: Spool, data: bytes) -> str:
    return spool.store(data, Envelope.for_message(
        data, mail_from="lee@clinic.example", rcpt_tos=(f"sam@{DOMAIN}",), peer="x",
        helo="x"))


@pytest.mark.parametrize("sealed", [True, False])
def test_the_spool_reads_a_message_in_pieces_or_into_one_buffer(
        tmp_path: Path, sealed: bool) -> None:
    vault = vaults.Vault.from_keys([vaults.new_key()]) if sealed else None
    spool = Spool(tmp_path / "spool", commit="each", vault=vault)
    data = os.urandom(3 * 1024 * 1024 + 11)
    sid = store(spool, data)
    assert (data in spool.stored_bytes(sid)) != sealed  # type: ignore[operator]
    assert b"".join(spool.read_pieces(sid)) == data
    buffer = spool.read_buffer(sid)
    assert isinstance(buffer, bytearray) and buffer == data == spool.read(sid)

    spool.remove(sid)
    with pytest.raises(FileNotFoundError):
        list(spool.read_pieces(sid))
    with pytest.raises(FileNotFoundError):
        spool.read_buffer(sid)


@pytest.mark.parametrize("sealed", [True, False])
def test_a_spool_file_altered_on_disk_is_refused_in_pieces_too(
        tmp_path: Path, sealed: bool) -> None:
    vault = vaults.Vault.from_keys([vaults.new_key()]) if sealed else None
    spool = Spool(tmp_path / "spool", commit="each", vault=vault)
    sid = store(spool, os.urandom(2 * 1024 * 1024))
    path = spool.root / f"{sid}.eml"
    damaged = bytearray(path.read_bytes())
    damaged[-5000] ^= 0x20
    path.write_bytes(damaged)
    with pytest.raises(SpoolCorrupt):
        list(spool.read_pieces(sid))
    with pytest.raises(SpoolCorrupt):
        spool.read_buffer(sid)
    with pytest.raises(SpoolCorrupt):
        spool.read(sid)


def corpus_messages(corpus: Path) -> list[Path]:
    return sorted(p for p in (corpus / "mime").rglob("*") if p.is_file()
                  and p.suffix in (".eml", ".txt", ".msg", ""))[:80]


def test_a_message_parsed_from_pieces_is_the_message_parsed_from_bytes(corpus: Path) -> None:
    """Every corpus message (odd MIME included), fed in 7-byte and 64 KB pieces, reads
    the same as from its bytes: subject, sender, paragraphs and attachments."""
    files = corpus_messages(corpus)
    assert files, "no MIME samples in the corpus"
    compared = 0
    for path in files:
        raw = path.read_bytes()
        try:
            whole = parse_message(raw)
        except ParseFailed:
            continue
        for size in (7, 65536):
            def pieces(raw: bytes = raw, size: int = size) -> list[bytes]:
                return [raw[i:i + size] for i in range(0, len(raw), size)]

            assert parse_message(pieces) == whole, path.name
        compared += 1
    assert compared >= 10


class Broken(Exception):
    pass


def test_a_reader_that_fails_is_not_taken_for_malformed_mail() -> None:
    """The spool's checks fail after the last piece -> the parser's caller gets that
    error (the message is set aside as damaged), not "malformed" (which would quarantine
    a record made from unauthenticated bytes)."""
    data = report(subject="a note").as_bytes(policy=policy.SMTP)

    def failing_at_the_end():
        yield data
        raise Broken("checks failed after the last piece")

    with pytest.raises(Broken):
        parse_message(failing_at_the_end)



# mail-parser gives up on this one (AttributeError); the stdlib's parser reads it.
FALLBACK_SAMPLE = "malformed/stalwart-mail-parser/001.eml"


def test_the_fallback_parser_reads_pieces_again_and_a_failing_reader_still_fails(
        corpus: Path) -> None:
    """A message mail-parser cannot read is read again, from its pieces, by the stdlib's
    parser -> the same document as from its bytes; and a reader that fails on that second
    read raises its own error there too, not "malformed"."""
    raw = (corpus / FALLBACK_SAMPLE).read_bytes()
    reads: list[int] = []

    def pieces():
        reads.append(1)
        yield from (raw[i:i + 100] for i in range(0, len(raw), 100))

    assert parse_message(pieces) == parse_message(raw)
    assert len(reads) == 2  # mail-parser's read, then the fallback's

    def fails_second_time():
        reads.append(1)
        if len(reads) > 3:
            raise Broken("checks failed on the second read")
        yield raw

    with pytest.raises(Broken):
        parse_message(fails_second_time)
    assert len(reads) == 4
