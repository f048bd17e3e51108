"""IMAP mailbox mode (issue 6): a real private Dovecot, the real imapclient.

The broker watches a mailbox, spools each new message and only then moves it to the
processed folder; crashes between the two steps neither lose nor duplicate a record; the
fetcher survives a server restart and a refused login.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from broker import config
from broker.config import ImapSettings
from broker.db.migrate import upgrade
from broker.intake.imap import STATE_NAME, ImapFetcher, ImapLoginRefused
from broker.intake.smtp import address_acceptor
from broker.intake.spool import Spool
from tests.dovecot import Dovecot
from tests.dovecot import dovecot as dovecot  # the fixture
from tests.harness import DOMAIN, GUARDIAN, World, reply_to, report

MAILBOX = "family@provider.example"


def _imap(server: Dovecot, **kw: object) -> ImapSettings:
    values: dict = {"host": server.host, "port": server.port, "tls": "none",
                    "user": server.user, "password": server.password, "poll_interval": 5.0,
                    "timeout": 10.0, **kw}
    return ImapSettings(**values)


def _raw(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=policy.SMTP)


def _mailbox_report(**kw: object) -> EmailMessage:
    """A team member's report as it lands in the family mailbox: To the mailbox."""
    msg = report(**kw)  # type: ignore[arg-type]
    del msg["To"]
    msg["To"] = MAILBOX
    msg["Return-Path"] = "<lee@clinic.example>"
    return msg


def _until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    upgrade(url)
    return url


@pytest.fixture
def world_factory(tmp_path: Path, sqlite_url: str) -> Iterator[Callable[..., World]]:
    made: list[World] = []

    def make(**settings: object) -> World:
        w = World(tmp_path / "home", sqlite_url, **settings).start()
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def _fetcher(server: Dovecot, home: Path, spool: Spool, **kw: object) -> ImapFetcher:
    settings = kw.pop("settings", None) or _imap(server)
    return ImapFetcher(
        settings,  # type: ignore[arg-type]
        spool, state_path=home / STATE_NAME,
        accepts=address_acceptor(DOMAIN, lambda: {"sam"}),
        default_rcpts=lambda: (f"sam@{DOMAIN}",),
        **kw,  # type: ignore[arg-type]
    )


# -- settings ----------------------------------------------------------------------------------


