"""Stories with OpenPGP: the broker's mail is PGP/MIME (signed, encrypted where a key is
registered), encrypted reports are decrypted and shown, member signatures are verified, a
member who requires encryption and has no usable key gets nothing, and `pgp` reply
authentication approves only with the guardian's signature. gpg plays the outside world.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from broker.crypto import pgp, pgpmime
from broker.crypto.keys import broker_public_key, create_broker_key
from broker.intake.pipeline import LARGE
from tests.harness import DOMAIN, GUARDIAN, TEAM, Received, World, reply_to, report
from tests.test_pgp import GPG, Gpg

PARK, ORTIZ, LEE = "park@school.example", "ortiz@school.example", "lee@clinic.example"

pytestmark = pytest.mark.skipif(
    GPG is None, reason="gpg not installed: add `apt-get install -y gnupg` to .ci/run"
)


@pytest.fixture(scope="module")
def gpg() -> Iterator[Gpg]:
    home = Path(tempfile.mkdtemp(prefix="gpgf"))  # short path: gpg-agent socket name limit
    home.chmod(0o700)
    g = Gpg(home)
    g.fprs = {who: g.gen_key(f"{who} <{who}>") for who in  # type: ignore[attr-defined]
              (GUARDIAN, PARK, LEE, "mallory@home.example")}
    try:
        yield g
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=g.env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _team(tmp: Path, gpg: Gpg, ortiz_extra: str = "") -> str:
    """The harness team with keys for the guardian, Ms Park and Dr. Lee (files beside it)."""
    keys = tmp / "keys"
    keys.mkdir(exist_ok=True)
    text = TEAM
    for who in (GUARDIAN, PARK, LEE):
        path = keys / f"{who}.asc"
        path.write_text(gpg.export(gpg.fprs[who]))  # type: ignore[attr-defined]
        text = text.replace(f'email = "{who}"\n', f'email = "{who}"\npgp_key = "{path}"\n')
    if ortiz_extra:
        text = text.replace(f'email = "{ORTIZ}"\n', f'email = "{ORTIZ}"\n{ortiz_extra}\n')
    return text


def _world(tmp_path: Path, db_url: str, gpg: Gpg, team: str, **settings) -> World:
    w = World(tmp_path / "home", db_url, team=team, **settings)
    create_broker_key(w.home, DOMAIN)
    gpg.import_key(broker_public_key(w.home))
    return w.start()


@pytest.fixture
def world(tmp_path: Path, db_url: str, gpg: Gpg) -> Iterator[World]:
    w = _world(tmp_path, db_url, gpg, _team(tmp_path, gpg))
    yield w
    w.stop()


def _broker_fpr(world: World) -> str:
    return pgp.fingerprint(broker_public_key(world.home))


def _gpg_decrypt(gpg: Gpg, received: Received) -> tuple[bytes, str]:
    """gpg decrypts what the relay was handed; returns (plaintext MIME entity, status)."""
    msg = received.msg
    assert msg.get_content_type() == "multipart/encrypted", msg.get_content_type()
    assert msg.get_param("protocol") == "application/pgp-encrypted"
    armored = msg.get_payload()[1].get_payload(decode=True)
    proc = gpg.run("--decrypt", input=armored)
    return proc.stdout, proc.stderr.decode(errors="replace")


def _entity_text(entity: bytes) -> str:
    part = BytesParser(policy=policy.default).parsebytes(entity)
    body = part.get_body(preferencelist=("plain",))
    return body.get_content() if body is not None else ""


def _mime(body: str) -> bytes:
    return ("Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
            "\r\n" + body.replace("\n", "\r\n")).encode()


def _headers(msg) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in msg.items()
                    if not k.lower().startswith("content-") and k.lower() != "mime-version")


def _signed_reply(gpg: Gpg, review: Received, text: str, signer: str) -> bytes:
    """A PGP/MIME (multipart/signed) reply made with gpg by ``signer``'s key."""
    entity = _mime(text + "\n")
    sig = gpg.run("--armor", "--detach-sign", "--local-user", gpg.fprs[signer],  # type: ignore
                  input=entity).stdout
    head = _headers(reply_to(review, text, quote=False))
    b = "=-=signed-reply=-="
    return (head + b'MIME-Version: 1.0\r\nContent-Type: multipart/signed; micalg=pgp-sha256; '
            b'protocol="application/pgp-signature"; boundary="' + b.encode() + b'"\r\n\r\n'
            + f"--{b}\r\n".encode() + entity + f"\r\n--{b}\r\n".encode()
            + b'Content-Type: application/pgp-signature; name="signature.asc"\r\n\r\n'
            + sig.replace(b"\n", b"\r\n") + f"\r\n--{b}--\r\n".encode())


