"""The spoof suite: replies that try to decide on a record without the right to, end to end
over real SMTP. None of them may release anything.

Each case posts its own record into a shared running broker (one World per reply
authentication mode and database backend), sends the hostile reply, and then checks:

- nothing reached any school or provider address (the provider only ever gets its
  "held for review" receipt), checked per case and once more after the workers ran;
- the record is still awaiting_review (expired / denied where the case made it so);
- an audit row says why: reply_refused / reply_ignored / reply_not_understood (or the
  quarantine / stray-mail event for a reply that carries no token at all) with the reason.

Everything else in each spoofed reply is made as valid as possible (a DKIM signature of
the guardian's own domain, the guardian's From), so that the one defect the case is
about is what stops it.
"""

from __future__ import annotations

import datetime as dt
import email
import json
import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import update

from broker.crypto import dkim as bdkim
from broker.crypto import pgp, pgpmime
from broker.crypto.keys import create_broker_key
from broker.db.migrate import upgrade
from broker.db.models import Record, Token, utcnow
from broker.mail import compose as mc
from broker.review import tokens
from tests.conftest import reset_postgres
from tests.harness import DOMAIN, GUARDIAN, SCHOOL, TEAM, Received, World, reply_to, report
from tests.test_reply_auth_dkim import TRUSTED, Keys
from tests.test_story_refusals import TEAM_ALEX

PROVIDER = "lee@clinic.example"
ALEX_GUARDIAN = "chris@kim.example"
OUTSIDE = (*SCHOOL, PROVIDER)
# A loopback address that is not among the trusted relays (127.0.0.1, ::1).
UNTRUSTED_PEER = "127.0.0.2"
RECEIVED = f"Received: from mail.home.example by {TRUSTED}; Mon, 2 Mar 2026 10:00 +0000\r\n"


# -- worlds ------------------------------------------------------------------------------


def _database(request: pytest.FixtureRequest, tmp: Path) -> str:
    """Like conftest's db_url, for a class-scoped World (one per backend per class)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'broker.db'}"
    else:
        url = request.getfixturevalue("pg_url")
        reset_postgres(url)
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def dkim_keys() -> Keys:
    k = Keys()
    k.add("home.example")
    k.add("evil.example")
    return k


@pytest.fixture(scope="class", params=["sqlite", "postgresql"])
def dkim_world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               dkim_keys: Keys) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("spoof-dkim")
    url = _database(request, tmp)
    bdkim.set_resolver(lambda name: dkim_keys.txt.get(name))
    world = World(tmp / "home", url, reply_auth="dkim", trusted_authserv_ids=(TRUSTED,))
    world.add_team(TEAM_ALEX)
    world.start()
    try:
        yield world
        _nothing_ever_left(world)
    finally:
        world.stop()
        bdkim.set_resolver(None)


@dataclass
class PgpKeys:
    guardian_private: str
    guardian_public: str
    mallory_private: str


@pytest.fixture(scope="module")
def pgp_keys() -> PgpKeys:
    g_priv, g_pub = pgp.generate_keypair("Dana Rivera", GUARDIAN)
    m_priv, _ = pgp.generate_keypair("Dana Rivera", GUARDIAN)  # same name, another key
    return PgpKeys(g_priv, g_pub, m_priv)


@pytest.fixture(scope="class", params=["sqlite", "postgresql"])
def pgp_world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              pgp_keys: PgpKeys) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("spoof-pgp")
    url = _database(request, tmp)
    key_file = tmp / "dana.asc"
    key_file.write_text(pgp_keys.guardian_public)
    team = TEAM.replace(f'email = "{GUARDIAN}"\n',
                        f'email = "{GUARDIAN}"\npgp_key = "{key_file}"\n')
    world = World(tmp / "home", url, team=team, reply_auth="pgp")
    create_broker_key(world.home, DOMAIN)
    world.start()
    try:
        yield world
        _nothing_ever_left(world)
    finally:
        world.stop()


# -- helpers -----------------------------------------------------------------------------


def _reviews(world: World, to: str) -> list[Received]:
    """Review requests and previews to ``to`` (their Message-ID carries the token)."""
    return [m for m in world.all_to([to])
            if str(m.msg.get("Message-ID", "")).startswith("<review.")]


def _post(world: World, child: str = "sam", guardian: str = GUARDIAN) -> tuple[Received, int]:
    """A provider's report to ``child``: the new review request and its record id."""
    seen = {str(m.msg["Message-ID"]) for m in _reviews(world, guardian)}
    world.send(report(), PROVIDER, f"{child}@{DOMAIN}")
    review = world.wait_for(
        lambda m: guardian in m.rcpt_tos
        and str(m.msg.get("Message-ID", "")).startswith("<review.")
        and str(m.msg["Message-ID"]) not in seen)[0]
    return review, _record_of(world, review)


