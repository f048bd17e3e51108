"""OpenPGP adapter (broker.crypto.pgp / pgpmime): interoperability with the gpg command line.

The gpg tests need Debian's gnupg (``apt-get install -y gnupg``); without it they skip with
that reason. Each test module run uses its own temporary GNUPGHOME.
"""

from __future__ import annotations

import binascii
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser
from pathlib import Path

import pytest

from broker.crypto import pgp, pgpmime
from broker.crypto.pgp import PGPError

GPG = shutil.which("gpg")
needs_gpg = pytest.mark.skipif(
    GPG is None, reason="gpg not installed: add `apt-get install -y gnupg` to .ci/run"
)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


class Gpg:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "GNUPGHOME": str(home)}

    def run(self, *args: str, input: bytes | None = None, check: bool = True):
        proc = subprocess.run(
            [GPG, "--batch", "--yes", "--no-tty", "--pinentry-mode", "loopback",
             "--passphrase", "", "--status-fd", "2", *args],
            input=input, capture_output=True, env=self.env, timeout=60,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"gpg {args} failed: {proc.stderr.decode(errors='replace')}")
        return proc

    def gen_key(self, uid: str, expire: str = "never", *extra: str) -> str:
        self.run(*extra, "--quick-gen-key", uid, "future-default", "default", expire)
        out = self.run("--with-colons", "--list-keys", uid).stdout.decode()
        return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))

    def export(self, who: str) -> str:
        return self.run("--armor", "--export", who).stdout.decode()

    def import_key(self, armored: str) -> None:
        self.run("--import", input=armored.encode())


@pytest.fixture(scope="module")
def gpg() -> Iterator[Gpg]:
    if GPG is None:
        pytest.skip("gpg not installed: add `apt-get install -y gnupg` to .ci/run")
    home = Path(tempfile.mkdtemp(prefix="gpgt"))  # short path: gpg-agent socket name limit
    home.chmod(0o700)
    g = Gpg(home)
    try:
        yield g
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=g.env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def broker_key(gpg: Gpg) -> tuple[str, str]:
    priv, pub = pgp.generate_keypair("Disclosure Broker", "broker@records.example")
    gpg.import_key(pub)
    return priv, pub


@pytest.fixture(scope="module")
def guardian(gpg: Gpg) -> tuple[str, str]:
    """(fingerprint, armored public key) of a gpg-generated ed25519/cv25519 key."""
    fpr = gpg.gen_key("Pat Guardian <pat@family.example>")
    return fpr, gpg.export(fpr)


def _sign_encrypt(signer_fpr: str, recipient_pub: str) -> list[str]:
    """gpg --sign --encrypt --armor with gpg's defaults (compression chosen by gpg)."""
    return ["--trust-model", "always", "--sign", "--encrypt", "--armor",
            "--local-user", signer_fpr, "--recipient", pgp.fingerprint(recipient_pub)]  # fmt: skip


def _status(proc) -> str:
    return proc.stderr.decode(errors="replace")


# --------------------------------------------------------------------------------------------
# Without gpg
# --------------------------------------------------------------------------------------------


def test_crc24_matches_rfc4880_loop() -> None:
    def slow(data: bytes) -> int:
        crc = 0xB704CE
        for b in data:
            crc ^= b << 16
            for _ in range(8):
                crc <<= 1
                if crc & 0x1000000:
                    crc ^= 0x1864CFB
        return crc & 0xFFFFFF

    for n in (0, 1, 2, 3, 15, 16, 17, 63, 64, 65, 1000, 4099):
        data = os.urandom(n)
        assert pgp.crc24(data) == slow(data), n


def test_roundtrip_and_refusals() -> None:
    a_priv, a_pub = pgp.generate_keypair("A", "a@example.org")
    b_priv, b_pub = pgp.generate_keypair("B", "b@example.org")
    key = pgp.load_public_key(b_pub)
    assert key.can_encrypt and key.can_sign and key.expires_at is None
    armored = pgp.sign_and_encrypt(b"secret\x00\xff", a_priv, key)
    assert armored.startswith("-----BEGIN PGP MESSAGE-----\n")
    data, signer = pgp.decrypt(armored, b_priv, [a_pub])
    assert data == b"secret\x00\xff" and signer == pgp.fingerprint(a_pub)
    # unknown signer: decrypts, but no signer fingerprint
    dec = pgp.decrypt(armored, b_priv)
    assert dec.signer_fingerprint is None and dec.signature.status == "unknown_key"
    # wrong private key
    with pytest.raises(PGPError):
        pgp.decrypt(armored, a_priv)
    with pytest.raises(PGPError, match="revoked"):
        pgp.load_public_key(b_pub, revoked=True)
    with pytest.raises(PGPError):
        pgp.load_public_key(b_priv)
    with pytest.raises(PGPError):
        pgp.load_public_key("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n-----END PGP PUB")