# -- outbound ----------------------------------------------------------------------------


def test_review_and_release_are_pgp_mime(world: World, gpg: Gpg) -> None:
    world.send(report(), LEE, f"sam@{DOMAIN}")
    review = world.wait_for(lambda m: GUARDIAN in m.rcpt_tos)[0]
    # Encrypted to the guardian, signed by the broker: gpg says so; the subject is protected.
    assert str(review.msg["Subject"]) == "..."
    assert "family conflict" not in review.data.decode("latin-1")
    entity, status = _gpg_decrypt(gpg, review)
    assert f"VALIDSIG {_broker_fpr(world)}" in status, status
    text = _entity_text(entity)
    assert "[2] Sam mentioned family conflict" in text
    assert "Review needed" in BytesParser(policy=policy.default).parsebytes(entity)["Subject"]
    assert "OpenPGP: unsigned" in text  # Dr. Lee has a key and did not sign
    # The sender's receipt: encrypted to Dr. Lee's key too.
    receipt = world.wait_for(lambda m: LEE in m.rcpt_tos)[0]
    assert receipt.msg.get_content_type() == "multipart/encrypted"

    world.send(reply_to(review, "APPROVE", quote=False), GUARDIAN, str(review.msg["Reply-To"]))
    park = world.wait_for(lambda m: PARK in m.rcpt_tos)[0]
    ortiz = world.wait_for(lambda m: ORTIZ in m.rcpt_tos)[0]
    # Ms Park has a key: encrypted to her, signed by the broker, same stable Message-ID.
    assert "handwriting" not in park.data.decode("latin-1")
    entity, status = _gpg_decrypt(gpg, park)
    assert f"VALIDSIG {_broker_fpr(world)}" in status, status
    assert "Sam worked on handwriting" in _entity_text(entity)
    assert str(park.msg["Message-ID"]).startswith("<release-") or park.msg["Message-ID"]
    # Mr Ortiz has none: signed cleartext (multipart/signed) that verifies with the broker key.
    assert ortiz.msg.get_content_type() == "multipart/signed"
    opened = pgpmime.open_message(ortiz.data, None, [broker_public_key(world.home)])
    assert opened.signature.status == "good" and not opened.encrypted
    body = opened.message.get_body(preferencelist=("plain",))
    assert body is not None and "Sam worked on handwriting" in body.get_content()
    world.wait_state("released")
    delivered = {json.loads(e.recipients)[0]: json.loads(e.description)
                 for e in world.audit("delivered")}
    assert delivered[PARK]["openpgp"].startswith("encrypted to ")
    assert delivered[ORTIZ]["openpgp"] == "signed"


def test_require_encryption_without_key_gets_nothing(tmp_path: Path, db_url: str,
                                                     gpg: Gpg) -> None:
    team = _team(tmp_path, gpg, ortiz_extra="require_encryption = true")
    world = _world(tmp_path, db_url, gpg, team)
    try:
        world.send(report(), LEE, f"sam@{DOMAIN}")
        review = world.wait_for(lambda m: GUARDIAN in m.rcpt_tos)[0]
        text = " ".join(_entity_text(_gpg_decrypt(gpg, review)[0]).split())
        # The guardians are told up front, in the review request's reasons.
        assert "Mr Ortiz <ortiz@school.example> requires encryption" in text
        world.send(reply_to(review, "APPROVE", quote=False), GUARDIAN,
                   str(review.msg["Reply-To"]))
        world.wait_audit("reply_not_understood")
        notice = world.wait_for(lambda m: GUARDIAN in m.rcpt_tos, count=2)[1]
        told = " ".join(_entity_text(_gpg_decrypt(gpg, notice)[0]).split())
        assert "Not released" in told and "ortiz@school.example" in told
        assert "no OpenPGP key" in told
        world.settle(0.5)
        assert world.to(ORTIZ) == [] and world.to(PARK) == []
        assert world.record().state == "awaiting_review"
        # The guardian picks the others: released to Ms Park only, encrypted.
        world.send(reply_to(review, f"TO {PARK}", quote=False), GUARDIAN,
                   str(review.msg["Reply-To"]))
        preview = world.wait_for(lambda m: GUARDIAN in m.rcpt_tos, count=3)[2]
        world.send(reply_to(preview, "APPROVE", quote=False), GUARDIAN,
                   str(preview.msg["Reply-To"]))
        park = world.wait_for(lambda m: PARK in m.rcpt_tos)[0]
        assert park.msg.get_content_type() == "multipart/encrypted"
        world.wait_state("released")
        assert world.to(ORTIZ) == []
    finally:
        world.stop()