def _token(review: Received) -> str:
    token = mc.token_from_address(str(review.msg["Reply-To"]), DOMAIN)
    assert token, review.msg["Reply-To"]
    return token


def _record_of(world: World, review: Received) -> int:
    with world.db.session() as s:
        row = tokens.find(s, _token(review))
        assert row is not None
        return row.record_id


def _raw(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=policy.SMTP)


def _send(world: World, raw: bytes, rcpt: str, mail_from: str = GUARDIAN,
          source: str | None = None) -> None:
    """SMTP to the broker's intake, optionally from another local source address."""
    with smtplib.SMTP("127.0.0.1", world.port, timeout=30,
                      source_address=(source, 0) if source else None) as smtp:
        smtp.sendmail(mail_from, [rcpt], raw)


def _reply_address(review: Received) -> str:
    return str(review.msg["Reply-To"])


def _events(world: World, action: str, record_id: int | None, count: int = 1) -> list[dict]:
    found = world.wait_audit(action, count=count, record_id=record_id)
    return [json.loads(e.description or "{}") for e in found]


def _matches(event: dict, expect: dict[str, str]) -> bool:
    return all(str(v) in json.dumps(event.get(k, "")) for k, v in expect.items())


def _unrecorded(world: World, action: str, expect: dict[str, str],
                timeout: float = 10.0) -> list[dict]:
    """Audit events of ``action`` on no record (waits for one matching ``expect``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [json.loads(e.description or "{}") for e in world.audit(action)
                 if e.record_id is None]
        if any(_matches(e, expect) for e in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _only_receipts(world: World) -> None:
    """Nothing went to the school; the provider got nothing but 'held' receipts."""
    assert world.all_to(SCHOOL) == []
    for m in world.all_to([PROVIDER]):
        assert str(m.msg["Subject"]).startswith("Received and held for review"), \
            m.msg["Subject"]


def _nothing_ever_left(world: World) -> None:
    """After every case of a World: let the outbox run, then nothing was released."""
    world.settle(0.5)
    _only_receipts(world)
    assert world.audit("approved") == [] and world.audit("releasing") == []
    assert world.audit("delivered") == []


def _settled(world: World, record_id: int, state: str = "awaiting_review") -> None:
    record = world.record(record_id)
    assert record.state == state, (record.id, record.state)
    assert world.audit("approved", record_id) == []
    _only_receipts(world)


# -- mode dkim -----------------------------------------------------------------------------

# Each case gets (world, keys, review) and returns what must be on the record:
# (audit action, {key: expected value or substring}, final state).
Outcome = tuple[str, dict[str, str], str]
Case = Callable[[World, Keys, Received, int], Outcome]
DKIM_CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        DKIM_CASES[name] = fn
        return fn
    return register


def _signed(keys: Keys, msg: EmailMessage | bytes, domain: str = "home.example") -> bytes:
    return keys.sign(msg if isinstance(msg, bytes) else _raw(msg), domain)


@case("forged-from-no-dkim")
def _forged_from(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    _send(world, _raw(reply_to(review, "APPROVE")), _reply_address(review))
    return "reply_refused", {"reason": "auth_failed", "detail": "no DKIM-Signature"}, \
        "awaiting_review"


@case("forged-from-broken-dkim")
def _broken_dkim(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    # The guardian's real, signed "DENY" with the command changed on the way.
    raw = _signed(keys, reply_to(review, "DENY", quote=False))
    head, sep, body = raw.partition(b"\r\n\r\n")
    raw = head + sep + body.replace(b"DENY", b"APPROVE")
    _send(world, raw, _reply_address(review))
    # dkimpy reports the body hash mismatch as an error: either way, not verified.
    return "reply_refused", {"reason": "auth_failed", "detail": "d=home.example s=sel: "}, \
        "awaiting_review"


@case("dkim-of-another-domain")
def _other_domain(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    _send(world, _signed(keys, reply_to(review, "APPROVE"), "evil.example"),
          _reply_address(review))
    return "reply_refused", {"reason": "auth_failed", "detail": "not aligned"}, \
        "awaiting_review"


_AR = (f"Authentication-Results: {TRUSTED}; dkim=pass header.d=home.example; "
       "dmarc=pass header.from=home.example\r\n")


@case("injected-ar-below-received")
def _ar_below(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    # The sender wrote the header; an MTA on the way then put its Received on top.
    forged = (RECEIVED + _AR).encode() + _raw(reply_to(review, "APPROVE"))
    _send(world, forged, _reply_address(review))
    return "reply_refused", {"reason": "auth_failed", "detail": "below the first Received"}, \
        "awaiting_review"


@case("injected-ar-no-received")
def _ar_bare(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    _send(world, _AR.encode() + _raw(reply_to(review, "APPROVE")), _reply_address(review))
    return "reply_refused", {"reason": "auth_failed", "detail": "no Received header"}, \
        "awaiting_review"


@case("injected-ar-untrusted-peer")
def _ar_peer(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    # Headers exactly as the operator's MTA would write them, but handed to the intake
    # by a host that is not a trusted relay: the sender wrote them all.
    forged = (_AR + RECEIVED).encode() + _raw(reply_to(review, "APPROVE"))
    _send(world, forged, _reply_address(review), source=UNTRUSTED_PEER)
    return "reply_refused", {"reason": "auth_failed", "detail": "not handed over by a trusted"}, \
        "awaiting_review"


@case("injected-ar-untrusted-authserv-id")
def _ar_untrusted_id(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    forged = (_AR.replace(TRUSTED, "mx.evil.example") + RECEIVED).encode() + _raw(
        reply_to(review, "APPROVE"))
    _send(world, forged, _reply_address(review))
    return "reply_refused", {"reason": "auth_failed", "detail": "untrusted authserv-id"}, \
        "awaiting_review"


@case("missing-token-to-list-address")
def _no_token_list(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    # No token anywhere: no review+ address, no In-Reply-To / References.
    msg = reply_to(review, "APPROVE")
    for name in ("To", "In-Reply-To", "References"):
        del msg[name]
    msg["To"] = f"sam@{DOMAIN}"
    _send(world, _signed(keys, msg), f"sam@{DOMAIN}")
    # New mail from a guardian to the list address: quarantined, never a decision.
    return "quarantined", {"reason": "mail from a guardian to the list address"}, \
        "awaiting_review"


@case("missing-token-plus-address-dropped")
def _no_token_plain(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    msg = reply_to(review, "APPROVE")
    for name in ("To", "In-Reply-To", "References"):
        del msg[name]
    msg["To"] = f"review@{DOMAIN}"
    # The intake knows no such address: refused at RCPT, nothing stored, so no audit row
    # either (the sender's MTA tells the sender).
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        _send(world, _signed(keys, msg), f"review@{DOMAIN}")
    assert refused.value.recipients[f"review@{DOMAIN}"][0] == 550
    return "smtp_refused", {}, "awaiting_review"


@case("unknown-token")
def _unknown_token(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    bogus = mc.review_address(tokens.new_token(), DOMAIN)
    msg = reply_to(review, "APPROVE")
    for name in ("To", "In-Reply-To", "References"):
        del msg[name]
    msg["To"] = bogus
    _send(world, _signed(keys, msg), bogus)
    # A token of no record: the event is on no record either.
    return "reply_refused@none", {"reason": "unknown_token"}, "awaiting_review"


@case("replayed-token-after-deny")
def _replay_used(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    _send(world, _signed(keys, reply_to(review, "DENY")), _reply_address(review))
    world.wait_state("denied", rid)
    # A captured, validly signed APPROVE with the spent token.
    _send(world, _signed(keys, reply_to(review, "APPROVE")), _reply_address(review))
    return "reply_refused", {"reason": "used"}, "denied"


@case("replayed-token-after-preview")
def _replay_superseded(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    redact = _signed(keys, reply_to(review, "REDACT 2"))
    _send(world, redact, _reply_address(review))
    world.wait_for(lambda m: GUARDIAN in m.rcpt_tos
                   and "Preview" in str(m.msg.get("Subject", ""))
                   and _reply_address(m) != _reply_address(review))
    _send(world, redact, _reply_address(review))  # the very same mail again
    _send(world, _signed(keys, reply_to(review, "APPROVE")), _reply_address(review))
    events = _events(world, "reply_refused", rid, count=2)
    assert [e["reason"] for e in events] == ["superseded", "superseded"], events
    return "reply_refused", {"reason": "superseded"}, "awaiting_review"


@case("another-childs-token")
def _foreign_token(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    # Dana (Sam's guardian only) answers the review request of Alex's record.
    alex_review, alex_id = _post(world, "alex", ALEX_GUARDIAN)
    _send(world, _signed(keys, reply_to(alex_review, "APPROVE")), _reply_address(alex_review))
    desc = _events(world, "reply_refused", alex_id)[0]
    assert desc["reason"] == "not_guardian" and desc["sender"] == GUARDIAN, desc
    _settled(world, alex_id)
    # Sam's token in To, Alex's review request in References: one reply, two records.
    msg = reply_to(review, "APPROVE")
    del msg["References"]
    msg["References"] = f"{review.msg['Message-ID']} {alex_review.msg['Message-ID']}"
    _send(world, _signed(keys, msg), _reply_address(review))
    return "reply_refused@none", {"reason": "tokens of different records"}, "awaiting_review"


@case("expired-token")
def _expired(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
    past = utcnow() - dt.timedelta(seconds=1)
    with world.db.session() as s:
        s.execute(update(Record).where(Record.id == rid).values(expires_at=past))
        s.execute(update(Token).where(Token.record_id == rid).values(expires_at=past))
    world.wait_state("expired", rid)  # the expiry timer ran
    _send(world, _signed(keys, reply_to(review, "APPROVE")), _reply_address(review))
    return "reply_refused", {"reason": "expired"}, "expired"


def _quoted_approve(review: Received, new_text: str, style: str) -> EmailMessage:
    msg = reply_to(review, "", quote=False)
    quoted = "\n".join("> " + line for line in review.text().splitlines())
    if style == "gmail":
        body = (f"{new_text}\n\nOn Mon, 2 Mar 2026 at 10:00, Sam's records <sam@{DOMAIN}> "
                f"wrote:\n> APPROVE\n>\n{quoted}\n")
    else:  # Outlook: no '>' at all below the separator
        body = (f"{new_text}\n\n-----Original Message-----\nFrom: Sam's records "
                f"<sam@{DOMAIN}>\nSent: Monday, March 2, 2026 10:00 AM\nSubject: "
                f"{review.msg['Subject']}\n\nAPPROVE\n\n{review.text()}\n")
    msg.set_content(body)
    return msg


for _style in ("gmail", "outlook"):
    for _label, _text in (("empty", ""), ("other-words", "I need to think about this first.")):
        def _make(style: str = _style, text: str = _text) -> Case:
            def run(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
                _send(world, _signed(keys, _quoted_approve(review, text, style)),
                      _reply_address(review))
                return "reply_not_understood", {"auth": "dkim"}, "awaiting_review"
            return run
        DKIM_CASES[f"approve-only-quoted-{_style}-{_label}"] = _make()


_AUTO = {
    "auto-submitted": ({"Auto-Submitted": "auto-replied"}, GUARDIAN, "Auto-Submitted"),
    "precedence": ({"Precedence": "auto_reply"}, GUARDIAN, "Precedence"),
    "out-of-office-subject": ({}, GUARDIAN, "Out of Office"),
    "null-sender": ({}, "", "null return path"),
}


for _signal, (_headers, _mail_from, _why) in _AUTO.items():
    def _make_auto(headers: dict[str, str] = _headers, mail_from: str = _mail_from,
                   why: str = _why, signal: str = _signal) -> Case:
        def run(world: World, keys: Keys, review: Received, rid: int) -> Outcome:
            # An out-of-office answer that quotes the whole review request (APPROVE
            # included), signed by the guardian's own provider.
            msg = reply_to(review, "I am away until Monday.\n\nAPPROVE", headers=headers)
            if signal == "out-of-office-subject":
                del msg["Subject"]
                msg["Subject"] = f"Out of Office: {review.msg['Subject']}"
            before = len(world.all_to([GUARDIAN]))
            _send(world, _signed(keys, msg), _reply_address(review), mail_from=mail_from)
            desc = _events(world, "reply_ignored", rid)[0]
            assert desc["reason"].startswith("automatic"), desc
            world.settle(0.2)
            assert len(world.all_to([GUARDIAN])) == before  # never answered
            return "reply_ignored", {"reason": why}, "awaiting_review"
        return run
    DKIM_CASES[f"auto-reply-{_signal}"] = _make_auto()


def _check(world: World, rid: int, outcome: Outcome) -> None:
    action, expect, state = outcome
    if action == "smtp_refused":
        events = [{}]
    elif action == "quarantined":
        # Not a reply at all: the event is about the new inbound mail, not this record.
        events = [json.loads(e.description or "{}") for e in world.wait_audit(action)]
    elif action.endswith("@none"):
        action = action.removesuffix("@none")
        events = _unrecorded(world, action, expect)
    else:
        events = _events(world, action, rid)
    assert any(_matches(e, expect) for e in events), (action, expect, events)
    _settled(world, rid, state)


class TestDkimMode:
    @pytest.mark.parametrize("name", list(DKIM_CASES))
    def test_spoof_releases_nothing(self, dkim_world: World, dkim_keys: Keys,
                                    name: str) -> None:
        review, rid = _post(dkim_world)
        outcome = DKIM_CASES[name](dkim_world, dkim_keys, review, rid)
        _check(dkim_world, rid, outcome)


# -- mode pgp ------------------------------------------------------------------------------


def _pgp_signed(msg: EmailMessage, private: str) -> bytes:
    return pgpmime.sign_message(msg, private).as_bytes(policy=policy.SMTP)


def _pgp_unsigned(review: Received, keys: PgpKeys) -> tuple[bytes, str]:
    return _raw(reply_to(review, "APPROVE", quote=False)), "no OpenPGP signature"


def _pgp_mallory(review: Received, keys: PgpKeys) -> tuple[bytes, str]:
    return (_pgp_signed(reply_to(review, "APPROVE", quote=False), keys.mallory_private),
            "not the guardian's registered key")


def _pgp_mallory_inline(review: Received, keys: PgpKeys) -> tuple[bytes, str]:
    msg = reply_to(review, "", quote=False)
    msg.set_content(pgp.sign_inline(b"APPROVE\n", keys.mallory_private, compress=False))
    return _raw(msg), "not the guardian's registered key"


def _pgp_tampered(review: Received, keys: PgpKeys) -> tuple[bytes, str]:
    raw = _pgp_signed(reply_to(review, "DENY", quote=False), keys.guardian_private)
    assert raw.count(b"DENY") == 1
    return raw.replace(b"DENY", b"APPROVE"), "does not verify"


def _pgp_unsigned_beside_signed(review: Received, keys: PgpKeys) -> tuple[bytes, str]:
    # The guardian's signed "thanks" forwarded inside a mail whose own text says APPROVE.
    signed = email.message_from_bytes(
        _pgp_signed(reply_to(review, "Thanks, received.", quote=False),
                    keys.guardian_private), policy=policy.default)
    outer = reply_to(review, "APPROVE", quote=False)
    outer.add_attachment(signed)
    return _raw(outer), "no OpenPGP signature"


PGP_CASES = {
    "unsigned": _pgp_unsigned,
    "signed-by-non-guardian-key": _pgp_mallory,
    "inline-signed-by-non-guardian-key": _pgp_mallory_inline,
    "guardian-signature-altered": _pgp_tampered,
    "unsigned-approve-beside-a-signed-part": _pgp_unsigned_beside_signed,
}


class TestPgpMode:
    @pytest.mark.parametrize("name", list(PGP_CASES))
    def test_spoof_releases_nothing(self, pgp_world: World, pgp_keys: PgpKeys,
                                    name: str) -> None:
        review, rid = _post(pgp_world)
        raw, detail = PGP_CASES[name](review, pgp_keys)
        _send(pgp_world, raw, _reply_address(review))
        _check(pgp_world, rid, ("reply_refused", {"reason": "auth_failed", "detail": detail},
                                "awaiting_review"))
