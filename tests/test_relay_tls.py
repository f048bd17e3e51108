"""The relay, for real: STARTTLS or implicit TLS, AUTH PLAIN/LOGIN, certificates checked,
one persistent connection. Real aiosmtpd servers on 127.0.0.1 with trustme certificates.

An untrusted certificate, a wrong password or a login that would go out unencrypted is
the operator's problem: it is said plainly (log and the copy's last_error) and the
copies stay queued, never failed."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from sqlalchemy import select

from broker import config
from broker.config import RelaySettings
from broker.db.models import Delivery
from broker.release import relay as relay_mod
from broker.release.outbox import enqueue
from broker.release.relay import (
    PermanentFailure,
    RelayClient,
    RelayMisconfigured,
    RelayUnavailable,
    ssl_context,
)
from broker.release.sender import OutboxSender
from broker.runtime import Runtime
from tests.harness import DOMAIN, World, free_port, reply_to, report

# aiosmtpd warns about AUTH without STARTTLS; here that is the implicit-TLS server (already
# encrypted) and the plaintext server of the allow_plaintext_auth test.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

USER = "broker@records.example"
PASSWORD = "correct horse battery staple"


# -- certificates and servers ------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


class RelayServer:
    """An aiosmtpd relay that requires AUTH and counts connections, TLS handshakes and
    logins, and keeps every message."""

    def __init__(self, tls: str, server_ctx: ssl.SSLContext | None, *,
                 mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"), **smtp: object) -> None:
        self.tls = tls
        self.port = free_port()
        self.lock = threading.Lock()
        self.peers: list[tuple[str, int]] = []  # one per TCP connection that said EHLO
        self.starttls = 0
        self.logins: list[tuple[str, bool]] = []  # (mechanism, accepted)
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.quits = 0
        kwargs: dict = {
            "authenticator": self._authenticate, "auth_required": True,
            "auth_exclude_mechanism": [m for m in ("PLAIN", "LOGIN") if m not in mechanisms],
            **smtp,
        }
        if tls == "starttls":
            kwargs.update(tls_context=server_ctx, require_starttls=True)
        elif tls == "implicit":
            # Implicit TLS: aiosmtpd does not know the session is encrypted, so it must
            # not insist on STARTTLS before AUTH.
            kwargs.update(ssl_context=server_ctx, auth_require_tls=False)
        else:
            kwargs.update(auth_require_tls=False)
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)

    def __enter__(self) -> RelayServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = auth_data.login == USER.encode() and auth_data.password == PASSWORD.encode()
        with self.lock:
            self.logins.append((mechanism, ok))
        return AuthResult(success=ok, handled=False)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        with self.lock:
            if session.peer not in self.peers:
                self.peers.append(session.peer)
        return responses

    def handle_STARTTLS(self, server, session, envelope) -> bool:
        with self.lock:
            self.starttls += 1
        return True

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        with self.lock:
            self.quits += 1
        return "221 Bye"

    @property
    def handshakes(self) -> int:
        return self.starttls if self.tls == "starttls" else len(self.peers)

    def wait_quit(self, count: int = 1, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.quits < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.quits >= count


def settings_for(server: RelayServer, **over: object) -> RelaySettings:
    values: dict = {"host": "127.0.0.1", "port": server.port, "tls": server.tls,
                    "username": USER, "password": PASSWORD, "timeout": 5.0, **over}
    return RelaySettings(**values)


def message(n: int = 1) -> tuple[bytes, str]:
    msg = EmailMessage()
    msg["From"] = f"Sam's records <sam@{DOMAIN}>"
    msg["To"] = "park@school.example"
    msg["Subject"] = f"copy {n}"
    msg["Message-ID"] = mid = make_msgid(domain=DOMAIN)
    msg.set_content(f"Copy number {n}.\n")
    return msg.as_bytes(policy=policy.SMTP), mid


# -- the client on its own ---------------------------------------------------------------


def test_starttls_with_auth_plain_delivers(server_ctx: ssl.SSLContext, ca_file: str) -> None:
    with RelayServer("starttls", server_ctx, mechanisms=("PLAIN",)) as server, \
            RelayClient(settings_for(server, ca_file=ca_file), DOMAIN) as client:
        data, _ = message()
        client.send(f"bounces+1@{DOMAIN}", "park@school.example", data)
        assert server.starttls == 1
        assert server.logins == [("PLAIN", True)]
        [(mail_from, rcpts, got)] = server.messages
        assert (mail_from, rcpts) == (f"bounces+1@{DOMAIN}", ["park@school.example"])
        assert got == data


def test_implicit_tls_with_auth_login_delivers(server_ctx: ssl.SSLContext, ca_file: str) -> None:
    with RelayServer("implicit", server_ctx, mechanisms=("LOGIN",)) as server, \
            RelayClient(settings_for(server, ca_file=ca_file), DOMAIN) as client:
        data, _ = message()
        client.send(f"bounces+1@{DOMAIN}", "park@school.example", data)
        assert server.logins == [("LOGIN", True)]
        assert [m[2] for m in server.messages] == [data]


def test_untrusted_certificate_is_refused_before_anything_is_said(
        server_ctx: ssl.SSLContext) -> None:
    for tls in ("starttls", "implicit"):
        with RelayServer(tls, server_ctx) as server, \
                RelayClient(settings_for(server), DOMAIN) as client:  # system CAs only
            with pytest.raises(RelayMisconfigured, match="relay certificate not trusted: "):
                client.send(f"bounces+1@{DOMAIN}", "park@school.example", message()[0])
            assert server.logins == [] and server.messages == []
            assert not client.connected


def test_a_certificate_for_another_host_is_refused(ca: trustme.CA, ca_file: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("relay.elsewhere.example").configure_cert(ctx)
    with RelayServer("starttls", ctx) as server, \
            RelayClient(settings_for(server, ca_file=ca_file), DOMAIN) as client, \
            pytest.raises(RelayMisconfigured, match="not trusted: IP address mismatch"):
        client.send(f"bounces+1@{DOMAIN}", "park@school.example", message()[0])


def test_verify_false_skips_the_check(server_ctx: ssl.SSLContext) -> None:
    with RelayServer("starttls", server_ctx) as server, \
            RelayClient(settings_for(server, verify=False), DOMAIN) as client:
        client.send(f"bounces+1@{DOMAIN}", "park@school.example", message()[0])
        assert len(server.messages) == 1


def test_wrong_password_is_refused_clearly(server_ctx: ssl.SSLContext, ca_file: str) -> None:
    with RelayServer("starttls", server_ctx) as server, \
            RelayClient(settings_for(server, ca_file=ca_file, password="wrong"),
                        DOMAIN) as client:
        with pytest.raises(RelayMisconfigured) as err:
            client.send(f"bounces+1@{DOMAIN}", "park@school.example", message()[0])
        assert str(err.value).startswith("relay refused the login (535 5.7.8 ")
        assert str(err.value).endswith("check [relay] username/password")
        assert "wrong" not in str(err.value)
        assert server.messages == []


def test_a_relay_that_wants_a_login_it_did_not_get_is_the_operators_problem(
        server_ctx: ssl.SSLContext, ca_file: str) -> None:
    with RelayServer("starttls", server_ctx) as server, \
            RelayClient(settings_for(server, ca_file=ca_file, username="", password=""),
                        DOMAIN) as client, \
            pytest.raises(RelayMisconfigured, match=r"relay refused the sender \(530 "):
        client.send(f"bounces+1@{DOMAIN}", "park@school.example", message()[0])


def test_login_is_refused_over_plaintext_unless_allowed(server_ctx: ssl.SSLContext) -> None:
    with RelayServer("none", None) as server:
        with RelayClient(settings_for(server), DOMAIN) as client, \
                pytest.raises(RelayMisconfigured, match="unencrypted"):
            client.send(f"bounces+1@{DOMAIN}", "park@school.example", message()[0])
        # Refused before connecting: the password never left.
        assert server.peers == [] and server.logins == []
        with RelayClient(settings_for(server, allow_plaintext_auth=True), DOMAIN) as client:
            client.send(f"bounces+1@{DOMAIN}", "park@school.example", message()[0])
        assert server.logins == [("PLAIN", True)] and len(server.messages) == 1


def test_relay_without_starttls_is_refused_when_tls_is_asked(server_ctx: ssl.SSLContext) -> None:
    with RelayServer("none", None) as server, \
            RelayClient(settings_for(server, tls="starttls"), DOMAIN) as client, \
            pytest.raises(RelayMisconfigured, match="does not offer STARTTLS"):
        client.send(f"bounces+1@{DOMAIN}", "park@school.example", message()[0])


def test_refused_connection_is_temporary() -> None:
    settings = RelaySettings(host="127.0.0.1", port=free_port(), tls="starttls", timeout=2)
    with RelayClient(settings) as client, pytest.raises(RelayUnavailable) as err:
        client.send(f"bounces+1@{DOMAIN}", "park@school.example", message()[0])
    assert not isinstance(err.value, RelayMisconfigured)
    assert "cannot reach relay" in str(err.value)


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_twenty_messages_one_connection_one_handshake(
        tls: str, server_ctx: ssl.SSLContext, ca_file: str) -> None:
    with RelayServer(tls, server_ctx) as server, \
            RelayClient(settings_for(server, ca_file=ca_file), DOMAIN) as client:
        sent = [message(n)[0] for n in range(20)]
        for n, data in enumerate(sent):
            client.send(f"bounces+{n}@{DOMAIN}", "park@school.example", data)
        # A refused recipient does not cost the connection either.
        with pytest.raises(PermanentFailure, match=r"550 5\.1\.1"):
            client.send(f"bounces+99@{DOMAIN}", "nobody@school.example", sent[0])
        client.send(f"bounces+100@{DOMAIN}", "park@school.example", sent[0])
        assert [m[2] for m in server.messages] == [*sent, sent[0]]
        assert len(server.peers) == 1
        assert server.handshakes == 1
        assert len(server.logins) == 1
        assert client.connections == 1


def test_one_ssl_context_per_trust_settings(ca_file: str) -> None:
    a = RelaySettings(tls="starttls", ca_file=ca_file)
    b = RelaySettings(tls="implicit", ca_file=ca_file, port=465, username="x")
    assert ssl_context(a) is ssl_context(b)
    assert ssl_context(a) is not ssl_context(RelaySettings(tls="starttls"))
    ctx = ssl_context(a)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_an_idle_connection_dropped_by_the_relay_is_reopened(
        server_ctx: ssl.SSLContext, ca_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_mod, "PROBE_AFTER", 0.05)
    # aiosmtpd hangs up on a session idle for `timeout` seconds.
    with RelayServer("starttls", server_ctx, timeout=0.3) as server, \
            RelayClient(settings_for(server, ca_file=ca_file), DOMAIN) as client:
        client.send(f"bounces+1@{DOMAIN}", "park@school.example", message(1)[0])
        time.sleep(0.6)
        client.send(f"bounces+2@{DOMAIN}", "park@school.example", message(2)[0])
        assert len(server.messages) == 2
        assert len(server.peers) == 2 and client.connections == 2


# -- the sender: copies in the outbox ----------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("BROKER_HOME", raising=False)
    monkeypatch.delenv("BROKER_RELAY_PASSWORD", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / config.CONFIG_NAME).write_text(config.render_config(
        domain=DOMAIN, listen="127.0.0.1:0", relay="127.0.0.1:25", auth="token"))
    return home


def runtime(home: Path, db_url: str, relay: RelaySettings, **over: object) -> Runtime:
    base = config.load(home)
    values: dict = {"database_url": db_url, "relay": relay, "retry_schedule": (0.0,), **over}
    return Runtime.open(dataclasses.replace(base, **values))


def queue(rt: Runtime, count: int) -> list[int]:
    ids = []
    with rt.db.session() as s:
        for n in range(count):
            data, mid = message(n)
            ids.append(enqueue(s, rt.content, kind="notice", recipient="park@school.example",
                               data=data, message_id=mid).id)
    return ids


def deliveries(rt: Runtime) -> list[Delivery]:
    with rt.db.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def test_untrusted_certificate_keeps_the_copy_queued_until_trusted(
        home: Path, db_url: str, server_ctx: ssl.SSLContext, ca_file: str,
        caplog: pytest.LogCaptureFixture) -> None:
    with RelayServer("starttls", server_ctx) as server:
        # give_up_after 0: a recipient's temporary failure would fail the copy at once;
        # an operator's problem never does.
        rt = runtime(home, db_url, settings_for(server), give_up_after=0.0)
        try:
            queue(rt, 2)
            sender = OutboxSender(rt)
            with caplog.at_level(logging.ERROR, logger="broker.release.sender"):
                assert sender.run_once() == 2
            assert "relay certificate not trusted" in caplog.text
            rows = deliveries(rt)
            assert [d.state for d in rows] == ["queued", "queued"]
            assert all(d.last_error.startswith("relay certificate not trusted: ")
                       for d in rows)
            assert server.messages == [] and server.logins == []
        finally:
            rt.close()
        # The operator points ca_file at the relay's CA: the same bytes go out.
        rt = runtime(home, db_url, settings_for(server, ca_file=ca_file))
        try:
            sender = OutboxSender(rt)
            assert sender.run_once() == 2
            sender.close()
            rows = deliveries(rt)
            assert [d.state for d in rows] == ["sent", "sent"]
            assert all(d.last_error == "" for d in rows)
            got = [m[2] for m in server.messages]
            assert [hashlib.sha256(g).hexdigest() for g in got] == [d.sha256 for d in rows]
            assert [rt.content.get(d.content_ref) for d in rows] == got
            assert [f"Message-ID: {d.message_id}".encode() in g
                    for d, g in zip(rows, got, strict=True)] == [True, True]
        finally:
            rt.close()


def test_wrong_password_keeps_the_copies_queued_and_tries_once_a_round(
        home: Path, db_url: str, server_ctx: ssl.SSLContext, ca_file: str,
        caplog: pytest.LogCaptureFixture) -> None:
    with RelayServer("implicit", server_ctx) as server:
        rt = runtime(home, db_url, settings_for(server, ca_file=ca_file, password="nope"),
                     give_up_after=0.0)
        try:
            queue(rt, 3)
            sender = OutboxSender(rt)
            with caplog.at_level(logging.ERROR, logger="broker.release.sender"):
                assert sender.run_once() == 3
                assert sender.run_once() == 3  # retried on the schedule (0 s here)
            assert "relay refused the login (535" in caplog.text
            rows = deliveries(rt)
            assert [d.state for d in rows] == ["queued"] * 3
            assert all(d.attempts == 2 for d in rows)
            assert all(d.last_error.startswith("relay refused the login (535 5.7.8 ")
                       and d.last_error.endswith("check [relay] username/password")
                       for d in rows)
            # One login attempt per round, not one per copy.
            assert server.logins == [("PLAIN", False), ("PLAIN", False)]
            assert server.messages == []
        finally:
            rt.close()


def test_the_sender_keeps_its_connection_across_rounds(
        home: Path, db_url: str, server_ctx: ssl.SSLContext, ca_file: str) -> None:
    with RelayServer("starttls", server_ctx) as server:
        rt = runtime(home, db_url, settings_for(server, ca_file=ca_file))
        try:
            sender = OutboxSender(rt)
            queue(rt, 3)
            assert sender.run_once() == 3
            assert sender.run_once() == 0  # nothing due: the connection stays open
            queue(rt, 2)
            assert sender.run_once() == 2
            assert len(server.messages) == 5
            assert [d.state for d in deliveries(rt)] == ["sent"] * 5
            assert len(server.peers) == 1 and server.starttls == 1
            assert len(server.logins) == 1
            # Idle past idle_close: the connection is closed politely...
            sender.idle_close = 0.0
            assert sender.run_once() == 0
            assert not sender.relay.connected
            server.wait_quit()
            # ...and the next copy opens a new one.
            queue(rt, 1)
            assert sender.run_once() == 1
            assert len(server.peers) == 2 and len(server.messages) == 6
            sender.close()
        finally:
            rt.close()


# -- settings ----------------------------------------------------------------------------


def test_relay_settings_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_RELAY_PASSWORD", raising=False)

    def relay(**section: object) -> RelaySettings:
        return config.from_mapping(tmp_path, {"domain": DOMAIN, "relay": section}).relay

    default = relay()
    assert (default.tls, default.verify, default.port) == ("none", True, 25)
    assert relay(starttls=True).tls == "starttls"  # the older spelling
    assert relay(tls="starttls").port == 587 and relay(tls="implicit").port == 465
    assert relay(tls="implicit", port=2465).port == 2465
    with pytest.raises(config.ConfigError, match=r"relay\.tls must be one of"):
        relay(tls="ssl")
    with pytest.raises(config.ConfigError, match="contradicts"):
        relay(tls="implicit", starttls=True)
    with pytest.raises(config.ConfigError, match=r"relay\.verify must be bool"):
        relay(verify="no")
    with pytest.raises(config.ConfigError, match=r"relay\.pasword is not a relay setting"):
        relay(pasword="x")
    with pytest.raises(config.ConfigError, match=r"ca_file .* is not a file"):
        relay(ca_file="missing.pem")
    (tmp_path / "ca.pem").write_text("x")
    assert relay(ca_file="ca.pem").ca_file == str(tmp_path / "ca.pem")

    secret = tmp_path / "relay-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o640)
    with pytest.raises(config.ConfigError, match=r"open to group/others \(mode 640\).*chmod 600"):
        relay(username="u", password_file="relay-password")
    secret.chmod(0o600)
    assert relay(username="u", password_file="relay-password").password == "s3cret"
    assert "s3cret" not in repr(relay(username="u", password_file="relay-password"))
    with pytest.raises(config.ConfigError, match="both set"):
        relay(password="a", password_file="relay-password")
    monkeypatch.setenv("BROKER_RELAY_PASSWORD", "from-env")
    assert relay(password_file="relay-password").password == "from-env"
    assert relay(password="file").password == "from-env"


def test_the_template_reads_back() -> None:
    text = config.render_config(domain=DOMAIN, listen="127.0.0.1:2525", relay="mx.example:587")
    settings = config.from_mapping(Path("/tmp"), __import__("tomllib").loads(text))
    assert settings.relay == RelaySettings(host="mx.example", port=587)
    for key in ("tls", "verify", "ca_file", "password_file", "allow_plaintext_auth"):
        assert f"\n{key} = " in text


# -- a story: an approved release reaches a TLS + AUTH relay -------------------------------


class TlsWorld(World):
    """The World whose relay is a submission server: STARTTLS required, then AUTH."""

    def __init__(self, home: Path, db_url: str, server_ctx: ssl.SSLContext,
                 ca_file: str) -> None:
        super().__init__(home, db_url)
        self.logins: list[str] = []
        self.relay = Controller(self.sink, hostname="127.0.0.1", port=self.relay_port,
                                tls_context=server_ctx, require_starttls=True,
                                auth_required=True, authenticator=self._authenticate)
        self.settings = dataclasses.replace(self.settings, relay=RelaySettings(
            host="127.0.0.1", port=self.relay_port, tls="starttls", ca_file=ca_file,
            username=USER, password=PASSWORD, timeout=5.0))

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = auth_data.login == USER.encode() and auth_data.password == PASSWORD.encode()
        self.logins.append(session.peer)
        return AuthResult(success=ok, handled=False)


@pytest.fixture
def tls_world(tmp_path: Path, db_url: str, server_ctx: ssl.SSLContext,
              ca_file: str) -> Iterator[TlsWorld]:
    w = TlsWorld(tmp_path / "home", db_url, server_ctx, ca_file)
    w.start()
    yield w
    w.stop()


def test_story_an_approved_release_reaches_a_tls_auth_relay(tls_world: TlsWorld) -> None:
    w = tls_world
    w.send(report(), "lee@clinic.example", f"sam@{DOMAIN}")
    review = w.review()
    w.send(reply_to(review, "APPROVE"), "dana@home.example", str(review.msg["Reply-To"]))
    copy = w.wait_for(lambda m: m.rcpt_tos == ["park@school.example"])[0]
    assert "OT progress report" in str(copy.msg["Subject"])
    w.wait_state("released")
    with w.db.session() as s:
        sent = s.scalars(select(Delivery).where(Delivery.kind == "release")).all()
        assert sent and all(d.state == "sent" and d.last_error == "" for d in sent)
    # One login per connection, and the connection reused: fewer logins than messages.
    assert len(w.logins) == len(set(w.logins))
    assert 1 <= len(w.logins) < len(w.sink.messages)