# -- inbound -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["small", "large"])
def test_encrypted_signed_report_is_decrypted_and_verified(world: World, gpg: Gpg,
                                                           size: str) -> None:
    """Large: over 1 MB with its scan, so the large pipeline reads it (into one buffer,
    not bytes) and the OpenPGP layer must take that as it takes bytes."""
    secret = "Sam described a panic attack before the spelling test."
    entity = _mime(f"Session notes.\n\n{secret}\n")
    if size == "large":
        inner = EmailMessage(policy=policy.SMTP)
        inner.set_content(f"Session notes.\n\n{secret}\n")
        inner.add_attachment(os.urandom(LARGE), "application", "octet-stream",
                             filename="scan.bin")
        entity = inner.as_bytes(policy=policy.SMTP)
    armored = gpg.run("--trust-model", "always", "--sign", "--encrypt", "--armor",
                      "--local-user", gpg.fprs[LEE],  # type: ignore[attr-defined]
                      "--recipient", _broker_fpr(world), input=entity).stdout
    head = _headers(report(subject="Encrypted notes"))
    b = "=-=enc=-="
    raw = (head + b'MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; '
           b'protocol="application/pgp-encrypted"; boundary="' + b.encode() + b'"\r\n\r\n'
           + f"--{b}\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
             f"\r\n--{b}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
           + armored.replace(b"\n", b"\r\n") + f"\r\n--{b}--\r\n".encode())
    assert secret.encode() not in raw
    assert (len(raw) > LARGE) == (size == "large")
    world.send(raw, LEE, f"sam@{DOMAIN}")
    review = world.wait_for(lambda m: GUARDIAN in m.rcpt_tos, timeout=60)[0]
    text = _entity_text(_gpg_decrypt(gpg, review)[0])
    assert f"[2] {secret}" in text
    if size == "large":
        assert "scan.bin" in text
    assert "encrypted to the broker's key" in text
    assert f"signed by {gpg.fprs[LEE]}, good" in text  # type: ignore[attr-defined]
    record = world.record()
    assert record.state == "awaiting_review"
    reasons = json.loads(record.hold_reasons)
    assert any("good" in r for r in reasons)


def test_signed_report_with_bad_signature_is_flagged(world: World, gpg: Gpg) -> None:
    # Signed by mallory's key although the From is Dr. Lee: not verified, and shown.
    entity = _mime("Please share this with the school.\n")
    sig = gpg.run("--armor", "--detach-sign", "--local-user",
                  gpg.fprs["mallory@home.example"], input=entity).stdout  # type: ignore
    head = _headers(report(subject="Signed"))
    b = "=-=sig=-="
    raw = (head + b'MIME-Version: 1.0\r\nContent-Type: multipart/signed; micalg=pgp-sha256; '
           b'protocol="application/pgp-signature"; boundary="' + b.encode() + b'"\r\n\r\n'
           + f"--{b}\r\n".encode() + entity + f"\r\n--{b}\r\n".encode()
           + b"Content-Type: application/pgp-signature\r\n\r\n"
           + sig.replace(b"\n", b"\r\n") + f"\r\n--{b}--\r\n".encode())
    world.send(raw, LEE, f"sam@{DOMAIN}")
    review = world.wait_for(lambda m: GUARDIAN in m.rcpt_tos)[0]
    text = _entity_text(_gpg_decrypt(gpg, review)[0])
    assert "[1] Please share this with the school." in text
    assert "signed by an unknown key" in text and "not verified" in text
    assert "signature.asc" not in text and "[A1" not in text  # not shown as an attachment