def test_imap_settings_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_IMAP_PASSWORD", raising=False)
    base = {"domain": DOMAIN}
    assert config.from_mapping(tmp_path, base).imap is None
    s = config.from_mapping(tmp_path, {**base, "imap": {
        "host": "imap.provider.example", "user": MAILBOX, "password": "pw"}}).imap
    assert s == ImapSettings(host="imap.provider.example", port=993, tls="implicit",
                             user=MAILBOX, password="pw", folder="INBOX",
                             processed_folder="Processed", verify=True, poll_interval=60.0)
    assert "pw" not in repr(s)
    (tmp_path / "imap-password").write_text("from-file\n")
    s = config.from_mapping(tmp_path, {**base, "imap": {
        "host": "h", "user": "u", "tls": "starttls", "password_file": "imap-password",
        "folder": "Broker", "processed_folder": "Broker/Done", "verify": False,
        "poll_interval": 30, "child": "Sam"}}).imap
    assert s is not None
    assert (s.port, s.tls, s.password, s.folder, s.processed_folder, s.verify,
            s.poll_interval, s.child) == (143, "starttls", "from-file", "Broker",
                                          "Broker/Done", False, 30.0, "sam")
    monkeypatch.setenv("BROKER_IMAP_PASSWORD", "from-env")
    s = config.from_mapping(tmp_path, {**base, "imap": {"host": "h", "user": "u",
                                                        "password": "pw"}}).imap
    assert s is not None and s.password == "from-env"
    monkeypatch.delenv("BROKER_IMAP_PASSWORD")
    for bad, message in [
        ({"user": "u", "password": "p"}, "imap.host is required"),
        ({"host": "h", "password": "p"}, "imap.user is required"),
        ({"host": "h", "user": "u"}, "needs a password"),
        ({"host": "h", "user": "u", "password": "p", "tls": "ssl"}, "imap.tls must be"),
        ({"host": "h", "user": "u", "password": "p", "port": "993"}, "wrong type"),
        ({"host": "h", "user": "u", "password": "p", "verify": "no"}, "wrong type"),
        ({"host": "h", "user": "u", "password": "p", "hostname": "x"}, "not a known"),
        ({"host": "h", "user": "u", "password_file": "missing"}, "password_file"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.from_mapping(tmp_path, {**base, "imap": bad})
    # The template's [imap] block is commented out, and parses once uncommented.
    text = config.render_config(domain=DOMAIN, listen="127.0.0.1:2525", relay="127.0.0.1:25")
    home = tmp_path / "home"
    home.mkdir()
    (home / config.CONFIG_NAME).write_text(text)
    assert config.load(home).imap is None
    block = text[text.index("# [imap]"):]
    uncommented = "\n".join(
        line[2:] for line in block.splitlines()
        if line.startswith("# ") and ("=" in line or line.startswith("# [imap]"))
        and not line.startswith("# Mail") and not line.startswith("# the SMTP")
    )
    (home / "imap-password").write_text("x")
    (home / config.CONFIG_NAME).write_text(text + "\n" + uncommented.replace("# [imap]", ""))
    s = config.load(home).imap
    assert s is not None and (s.host, s.password, s.child) == ("imap.provider.example", "x",
                                                                "sam")


# -- the broker with a mailbox -------------------------------------------------------------------


def test_new_mail_is_spooled_held_and_a_reply_by_references_decides(
    dovecot: Dovecot, world_factory: Callable[..., World]
) -> None:
    world = world_factory(imap=_imap(dovecot))
    dovecot.append(_raw(_mailbox_report()))
    review = world.review()
    assert "Sam worked on handwriting" in review.text()
    record = world.wait_state("awaiting_review")
    assert record.sender_email == "lee@clinic.example"
    _until(lambda: dovecot.count("INBOX") == 0 and dovecot.count("Processed") == 1,
           what="the message moved to Processed")
    state = json.loads((world.home / STATE_NAME).read_text())
    assert state["uids"] == {} and len(state["keys"]) == 1 and state["pending"] is None

    # The guardian answers to the plain mailbox address; only References say which record.
    reply = reply_to(review, "APPROVE")
    del reply["To"]
    reply["To"] = MAILBOX
    del reply["In-Reply-To"]
    assert "review." in str(reply["References"])
    dovecot.append(_raw(reply))
    world.wait_state("released")
    world.wait_for(lambda m: m.rcpt_tos[0] in ("park@school.example", "ortiz@school.example"),
                   count=2)
    _until(lambda: dovecot.count("Processed") == 2, what="the reply moved")


@pytest.mark.parametrize("crash_at", ["after_spool", "after_store"])
def test_crash_between_store_and_move_gives_one_record(
    dovecot: Dovecot, world_factory: Callable[..., World], crash_at: str
) -> None:
    world = world_factory(imap=_imap(dovecot))
    service = world.service
    assert service is not None and service.imap is not None
    crashed = threading.Event()

    def crash(uid: int, spool_id: str) -> None:
        # Like a kill: the worker stops right here, before the next step.
        service.imap_stop.set()
        crashed.set()
        raise RuntimeError("simulated crash")

    setattr(service.imap, crash_at, crash)
    dovecot.append(_raw(_mailbox_report()))
    assert crashed.wait(10)
    world.review()  # the stored message went through the pipeline
    assert dovecot.count("INBOX") == 1  # ...but was never moved
    state = json.loads((world.home / STATE_NAME).read_text())
    if crash_at == "after_spool":
        assert state["pending"] is not None and state["uids"] == {}
    else:
        assert state["pending"] is None and len(state["uids"]) == 1

    world.stop_broker()
    world.start_broker()
    _until(lambda: dovecot.count("INBOX") == 0 and dovecot.count("Processed") == 1,
           what="the message moved after the restart")
    world.settle(1.0)
    assert len(world.records()) == 1
    assert len(world.to(GUARDIAN, "Review needed")) == 1
    # The same bytes again (a COPY whose EXPUNGE never happened): recognised, not spooled.
    c = dovecot.client()
    c.select_folder("Processed")
    uid = c.search(["ALL"])[0]
    data = c.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    c.logout()
    dovecot.append(data)
    _until(lambda: dovecot.count("INBOX") == 0, what="the copy moved")
    world.settle(1.0)
    assert len(world.records()) == 1


def test_a_20_mb_message_is_stored_and_held(
    dovecot: Dovecot, world_factory: Callable[..., World]
) -> None:
    world = world_factory(imap=_imap(dovecot))
    big = os.urandom(15_000_000)  # ~20 MB once base64-encoded
    msg = _mailbox_report(attachments=(("scan.bin", "application/octet-stream", big),))
    raw = _raw(msg)
    assert 19_000_000 < len(raw) < 25 * 1024 * 1024
    started = time.monotonic()
    dovecot.append(raw)
    record = world.wait_state("awaiting_review", timeout=40)
    print(f"20 MB: record after {time.monotonic() - started:.1f}s")
    assert record.sender_email == "lee@clinic.example"
    world.notice("Review needed", timeout=40)
    print(f"20 MB: review request after {time.monotonic() - started:.1f}s")
    _until(lambda: dovecot.count("Processed") == 1, what="the big message moved")


# -- the fetcher alone ---------------------------------------------------------------------------


def test_envelope_move_fallback_and_size_limit(
    dovecot: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    stored: list[str] = []
    f = _fetcher(dovecot, tmp_path, spool, on_stored=stored.append, max_message_size=100_000)
    # Addressed to the broker's own review address (Cc) and, in Delivered-To, the mailbox.
    msg = _mailbox_report()
    msg["Cc"] = f"Sam <review+{'a' * 32}@{DOMAIN}>, other@elsewhere.example"
    msg["Delivered-To"] = MAILBOX
    dovecot.append(_raw(msg))
    plain = _mailbox_report()
    del plain["Return-Path"]
    dovecot.append(_raw(plain))
    dovecot.append(_raw(_mailbox_report(body="x" * 200_000)))  # over the limit
    f.connect()
    f._move_ok = False  # the server's MOVE is ignored: COPY + \Deleted + UID EXPUNGE
    with caplog.at_level(logging.WARNING, logger="broker.intake.imap"):
        assert f.run_once() == 2
    assert "over the limit of 100000" in caplog.text and "stays in the folder" in caplog.text
    entries = spool.pending()
    assert [e.id for e in entries] == sorted(stored) and len(entries) == 2
    envs = sorted((e.envelope for e in entries), key=lambda e: e.rcpt_tos, reverse=True)
    # None of the broker's addresses named (To is the mailbox): the child list address.
    assert envs[0].rcpt_tos == (f"sam@{DOMAIN}",)
    assert envs[0].mail_from == "lee@clinic.example"  # From, with no Return-Path
    assert envs[0].peer == f"imap:{dovecot.host}"
    # The broker's own address in Cc; the mailbox and other addresses are not ours.
    assert envs[1].rcpt_tos == (f"review+{'a' * 32}@{DOMAIN}",)
    assert dovecot.count("INBOX") == 1 and dovecot.count("Processed") == 2
    caplog.clear()
    # The refused message is remembered: not fetched or reported again.
    f._uidplus = False  # plain EXPUNGE where UIDPLUS is missing
    with caplog.at_level(logging.WARNING, logger="broker.intake.imap"):
        assert f.run_once() == 0
    assert caplog.text == ""
    dovecot.append(_raw(_mailbox_report(subject="third")))
    assert f.run_once() == 1
    assert dovecot.count("INBOX") == 1 and dovecot.count("Processed") == 3
    f.close()
    spool.close()


def test_server_restart_reconnects_and_continues(dovecot: Dovecot, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stored: list[str] = []
    f = _fetcher(dovecot, tmp_path, spool, on_stored=stored.append,
                 backoff_initial=0.1, backoff_max=0.5)
    thread = threading.Thread(target=f.run, daemon=True)
    thread.start()
    try:
        dovecot.append(_raw(_mailbox_report(subject="one")))
        _until(lambda: len(stored) == 1, what="the first message")
        _until(lambda: f.client is not None and f.connections == 1, what="connected")
        dovecot.stop()
        time.sleep(0.5)
        dovecot.start()
        dovecot.append(_raw(_mailbox_report(subject="two")))
        _until(lambda: len(stored) == 2, timeout=15, what="the second message")
        assert f.connections >= 2
        assert thread.is_alive()
        _until(lambda: dovecot.count("INBOX") == 0 and dovecot.count("Processed") == 2,
               timeout=15, what="both moved to Processed")
    finally:
        f.stop_event.set()
        thread.join(10)
        spool.close()
    assert not thread.is_alive()


def test_polling_where_idle_is_missing(dovecot: Dovecot, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stored: list[str] = []
    f = _fetcher(dovecot, tmp_path, spool, on_stored=stored.append,
                 settings=_imap(dovecot, poll_interval=0.3))
    f.connect()
    f._idle_ok = False  # as if the server had no IDLE
    thread = threading.Thread(target=f.run, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        dovecot.append(_raw(_mailbox_report()))
        _until(lambda: len(stored) == 1, timeout=5, what="the polled message")
    finally:
        f.stop_event.set()
        thread.join(5)
        spool.close()
    assert not thread.is_alive()


def test_wrong_password_is_reported_and_retried(
    dovecot: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    bad = _imap(dovecot, password="wrong")
    f = _fetcher(dovecot, tmp_path, spool, settings=bad, backoff_initial=0.2, backoff_max=0.4)
    with pytest.raises(ImapLoginRefused) as refused:
        f.run_once()
    assert str(refused.value).startswith(
        f"IMAP login to {dovecot.host} as {dovecot.user} refused: ")
    assert str(refused.value).endswith("; check [imap] user/password")
    dovecot.append(_raw(_mailbox_report()))
    thread = threading.Thread(target=f.run, daemon=True)
    with caplog.at_level(logging.ERROR, logger="broker.intake.imap"):
        thread.start()
        time.sleep(1.5)
        assert thread.is_alive()
        f.stop_event.set()
        thread.join(5)
    assert not thread.is_alive()
    # Retried, with pauses (0.2 s, then 0.4 s): a handful of attempts, not a busy loop.
    assert 2 <= f.login_failures <= 6, f.login_failures
    lines = [r.getMessage() for r in caplog.records]
    assert all("check [imap] user/password" in line for line in lines) and lines
    assert "wrong" not in caplog.text  # the password is never logged
    assert spool.pending() == [] and dovecot.count("INBOX") == 1
    spool.close()


def test_message_key_dedupes_by_message_id_and_hash(dovecot: Dovecot, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    f = _fetcher(dovecot, tmp_path, spool)
    msg = _mailbox_report()
    dovecot.append(_raw(msg))
    dovecot.append(_raw(msg))  # the very same message twice
    other = _mailbox_report()
    other.replace_header("Message-ID", str(msg["Message-ID"]))
    other.replace_header("Date", email.utils.formatdate(time.time() + 60))
    dovecot.append(_raw(other))  # same Message-ID, other bytes: a different message
    assert f.run_once() == 3
    assert len(spool.pending()) == 2
    f.close()
    # A new fetcher (a restart) remembers the keys.
    f2 = _fetcher(dovecot, tmp_path, spool)
    dovecot.append(_raw(msg))
    assert f2.run_once() == 1
    assert len(spool.pending()) == 2
    f2.close()
    spool.close()