def test_tampered_ciphertext_fails_cleanly() -> None:
    a_priv, a_pub = pgp.generate_keypair("A", "a@example.org")
    armored = pgp.sign_and_encrypt(b"x" * 5000, a_priv, a_pub)
    # 1) a changed armor character: caught by the CRC-24
    lines = armored.splitlines()
    i = 5
    lines[i] = ("B" if lines[i][10] != "B" else "C").join((lines[i][:10], lines[i][11:]))
    with pytest.raises(PGPError, match="CRC-24"):
        pgp.decrypt("\n".join(lines) + "\n", a_priv)
    # 2) a changed ciphertext byte with a correct armor checksum: caught by the MDC / parser
    raw = bytearray(pgp.unarmor(armored))
    for pos in (len(raw) - 30, len(raw) // 2, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        with pytest.raises(PGPError):
            pgp.decrypt(pgp.armor(bytes(bad)), a_priv, [a_pub])
    # 3) truncated
    with pytest.raises(PGPError):
        pgp.decrypt(pgp.armor(bytes(raw[:-40])), a_priv)


def test_detached_and_inline_signatures() -> None:
    a_priv, a_pub = pgp.generate_keypair("A", "a@example.org")
    _, b_pub = pgp.generate_keypair("B", "b@example.org")
    sig = pgp.sign_detached(b"line\r\n", a_priv)
    assert pgp.verify_detached(b"line\r\n", sig, a_pub)
    assert not pgp.verify_detached(b"line\n", sig, a_pub)
    assert not pgp.verify_detached(b"line\r\n", sig, b_pub)
    inline = pgp.sign_inline(b"APPROVE\n", a_priv)
    res = pgp.verify_inline(inline, [b_pub, a_pub])
    assert res.data == b"APPROVE\n" and res.signer_fingerprint == pgp.fingerprint(a_pub)
    assert pgp.verify_inline(inline, b_pub).signature.status == "unknown_key"


def test_signature_with_the_cached_key_is_pgpys_own() -> None:
    """The cached private key carries its fingerprint computed once (pgpy would hash the
    key again six times per signature): the signature is byte for byte the one pgpy makes
    with a freshly read key, and names the key's true fingerprint."""
    import datetime as dt
    import warnings

    import pgpy

    priv, pub = pgp.generate_keypair("A", "a@example.org")
    when = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
    cached = pgp.sign_detached(b"release body\r\n", priv, created=when)
    key, _ = pgp._private_key(priv)
    assert type(key._key).__name__.startswith("Pinned")
    assert pgp._fpr(key.fingerprint) == pgp.fingerprint(pub)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh, _ = pgpy.PGPKey.from_blob(priv)
        assert not type(fresh._key).__name__.startswith("Pinned")
        own = pgp.armor(bytes(fresh.sign(b"release body\r\n", hash=pgp.HASH,
                                         created=max(when, fresh.created))), "SIGNATURE")
    assert cached == own
    assert pgp.verify_detached(b"release body\r\n", cached, pub)


def _message() -> EmailMessage:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "Broker <broker@records.example>"
    msg["To"] = "pat@family.example"
    msg["Subject"] = "Review request"
    msg["Message-ID"] = "<1@records.example>"
    msg.set_content("Hello Pat,\nplease review. Grüße\n")
    msg.add_attachment(b"%PDF-1.4 \x00\x01", maintype="application", subtype="pdf",
                       filename="report.pdf")  # fmt: skip
    return msg


def test_pgpmime_roundtrip_without_gpg() -> None:
    a_priv, a_pub = pgp.generate_keypair("A", "a@example.org")
    b_priv, b_pub = pgp.generate_keypair("B", "b@example.org")
    enc = pgpmime.encrypt_message(_message(), a_priv, b_pub)
    assert enc.get_content_type() == "multipart/encrypted"
    assert enc.get_param("protocol") == "application/pgp-encrypted"
    assert enc["Subject"] == "Review request"
    opened = pgpmime.open_message(enc.as_bytes(), b_priv, [a_pub])
    assert opened.encrypted and opened.signature.status == "good"
    assert opened.message["Subject"] == "Review request"
    body = opened.message.get_body(("plain",))
    assert body is not None and "Grüße" in body.get_content()
    atts = list(opened.message.iter_attachments())
    assert atts[0].get_content() == b"%PDF-1.4 \x00\x01"

    prot = pgpmime.encrypt_message(_message(), a_priv, b_pub, protect_subject=True)
    assert prot["Subject"] == "..."
    assert pgpmime.open_message(prot.as_bytes(), b_priv).message["Subject"] == "Review request"

    signed = pgpmime.sign_message(_message(), a_priv)
    assert signed.get_content_type() == "multipart/signed"
    assert signed.get_param("micalg") == "pgp-sha256"
    raw = signed.as_bytes()
    opened = pgpmime.open_message(raw, None, [a_pub])
    assert not opened.encrypted and opened.signature.status == "good"
    # LF-only storage of the same message still verifies (canonicalized to CRLF)
    assert pgpmime.open_message(raw.replace(b"\r\n", b"\n"), None, [a_pub]).signature.status == (
        "good"
    )
    assert b"Hello" in raw
    tampered = raw.replace(b"Hello", b"Jello")
    assert pgpmime.open_message(tampered, None, [a_pub]).signature.status == "bad"


# --------------------------------------------------------------------------------------------
# gpg interoperability
# --------------------------------------------------------------------------------------------


@needs_gpg
def test_gpg_decrypts_and_verifies_broker_message(gpg, broker_key, guardian) -> None:
    priv, pub = broker_key
    _, gpub = guardian
    data = os.urandom(3000) + b"end"
    armored = pgp.sign_and_encrypt(data, priv, pgp.load_public_key(gpub))
    proc = gpg.run("--decrypt", input=armored.encode())
    assert proc.stdout == data
    status = _status(proc)
    assert f"VALIDSIG {pgp.fingerprint(pub)}" in status and "DECRYPTION_OKAY" in status
    assert "GOODMDC" in status


@needs_gpg
def test_gpg_verifies_broker_detached_signature(gpg, broker_key, tmp_path) -> None:
    priv, pub = broker_key
    data = b"release body\r\n"
    (tmp_path / "d").write_bytes(data)
    (tmp_path / "d.asc").write_text(pgp.sign_detached(data, priv))
    proc = gpg.run("--verify", str(tmp_path / "d.asc"), str(tmp_path / "d"))
    assert f"VALIDSIG {pgp.fingerprint(pub)}" in _status(proc)


@needs_gpg
def test_gpg_reads_broker_pgpmime(gpg, broker_key, guardian, tmp_path) -> None:
    priv, pub = broker_key
    _, gpub = guardian
    enc = pgpmime.encrypt_message(_message(), priv, gpub)
    parsed = BytesParser(policy=policy.default).parsebytes(enc.as_bytes())
    version, body = parsed.get_payload()
    assert version.get_content().strip() == b"Version: 1"
    proc = gpg.run("--decrypt", input=body.get_payload(decode=True))
    assert f"VALIDSIG {pgp.fingerprint(pub)}" in _status(proc)
    inner = BytesParser(policy=policy.default).parsebytes(proc.stdout)
    assert inner.get_content_type() == "multipart/mixed"
    assert "Grüße" in inner.get_body(("plain",)).get_content()

    # sign-only: gpg verifies the signature over the exact first part of multipart/signed
    raw = pgpmime.sign_message(_message(), priv).as_bytes()
    signed = pgpmime._signed_part_bytes(raw, BytesParser().parsebytes(raw).get_boundary())
    sig = BytesParser(policy=policy.default).parsebytes(raw).get_payload()[1]
    (tmp_path / "part").write_bytes(signed)
    (tmp_path / "part.asc").write_bytes(sig.get_payload(decode=True))
    proc = gpg.run("--verify", str(tmp_path / "part.asc"), str(tmp_path / "part"))
    assert f"VALIDSIG {pgp.fingerprint(pub)}" in _status(proc)


@needs_gpg
def test_broker_decrypts_and_verifies_gpg_message(gpg, broker_key, guardian) -> None:
    priv, pub = broker_key
    fpr, gpub = guardian
    data = b"APPROVE 1\n" * 500  # compressible: gpg's default compression kicks in
    proc = gpg.run(*_sign_encrypt(fpr, pub), input=data)
    armored = proc.stdout.decode()
    dec = pgp.decrypt(armored, priv, [pgp.load_public_key(gpub)])
    assert dec.data == data
    assert dec.signer_fingerprint == fpr and dec.signature.status == "good"
    # a gpg cleartext signature, as an inline-signed reply
    clear = gpg.run("--local-user", fpr, "--clearsign", input=b"APPROVE\n").stdout
    res = pgp.verify_inline(clear, gpub)
    assert res.signature.status == "good" and res.data.strip() == b"APPROVE"
    # a gpg detached signature
    det = gpg.run("--local-user", fpr, "--detach-sign", "--armor", input=b"x\r\n").stdout
    assert pgp.verify_detached(b"x\r\n", det, gpub)
    assert not pgp.verify_detached(b"y\r\n", det, gpub)


@needs_gpg
def test_broker_opens_gpg_pgpmime_and_inline(gpg, broker_key, guardian) -> None:
    priv, pub = broker_key
    fpr, gpub = guardian
    entity = MIMEPart(policy=policy.SMTP)
    entity.set_content("APPROVE\n\nthanks\n")
    entity_bytes = entity.as_bytes(policy=policy.SMTP)

    # multipart/encrypted made by gpg (sign+encrypt), assembled with the email package
    ct = gpg.run(*_sign_encrypt(fpr, pub), input=entity_bytes).stdout
    outer = EmailMessage(policy=policy.SMTP)
    outer["From"] = "pat@family.example"
    outer["Subject"] = "Re: Review request"
    outer["Content-Type"] = "multipart/encrypted"
    outer.set_param("protocol", "application/pgp-encrypted")
    v = MIMEPart(policy=policy.SMTP)
    v.set_content(b"Version: 1\r\n", "application", "pgp-encrypted", cte="7bit")
    b = MIMEPart(policy=policy.SMTP)
    b.set_content(ct, "application", "octet-stream", cte="7bit")
    outer.set_payload([v, b])
    opened = pgpmime.open_message(outer.as_bytes(), priv, [gpub])
    assert opened.kind == "pgp/mime" and opened.encrypted
    assert opened.signature.status == "good" and opened.signer_fingerprint == fpr
    assert opened.message["Subject"] == "Re: Review request"
    assert opened.message.get_content().startswith("APPROVE")

    # multipart/signed made with a gpg detached signature
    sig = gpg.run("--local-user", fpr, "--detach-sign", "--armor", input=entity_bytes).stdout
    signed = EmailMessage(policy=policy.SMTP)
    signed["From"] = "pat@family.example"
    signed["Content-Type"] = "multipart/signed"
    signed.set_param("micalg", "pgp-sha256")
    signed.set_param("protocol", "application/pgp-signature")
    s = MIMEPart(policy=policy.SMTP)
    s.set_content(sig, "application", "pgp-signature", cte="7bit")
    signed.set_payload(
        [BytesParser(policy=policy.SMTP, _class=MIMEPart).parsebytes(entity_bytes), s]
    )
    opened = pgpmime.open_message(signed.as_bytes(), None, [gpub])
    assert opened.signature.status == "good" and not opened.encrypted

    # inline PGP: an encrypted+signed armored block in a text/plain body
    inline = EmailMessage(policy=policy.SMTP)
    inline["From"] = "pat@family.example"
    plain = gpg.run(*_sign_encrypt(fpr, pub), input=b"APPROVE 2\n").stdout
    inline.set_content("Quoted intro\n\n" + plain.decode())
    opened = pgpmime.open_message(inline.as_bytes(), priv, [gpub])
    assert opened.kind == "inline" and opened.encrypted and opened.signature.status == "good"
    assert opened.message.get_content().strip() == "APPROVE 2"


@needs_gpg
def test_expired_key_refused(gpg) -> None:
    fpr = gpg.gen_key("Old <old@family.example>", "1d", "--faked-system-time", "20200101T000000")
    with pytest.raises(PGPError, match="expired"):
        pgp.load_public_key(gpg.export(fpr))
    # the key itself parses: the refusal is about time
    at = pgp.load_public_key(gpg.export(fpr), now=pgp.datetime(2020, 1, 1, 12, tzinfo=pgp.UTC))
    assert at.fingerprint == fpr


@needs_gpg
def test_revoked_key_refused(gpg) -> None:
    fpr = gpg.gen_key("Gone <gone@family.example>")
    pub = gpg.export(fpr)
    assert pgp.load_public_key(pub).fingerprint == fpr
    with pytest.raises(PGPError, match="revoked"):
        pgp.load_public_key(pub, revoked=True)
    # a key that carries a revocation signature is refused even without the flag
    rev = (gpg.home / "openpgp-revocs.d" / f"{fpr}.rev").read_text()
    gpg.import_key(rev.replace(":-----BEGIN", "-----BEGIN"))
    with pytest.raises(PGPError, match="revocation"):
        pgp.load_public_key(gpg.export(fpr))


def test_armor_is_standard() -> None:
    data = os.urandom(1000)
    text = pgp.armor(data)
    lines = text.splitlines()
    assert lines[0] == "-----BEGIN PGP MESSAGE-----" and lines[1] == ""
    assert all(len(line) <= 64 for line in lines[2:-2])
    assert lines[-2].startswith("=") and lines[-1] == "-----END PGP MESSAGE-----"
    assert binascii.a2b_base64("".join(lines[2:-2])) == data
    assert pgp.unarmor(text) == data
    assert pgp.unarmor(text.replace("\n", "\r\n")) == data