# -- pgp reply authentication ------------------------------------------------------------


def test_pgp_mode_needs_the_guardians_signature(tmp_path: Path, db_url: str,
                                                gpg: Gpg) -> None:
    world = _world(tmp_path, db_url, gpg, _team(tmp_path, gpg), reply_auth="pgp")
    try:
        world.send(report(), LEE, f"sam@{DOMAIN}")
        review = world.wait_for(lambda m: GUARDIAN in m.rcpt_tos)[0]
        to = str(review.msg["Reply-To"])
        # Unsigned: refused.
        world.send(reply_to(review, "APPROVE", quote=False), GUARDIAN, to)
        first = world.wait_audit("reply_refused")[0]
        assert json.loads(first.description)["reason"] == "auth_failed"
        assert "no OpenPGP signature" in json.loads(first.description)["detail"]
        # Signed, but by a key that is not the guardian's: refused.
        world.send(_signed_reply(gpg, review, "APPROVE", "mallory@home.example"), GUARDIAN, to)
        second = world.wait_audit("reply_refused", count=2)[1]
        assert "not the guardian's registered key" in json.loads(second.description)["detail"]
        world.settle(0.5)
        assert world.to(PARK) == [] and world.to(ORTIZ) == []
        assert world.record().state == "awaiting_review"
        # Signed by the guardian's key (gpg, PGP/MIME): released.
        world.send(_signed_reply(gpg, review, "APPROVE", GUARDIAN), GUARDIAN, to)
        world.wait_for(lambda m: PARK in m.rcpt_tos)
        world.wait_state("released")
        approved = world.audit("approved")[0]
        assert json.loads(approved.description)["auth"] == "pgp"
    finally:
        world.stop()


# -- CLI and team file -------------------------------------------------------------------


def test_key_commands_and_team_file_keys(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from broker.cli.main import cli
    from broker.db.engine import Database
    from broker.db.models import Person
    from broker.team.spec import TeamFileError, parse_team

    runner = CliRunner()
    home = tmp_path / "home"
    result = runner.invoke(cli, ["init", "--home", str(home), "--domain", DOMAIN])
    assert result.exit_code == 0, result.output
    assert (home / "keys" / "broker-private.asc").stat().st_mode & 0o777 == 0o600
    exported = runner.invoke(cli, ["key", "export", "--home", str(home)])
    assert exported.exit_code == 0 and "BEGIN PGP PUBLIC KEY BLOCK" in exported.output
    assert pgp.load_public_key(exported.output).can_encrypt
    again = runner.invoke(cli, ["key", "init", "--home", str(home)])
    assert again.exit_code != 0 and "already exists" in again.output

    private, public = pgp.generate_keypair("Dana", GUARDIAN)
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "dana.asc").write_text(public)
    (tmp_path / "k" / "secret.asc").write_text(private)
    team = TEAM.replace(f'email = "{GUARDIAN}"\n',
                        f'email = "{GUARDIAN}"\npgp_key = "k/dana.asc"\npgp_key_revoked = true\n')
    team = team.replace(f'email = "{ORTIZ}"\n', f'email = "{ORTIZ}"\nrequire_encryption = true\n')
    (tmp_path / "sam.toml").write_text(team)
    applied = runner.invoke(cli, ["apply", str(tmp_path / "sam.toml"), "--home", str(home)])
    assert applied.exit_code == 0, applied.output
    db = Database(f"sqlite:///{home / 'broker.db'}")
    try:
        with db.session() as s:
            people = {p.email: p for p in s.query(Person)}
            assert people[GUARDIAN].pgp_key == public and people[GUARDIAN].pgp_key_revoked
            assert people[ORTIZ].require_encryption and people[ORTIZ].pgp_key is None
    finally:
        db.dispose()
    with pytest.raises(TeamFileError, match="private key"):
        parse_team(team.replace("k/dana.asc", "k/secret.asc"), base=tmp_path)
    with pytest.raises(TeamFileError, match="cannot be read"):
        parse_team(team.replace("k/dana.asc", "k/nothing.asc"), base=tmp_path)
