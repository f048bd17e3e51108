"""Reply authentication, mode `dkim`: dkimpy verification through the cached resolver,
Authentication-Results from the operator's MTA (trusted only above the first Received),
and the end-to-end stories: only an authenticated APPROVE releases anything."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from pathlib import Path

import dkim as dkimpy
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker import config
from broker.crypto import dkim as bdkim
from broker.crypto.authresults import (
    check_authentication_results,
    header_list,
    parse,
)
from broker.db.models import Person
from broker.review.authenticate import authenticate_reply, from_trusted_relay
from tests.harness import DOMAIN, GUARDIAN, World, reply_to, report

TRUSTED = "mx.records.example"


# -- keys and signing -------------------------------------------------------------------


class Keys:
    """RSA keys per (selector, domain), published through a fake DNS."""

    def __init__(self) -> None:
        self.private: dict[tuple[str, str], bytes] = {}
        self.txt: dict[bytes, bytes] = {}
        self.lookups: list[bytes] = []

    def add(self, domain: str, selector: str = "sel") -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private[(selector, domain)] = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption())
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        name = f"{selector}._domainkey.{domain}.".encode()
        self.txt[name] = b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)

    def resolve(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.lookups.append(name)
        return self.txt.get(name.lower())

    def sign(self, raw: bytes, domain: str, selector: str = "sel", **kw: object) -> bytes:
        header = dkimpy.sign(raw, selector.encode(), domain.encode(),
                             self.private[(selector, domain)],
                             canonicalize=(b"relaxed", b"relaxed"), **kw)
        return header + raw


@pytest.fixture(scope="module")
def keys() -> Keys:
    k = Keys()
    k.add("home.example")
    k.add("evil.example")
    return k


def _message(sender: str = "Dana Rivera <dana@home.example>", body: str = "APPROVE\n"
             ) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = f"review+abc@{DOMAIN}"
    msg["Subject"] = "Re: Review needed"
    msg["Message-ID"] = "<1@home.example>"
    msg.set_content(body)
    return msg.as_bytes(policy=policy.SMTP)


def _guardian(email: str = GUARDIAN) -> Person:
    return Person(email=email, name="Dana Rivera", role="guardian")


def _settings(tmp_path: Path, mode: str = "dkim", trusted: tuple[str, ...] = (TRUSTED,)
              ) -> config.Settings:
    return config.Settings(home=tmp_path, domain=DOMAIN, reply_auth=mode,
                           trusted_authserv_ids=trusted)


def _parsed(raw: bytes) -> EmailMessage:
    import email
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


# -- alignment and dkimpy verification ----------------------------------------------------


@pytest.mark.parametrize(("d", "frm", "ok"), [
    ("home.example", "home.example", True),
    ("HOME.example.", "home.example", True),
    ("home.example", "mail.home.example", True),     # d= a parent of From: aligned
    ("mail.home.example", "home.example", False),    # d= a subdomain: not (no PSL)
    ("example", "home.example", False),              # a bare TLD never aligns
    ("ome.example", "home.example", False),
    ("evil.example", "home.example", False),
    ("", "home.example", False),
])
def test_alignment(d: str, frm: str, ok: bool) -> None:
    assert bdkim.aligned(d, frm) is ok


def test_valid_aligned_signature_verifies(keys: Keys) -> None:
    raw = keys.sign(_message(), "home.example")
    check = bdkim.verify_dkim(raw, "home.example", lookup=keys.resolve)
    assert check.ok and check.domain == "home.example"
    assert "verified, aligned" in check.describe()


def test_signature_of_another_domain_is_not_enough(keys: Keys) -> None:
    raw = keys.sign(_message(), "evil.example")
    check = bdkim.verify_dkim(raw, "home.example", lookup=keys.resolve)
    assert not check.ok
    assert "not aligned" in check.describe()


def test_any_aligned_signature_among_several_counts(keys: Keys) -> None:
    raw = keys.sign(keys.sign(_message(), "home.example"), "evil.example")
    check = bdkim.verify_dkim(raw, "home.example", lookup=keys.resolve)
    assert check.ok, check.seen
    assert len(check.seen) == 2


def test_tampered_body_fails(keys: Keys) -> None:
    raw = keys.sign(_message(body="DENY\n"), "home.example")
    raw = raw.replace(b"DENY", b"APPROVE")
    check = bdkim.verify_dkim(raw, "home.example", lookup=keys.resolve)
    assert not check.ok


def test_missing_key_and_garbage_signature_fail_quietly(keys: Keys) -> None:
    raw = keys.sign(_message(), "home.example", selector="sel")
    assert not bdkim.verify_dkim(raw, "home.example", lookup=lambda n, timeout=5: None).ok
    junk = b"DKIM-Signature: v=1; a=rsa-sha256; d=home.example; garbage\r\n" + _message()
    check = bdkim.verify_dkim(junk, "home.example", lookup=keys.resolve)
    assert not check.ok and "error" in check.describe()
    assert not bdkim.verify_dkim(_message(), "home.example", lookup=keys.resolve).ok
    assert not bdkim.verify_dkim(b"\x00\xff not mail", "home.example", lookup=keys.resolve).ok


def test_body_length_limit_is_refused(keys: Keys) -> None:
    # With l= anything appended after the signed length would go unsigned.
    raw = keys.sign(_message(), "home.example", length=True)
    check = bdkim.verify_dkim(raw, "home.example", lookup=keys.resolve)
    assert not check.ok and "l=" in check.describe()


def test_resolver_hook_and_cache(keys: Keys) -> None:
    calls: list[bytes] = []

    def fake(name: bytes) -> bytes | None:
        calls.append(name)
        return keys.txt.get(name)

    bdkim.set_resolver(fake)
    try:
        raw = keys.sign(_message(), "home.example")
        assert bdkim.verify_dkim(raw, "home.example").ok
        assert bdkim.verify_dkim(raw, "home.example").ok
        assert calls == [b"sel._domainkey.home.example."]  # second time from the cache
    finally:
        bdkim.set_resolver(None)


# -- Authentication-Results --------------------------------------------------------------

MICROSOFT = ("spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=contoso.com; dkim=pass "
             "(signature was verified) header.d=contoso.com;contoso.com; dmarc=pass "
             "action=none header.from=contoso.com;compauth=pass reason=100")


@pytest.mark.parametrize("value", [
    MICROSOFT, "", ";;;", "mx.records.example; dkim=", "(comment only)", "\x00\x01",
    "mx.records.example 2; dkim=pass header.d=home.example",
])
def test_unparseable_headers_never_raise(value: str) -> None:
    parse(value)  # None or a header, never an exception
    check = check_authentication_results(
        [("Authentication-Results", value), ("Received", "from a by b")],
        "home.example", [TRUSTED])
    assert not check.ok


def _ar(*lines: tuple[str, str]) -> list[tuple[str, str]]:
    return list(lines)


RCVD = ("Received", "from mail.home.example by mx.records.example; Mon, 2 Mar 2026 10:00 +0000")


@pytest.mark.parametrize(("headers", "ok"), [
    # the operator's MTA, above its own Received: believed
    (_ar(("Authentication-Results", f"{TRUSTED}; dkim=pass header.d=home.example"), RCVD),
     True),
    (_ar(("Authentication-Results", f"{TRUSTED.upper()}; dmarc=pass header.from=home.example"),
         RCVD), True),
    (_ar(("Authentication-Results", f"{TRUSTED}; dkim=pass header.i=@home.example"), RCVD),
     True),
    # the same claims below the first Received came from outside
    (_ar(RCVD, ("Authentication-Results", f"{TRUSTED}; dkim=pass header.d=home.example")),
     False),
    # no Received at all: not relayed by the operator's MTA
    (_ar(("Authentication-Results", f"{TRUSTED}; dkim=pass header.d=home.example")), False),
    # an untrusted authserv-id
    (_ar(("Authentication-Results", "mx.evil.example; dkim=pass header.d=home.example"), RCVD),
     False),
    # trusted, but for another domain or not a pass
    (_ar(("Authentication-Results", f"{TRUSTED}; dkim=pass header.d=evil.example"), RCVD),
     False),
    (_ar(("Authentication-Results", f"{TRUSTED}; dmarc=pass header.from=mail.home.example"),
         RCVD), False),
    (_ar(("Authentication-Results", f"{TRUSTED}; dkim=fail header.d=home.example; "
                                    "dmarc=fail header.from=home.example"), RCVD), False),
    (_ar(("Authentication-Results", f"{TRUSTED}; spf=pass smtp.mailfrom=home.example"), RCVD),
     False),
    (_ar(("Authentication-Results", f"{TRUSTED}; none"), RCVD), False),
])
def test_authentication_results_trust_rule(headers: list[tuple[str, str]], ok: bool) -> None:
    check = check_authentication_results(headers, "home.example", [TRUSTED])
    assert check.ok is ok, check.seen


def test_no_trusted_ids_means_no_header_is_believed() -> None:
    headers = _ar(("Authentication-Results", f"{TRUSTED}; dkim=pass header.d=home.example"),
                  RCVD)
    assert not check_authentication_results(headers, "home.example", []).ok


def test_header_list_reads_folded_headers_in_order() -> None:
    raw = (f"Authentication-Results: {TRUSTED};\r\n\tdkim=pass header.d=home.example\r\n"
           "Received: from a\r\n by b\r\nFrom: dana@home.example\r\n\r\nbody\r\n").encode()
    headers = header_list(raw)
    assert [n for n, _ in headers] == ["Authentication-Results", "Received", "From"]
    assert check_authentication_results(headers, "home.example", [TRUSTED]).ok


# -- authenticate_reply ------------------------------------------------------------------


def test_modes(tmp_path: Path, keys: Keys) -> None:
    raw = _message()
    assert authenticate_reply(_parsed(raw), _guardian(), _settings(tmp_path, "token")).ok
    pgp = authenticate_reply(_parsed(raw), _guardian(), _settings(tmp_path, "pgp"))
    assert not pgp.ok and pgp.method == "pgp" and "no OpenPGP key" in pgp.detail
    unsigned = authenticate_reply(_parsed(raw), _guardian(), _settings(tmp_path), raw=raw)
    assert not unsigned.ok and unsigned.method == "dkim"
    assert "no DKIM-Signature" in unsigned.detail


def test_dkim_mode_signature_and_authentication_results(tmp_path: Path, keys: Keys) -> None:
    bdkim.set_resolver(lambda n: keys.txt.get(n))
    try:
        raw = keys.sign(_message(), "home.example")
        good = authenticate_reply(_parsed(raw), _guardian(), _settings(tmp_path), raw=raw)
        assert good.ok and good.method == "dkim", good.detail
        # Re-serialised message as fallback when raw bytes are not given.
        assert authenticate_reply(_parsed(raw), _guardian(), _settings(tmp_path)).ok
        # Signed, but the From is not this guardian's.
        other = authenticate_reply(_parsed(raw), _guardian("sam.dad@home.example"),
                                   _settings(tmp_path), raw=raw)
        assert not other.ok
        # Two From headers: refused whatever is signed.
        double = b"From: dana@home.example\r\n" + raw
        assert not authenticate_reply(_parsed(double), _guardian(), _settings(tmp_path),
                                      raw=double).ok
        # No signature, but the operator's MTA vouches (above its Received).
        ar = (f"Authentication-Results: {TRUSTED}; dmarc=pass header.from=home.example\r\n"
              f"{RCVD[0]}: {RCVD[1]}\r\n").encode() + _message()
        via = authenticate_reply(_parsed(ar), _guardian(), _settings(tmp_path), raw=ar,
                                 peer="127.0.0.1:40000")
        assert via.ok and via.method == "authentication-results", via.detail
        # The same, with no trusted ids configured: nothing is believed.
        assert not authenticate_reply(_parsed(ar), _guardian(), _settings(tmp_path, trusted=()),
                                      raw=ar, peer="127.0.0.1:40000").ok
        # The same, handed over by a host that is not a trusted relay: not believed.
        outside = authenticate_reply(_parsed(ar), _guardian(), _settings(tmp_path), raw=ar,
                                     peer="203.0.113.9:25")
        assert not outside.ok and "trusted relay" in outside.detail
    finally:
        bdkim.set_resolver(None)


# -- configuration and `broker init` -----------------------------------------------------


def test_config_reads_trusted_ids(tmp_path: Path) -> None:
    text = config.render_config(domain=DOMAIN, listen="127.0.0.1:2525",
                                relay="127.0.0.1:2526", auth="dkim")
    (tmp_path / config.CONFIG_NAME).write_text(text)
    settings = config.load(tmp_path)
    assert settings.reply_auth == "dkim" and settings.trusted_authserv_ids == ()
    (tmp_path / config.CONFIG_NAME).write_text(text.replace(
        "trusted_authserv_ids = []", 'trusted_authserv_ids = ["MX.Records.Example"]'))
    assert config.load(tmp_path).trusted_authserv_ids == ("mx.records.example",)
    for bad in ('"mx.records.example"', '["a b"]', '["x;y"]', "[1]", '[""]'):
        (tmp_path / config.CONFIG_NAME).write_text(text.replace(
            "trusted_authserv_ids = []", f"trusted_authserv_ids = {bad}"))
        with pytest.raises(config.ConfigError, match="trusted_authserv_ids"):
            config.load(tmp_path)


def test_init_defaults_to_dkim_and_accepts_other_modes(tmp_path: Path) -> None:
    from broker.cli.main import cli
    runner = CliRunner()
    base = ["init", "--domain", DOMAIN, "--listen", "127.0.0.1:2525",
            "--relay", "127.0.0.1:2526"]
    result = runner.invoke(cli, [*base, "--home", str(tmp_path / "a"), "--auth", "token"])
    assert result.exit_code == 0, result.output
    assert config.load(tmp_path / "a").reply_auth == "token"
    result = runner.invoke(cli, [*base, "--home", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert config.load(tmp_path / "b").reply_auth == "dkim"
    result = runner.invoke(cli, [*base, "--home", str(tmp_path / "c"), "--auth", "pgp"])
    assert result.exit_code == 0, result.output
    assert config.load(tmp_path / "c").reply_auth == "pgp"
    # init also made the broker's OpenPGP key pair, private key readable by the owner only.
    assert (tmp_path / "c" / "keys" / "broker-private.asc").stat().st_mode & 0o777 == 0o600
    assert "BEGIN PGP PUBLIC KEY BLOCK" in (tmp_path / "c" / "keys" / "broker-public.asc"
                                            ).read_text()


# -- end-to-end stories ------------------------------------------------------------------

SCHOOL = ("park@school.example", "ortiz@school.example")


@pytest.fixture
def world(tmp_path: Path, db_url: str, keys: Keys) -> Iterator[World]:
    bdkim.set_resolver(lambda n: keys.txt.get(n))
    w = World(tmp_path / "home", db_url, reply_auth="dkim",
              trusted_authserv_ids=(TRUSTED,)).start()
    yield w
    w.stop()
    bdkim.set_resolver(None)


def _held(world: World):
    world.send(report(), "lee@clinic.example", f"sam@{DOMAIN}")
    return world.review()


def _raw(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=policy.SMTP)


def _refused(world: World, count: int = 1) -> list:
    events = world.wait_audit("reply_refused", count=count)
    descs = [json.loads(e.description) for e in events]
    assert all(d["reason"] == "auth_failed" for d in descs), descs
    return descs


def _nothing_released(world: World) -> None:
    world.settle(0.5)
    assert world.record().state == "awaiting_review"
    assert world.all_to(SCHOOL) == []
    assert world.audit("approved") == []


def test_signed_approve_from_the_guardians_domain_releases(world: World, keys: Keys) -> None:
    review = _held(world)
    raw = keys.sign(_raw(reply_to(review, "APPROVE")), "home.example")
    world.send(raw, GUARDIAN, str(review.msg["Reply-To"]))
    world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    approved = world.wait_audit("approved")
    assert json.loads(approved[0].description)["auth"] == "dkim"


def test_forged_from_without_dkim_releases_nothing_and_notifies_once(
        world: World, keys: Keys) -> None:
    review = _held(world)
    to = str(review.msg["Reply-To"])
    world.send(_raw(reply_to(review, "APPROVE")), GUARDIAN, to)
    first = _refused(world)[0]
    assert "no DKIM-Signature" in first["detail"] and first["guardians_notified"] is True
    notice = world.notice("Reply refused")
    assert "could not verify" in notice.text()
    # A second try within the hour is audited but the guardians hear nothing more.
    world.send(_raw(reply_to(review, "APPROVE")), GUARDIAN, to)
    second = _refused(world, count=2)[1]
    assert second["guardians_notified"] is False
    _nothing_released(world)
    assert len(world.to(GUARDIAN, "Reply refused")) == 1


def test_valid_dkim_of_another_domain_releases_nothing(world: World, keys: Keys) -> None:
    review = _held(world)
    raw = keys.sign(_raw(reply_to(review, "APPROVE")), "evil.example")
    world.send(raw, GUARDIAN, str(review.msg["Reply-To"]))
    detail = _refused(world)[0]["detail"]
    assert "d=evil.example" in detail and "not aligned" in detail
    _nothing_released(world)


def test_authentication_results_injected_by_the_sender_approves_nothing(
        world: World, keys: Keys) -> None:
    review = _held(world)
    # The sender writes a trusted-looking header; their own MTA then adds Received on top
    # (as does any MTA on the way), so the claim stands below the first Received.
    forged = (f"Received: from laptop by smtp.evil.example; Mon, 2 Mar 2026 10:00 +0000\r\n"
              f"Authentication-Results: {TRUSTED}; dkim=pass header.d=home.example; "
              f"dmarc=pass header.from=home.example\r\n").encode()
    world.send(forged + _raw(reply_to(review, "APPROVE")), GUARDIAN,
               str(review.msg["Reply-To"]))
    detail = _refused(world)[0]["detail"]
    assert "below the first Received" in detail
    # Without any Received header, the claim is not believed either.
    bare = (f"Authentication-Results: {TRUSTED}; dkim=pass header.d=home.example\r\n"
            ).encode()
    world.send(bare + _raw(reply_to(review, "APPROVE")), GUARDIAN, str(review.msg["Reply-To"]))
    assert "no Received header" in _refused(world, count=2)[1]["detail"]
    _nothing_released(world)


@pytest.mark.parametrize(("peer", "relays", "trusted"), [
    ("127.0.0.1:2525", ("127.0.0.1", "::1"), True),
    ("[::1]:2525", ("127.0.0.1", "::1"), True),
    ("198.51.100.7:2525", ("127.0.0.1", "::1"), False),
    ("127.0.0.1:2525", (), False),
    ("garbage", ("127.0.0.1",), False),
])
def test_trusted_relay_is_decided_by_the_connecting_address(
        peer: str, relays: tuple[str, ...], trusted: bool) -> None:
    assert from_trusted_relay(peer, relays) is trusted


def test_authentication_results_of_the_trusted_mta_releases(world: World) -> None:
    review = _held(world)
    # As the operator's MTA relays it: its result on top, its Received below that, and
    # whatever the sender's side wrote (here a failing claim) further down.
    relayed = (f"Authentication-Results: {TRUSTED}; dkim=pass header.d=home.example "
               f"header.s=sel; dmarc=pass header.from=home.example\r\n"
               f"Received: from mail.home.example by {TRUSTED}; Mon, 2 Mar 2026 10:00 +0000\r\n"
               f"Received: from laptop by mail.home.example; Mon, 2 Mar 2026 09:59 +0000\r\n"
               ).encode()
    world.send(relayed + _raw(reply_to(review, "APPROVE")), GUARDIAN,
               str(review.msg["Reply-To"]))
    world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    approved = world.wait_audit("approved")
    assert json.loads(approved[0].description)["auth"] == "authentication-results"


PROVIDER_RCVD = ("Received", "from mx.home.example by mx.provider.example; Mon, 2 Mar 2026")


@pytest.mark.parametrize(("headers", "ok"), [
    # IMAP mode: the mailbox provider's own result, below its own Received lines (as Gmail
    # writes it): believed.
    (_ar(PROVIDER_RCVD, RCVD,
         ("Authentication-Results", f"{TRUSTED}; dkim=pass header.d=home.example")), True),
    # The topmost trusted header decides: a forged pass below a real fail counts for nothing.
    (_ar(PROVIDER_RCVD,
         ("Authentication-Results", f"{TRUSTED}; dkim=fail header.d=home.example"),
         ("Authentication-Results", f"{TRUSTED}; dkim=pass header.d=home.example")), False),
    # Untrusted ids are skipped; the trusted one below them still decides.
    (_ar(("Authentication-Results", "mx.evil.example; dkim=pass header.d=home.example"),
         ("Authentication-Results", f"{TRUSTED}; dkim=pass header.d=home.example")), True),
    (_ar(("Authentication-Results", f"{TRUSTED}; dkim=pass header.d=evil.example")), False),
    (_ar(PROVIDER_RCVD), False),
])
def test_mailbox_mode_trusts_the_topmost_provider_header(
        headers: list[tuple[str, str]], ok: bool) -> None:
    check = check_authentication_results(headers, "home.example", [TRUSTED], mailbox=True)
    assert check.ok is ok, check.seen
    # Without mailbox mode none of the passes below a Received counts.
    if headers and headers[0] == PROVIDER_RCVD:
        assert not check_authentication_results(headers, "home.example", [TRUSTED]).ok
