"""The broker behind a real Postfix, as deploy/postfix/ sets it up: a family's sender hands
a record to Postfix, Postfix relays records.example to the broker's intake (over SMTP, then
over LMTP), and the broker holds it and asks the guardian.

Runs when Postfix is installed and we are root (tests/postfix.py starts a private instance
in a temporary directory); skips with the reason otherwise.
"""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

import pytest

from broker.db.migrate import upgrade
from tests import postfix
from tests.harness import DOMAIN, GUARDIAN, World

pytestmark = pytest.mark.skipif(postfix.unavailable() is not None,
                                reason=postfix.unavailable() or "")

SENDER = "lee@clinic.example"


def record(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Dr. Lee <{SENDER}>"
    msg["To"] = f"sam@{DOMAIN}"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@clinic.example>"
    msg.set_content("Sam worked on handwriting today; grip is improving.\n")
    return msg.as_bytes(policy=SMTP_POLICY)


@pytest.fixture(params=["smtp", "lmtp"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """A broker whose intake speaks the parametrised protocol (``[smtp] protocol``)."""
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    upgrade(url)
    w = World(tmp_path / "home", url, smtp_protocol=request.param)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def test_record_through_postfix_is_held(world: World) -> None:
    protocol = world.settings.smtp_protocol
    next_hop = (f"lmtp:inet:127.0.0.1:{world.port}" if protocol == "lmtp"
                else f"smtp:[127.0.0.1]:{world.port}")
    try:
        pf = postfix.PrivatePostfix(next_hop).__enter__()
    except RuntimeError as exc:
        pytest.skip(f"private Postfix would not start: {exc}")
    try:
        subject = f"OT session notes via postfix {protocol}"
        pf.send(record(subject), SENDER, f"sam@{DOMAIN}")
        # Postfix handed it over with the transport we configured, and the broker said 250.
        line = pf.wait_log(r"to=<sam@records\.example>.*status=sent")
        assert f"postfix/{protocol}[" in line, line  # the lmtp or smtp delivery agent
        assert f"relay=127.0.0.1[127.0.0.1]:{world.port}" in line, line
        assert "Ok: queued as" in line
        # ...and the broker holds it: the guardian is asked to review.
        review = world.review()
        assert GUARDIAN in review.rcpt_tos
        held = world.wait_state("awaiting_review")
        assert held.child.slug == "sam"
    finally:
        pf.__exit__(None, None, None)


DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "postfix"


def deploy_next_hop(port: int) -> str:
    """The active line of deploy/postfix/transport, with the intake's test port."""
    lines = [line.split() for line in (DEPLOY / "transport").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert [fields[0] for fields in lines] == [DOMAIN], lines
    return lines[0][1].replace(":2525", f":{port}")


def deploy_main_cf(pf: postfix.PrivatePostfix, *, milters: bool = True) -> str:
    """deploy/postfix/main.cf.snippet with its tables where this instance has them
    (texthash: needs no postmap). Without ``milters``: no DKIM milter runs in the test."""
    text = (DEPLOY / "main.cf.snippet").read_text()
    text = text.replace("hash:/etc/postfix/transport", f"texthash:{pf.conf}/transport")
    text = text.replace("hash:/etc/postfix/broker_recipient_access",
                        f"texthash:{DEPLOY}/broker_recipient_access")
    if not milters:
        text = "\n".join(line for line in text.splitlines()
                          if not line.startswith(("smtpd_milters", "non_smtpd_milters",
                                                  "milter_default_action")))
    return text


def test_deploy_snippets_pass_postfix_check() -> None:
    """deploy/postfix/ as an operator would install it: Postfix accepts every line, and the
    transport map hands records.example to the broker's default intake address."""
    pf = postfix.PrivatePostfix(deploy_next_hop(2525))
    try:
        pf.extra_main = deploy_main_cf(pf)
        pf.configure()
        # No chroot jail in the temp dir: column 5 = n, as for the test's own services.
        services = (DEPLOY / "master.cf.snippet").read_text().replace(
            "inet  n       -       y", "inet  n       -       n")
        with (pf.conf / "master.cf").open("a") as f:
            f.write(services)
        for args in (["postfix", "-c", str(pf.conf), "check"],
                     ["postconf", "-c", str(pf.conf), "-n"],
                     ["postconf", "-c", str(pf.conf), "-M"]):
            done = subprocess.run(args, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0 and not done.stderr.strip(), (args, done.stderr)
        main = subprocess.run(["postconf", "-c", str(pf.conf), "-h", "message_size_limit",
                               "relay_domains"], capture_output=True, text=True, timeout=30)
        size, relay = main.stdout.split("\n")[:2]
        assert int(size) == 25 * 1024 * 1024
        assert "records.example" in relay
        assert "127.0.0.1:10025" in subprocess.run(
            ["postconf", "-c", str(pf.conf), "-M", "127.0.0.1:10025/inet"],
            capture_output=True, text=True, timeout=30).stdout
        hop = subprocess.run(["postmap", "-q", DOMAIN, f"texthash:{DEPLOY}/transport"],
                             capture_output=True, text=True, timeout=30)
        assert hop.stdout.strip() == "smtp:[127.0.0.1]:2525"
        assert "error:" not in pf.log() and "warning:" not in pf.log(), pf.log()
    finally:
        pf.stop()


def test_deploy_config_refuses_unknown_recipients_at_rcpt(tmp_path: Path) -> None:
    """With deploy/postfix/main.cf.snippet, Postfix asks the broker about each address at
    its domain while the sender is connected: unknown ones get 550 there (no backscatter),
    a child's list address is accepted and reaches the broker."""
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    upgrade(url)
    world = World(tmp_path / "home", url).start()
    try:
        pf = postfix.PrivatePostfix(deploy_next_hop(world.port))
        # The test's client is on 127.0.0.1: outside mynetworks here, like an Internet
        # sender (permit_mynetworks would let it skip the recipient check).
        pf.extra_main = deploy_main_cf(pf, milters=False) + "\nmynetworks = 192.0.2.1/32\n"
        try:
            pf.start()
        except RuntimeError as exc:
            pf.stop()
            pytest.skip(f"private Postfix would not start: {exc}")
        try:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                pf.send(record("to nobody"), SENDER, f"nobody@{DOMAIN}")
            code, text = refused.value.recipients[f"nobody@{DOMAIN}"]
            assert code == 550, (code, text)
            pf.send(record("OT notes via the deploy config"), SENDER, f"sam@{DOMAIN}")
            pf.wait_log(r"to=<sam@records\.example>.*status=sent")
            world.review()
            assert world.wait_state("awaiting_review").child.slug == "sam"
        finally:
            pf.stop()
    finally:
        world.stop()
