"""The one place that decides whether a reply really comes from the guardian.

A token shows the sender saw the review request; a From address says who they claim
to be; only a signature proves it. The mode comes from broker.toml (replies.
authentication):

- ``token`` trusts the From address of a registered guardian; for the demo and tests.
- ``dkim``: the reply must also carry exactly one From header with exactly one
  address (the guardian's), and either a DKIM signature that the broker verifies
  itself (broker.crypto.dkim: d= aligned with the From domain, From signed, no l=),
  or an Authentication-Results header from an operator-trusted authserv-id standing
  above the first Received header saying dkim=pass / dmarc=pass for that domain
  (broker.crypto.authresults documents that rule).
- ``pgp``: the reply must carry exactly one From header (the guardian's) and a valid
  OpenPGP signature (PGP/MIME, RFC 3156, or inline in the text body; encrypted to the
  broker's key or not) by the key registered for that guardian in the team file (not
  marked revoked, not expired). The commands are then read only from the signed content
  (``AuthResult.message``): unsigned parts next to a signed one decide nothing.

Fail closed: any mode this build cannot verify, and any error while verifying,
approves nothing. ``detail`` says what was seen, for the audit and the guardians.
"""

from __future__ import annotations

import email
import ipaddress
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.utils import getaddresses

from broker.config import Settings
from broker.crypto import pgp, pgpmime
from broker.crypto.authresults import check_authentication_results, header_list
from broker.crypto.dkim import safe, verify_dkim
from broker.crypto.keys import broker_private_key, person_key
from broker.db.models import Person
from broker.team.spec import AUTH_STRENGTH

# Keep audit events and notices a readable size whatever the sender put in headers.
MAX_DETAIL = 1500


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    method: str
    detail: str = ""
    # pgp mode: the signed content the commands must be read from (None: the reply as is).
    message: EmailMessage | None = field(default=None, compare=False, repr=False)


def authenticate_reply(
    msg: EmailMessage, guardian: Person, settings: Settings, raw: bytes | None = None,
    peer: str = "",
) -> AuthResult:
    """``raw`` is the reply exactly as received (signatures are over those bytes); when
    it is not given, the parsed message is serialised again, which may break them.
    ``peer`` is the host:port that handed it to the intake: Authentication-Results are
    believed only from the operator's trusted relays."""
    mode = effective_mode(settings.reply_auth, guardian.reply_auth)
    if mode == "token":
        return AuthResult(True, "token", "token and guardian From address (no signature check)")
    if mode == "dkim":
        try:
            return _dkim(msg, guardian, settings, raw, peer)
        except Exception as exc:  # never let a verifier bug approve or crash the pipeline
            return AuthResult(False, "dkim", f"verification error ({type(exc).__name__})")
    if mode == "pgp":
        try:
            return _pgp(msg, guardian, settings, raw)
        except Exception as exc:  # never let a verifier bug approve or crash the pipeline
            return AuthResult(False, "pgp", f"verification error ({type(exc).__name__})")
    # Fail closed: a mode this build cannot verify approves nothing.
    return AuthResult(False, mode, f"reply authentication mode {mode!r} is not available")


def _dkim(msg: EmailMessage, guardian: Person, settings: Settings,
          raw: bytes | None, peer: str) -> AuthResult:
    froms = msg.get_all("From", [])
    addresses = [a for _, a in getaddresses([str(v) for v in froms]) if a]
    if len(froms) != 1 or len(addresses) != 1:
        return AuthResult(False, "dkim", f"{len(froms)} From headers with {len(addresses)} "
                          "addresses; exactly one is needed")
    address = addresses[0].strip().lower()
    if address != guardian.email.lower():
        return AuthResult(False, "dkim", "From is not the guardian's address")
    domain = address.rpartition("@")[2]
    if not domain:
        return AuthResult(False, "dkim", "From address has no domain")
    data = raw if raw is not None else msg.as_bytes()

    sig = verify_dkim(data, domain)
    if sig.ok:
        return AuthResult(True, "dkim", _cut(f"DKIM verified by the broker: {sig.describe()}"))
    mailbox = peer.startswith(MAILBOX_PEER)
    if not mailbox and not from_trusted_relay(peer, settings.trusted_relays):
        return AuthResult(False, "dkim", _cut(
            f"no DKIM signature verified for {safe(domain)}: {sig.describe()}; "
            "Authentication-Results not considered (not handed over by a trusted relay)"))
    ar = check_authentication_results(header_list(data), domain,
                                      settings.trusted_authserv_ids, mailbox=mailbox)
    if ar.ok:
        return AuthResult(True, "authentication-results",
                          _cut(f"{ar.describe()}; broker DKIM check: {sig.describe()}"))
    return AuthResult(False, "dkim", _cut(
        f"no DKIM signature or trusted Authentication-Results for {safe(domain)}: "
        f"{sig.describe()}; {ar.describe()}"))


def _guardian_from(msg: EmailMessage, guardian: Person, method: str) -> AuthResult | None:
    froms = msg.get_all("From", [])
    addresses = [a for _, a in getaddresses([str(v) for v in froms]) if a]
    if len(froms) != 1 or len(addresses) != 1:
        return AuthResult(False, method, f"{len(froms)} From headers with {len(addresses)} "
                          "addresses; exactly one is needed")
    if addresses[0].strip().lower() != guardian.email.lower():
        return AuthResult(False, method, "From is not the guardian's address")
    return None


def _pgp(msg: EmailMessage, guardian: Person, settings: Settings,
         raw: bytes | None) -> AuthResult:
    bad_from = _guardian_from(msg, guardian, "pgp")
    if bad_from is not None:
        return bad_from
    state = person_key(guardian.pgp_key, guardian.pgp_key_revoked, for_encryption=False)
    if state.key is None:
        return AuthResult(False, "pgp", f"the guardian's key cannot verify: {state.problem}")
    data = raw if raw is not None else msg.as_bytes(policy=policy.SMTP)
    private = broker_private_key(settings.home)
    outer = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(outer, EmailMessage)
    if outer.get_content_type() in ("multipart/signed", "multipart/encrypted"):
        opened = pgpmime.open_message(data, private, [state.key])
        signed, result = opened.message, opened.signature
    else:
        # Inline: the signed block must be the text body the commands would come from;
        # the commands are then read from the signed data alone.
        body = outer.get_body(preferencelist=("plain",))
        text = (body.get_payload(decode=True) or b"") if body is not None else b""
        if b"-----BEGIN PGP SIGNED MESSAGE-----" in text:
            dec = pgp.verify_inline(text, [state.key])
        elif b"-----BEGIN PGP MESSAGE-----" in text:
            dec = pgp.decrypt(text[text.index(b"-----BEGIN PGP MESSAGE-----"):], private,
                              [state.key])
        else:
            return AuthResult(False, "pgp", "the reply carries no OpenPGP signature")
        signed = EmailMessage(policy=policy.default)
        for name, value in outer.items():
            if not name.lower().startswith("content-") and name.lower() != "mime-version":
                signed[name] = value
        signed.set_content(dec.data.decode("utf-8", "replace"))
        result = dec.signature
    if result.status == "good" and result.signer_fingerprint == state.key.fingerprint:
        return AuthResult(True, "pgp", f"OpenPGP signature by the guardian's key "
                          f"{state.key.fingerprint} verified", message=signed)
    why = {"none": "the reply carries no OpenPGP signature",
           "bad": "the OpenPGP signature does not verify (altered, or not this key)",
           "unknown_key": "signed by a key that is not the guardian's registered key"
           }.get(result.status, f"signature status {result.status}")
    ids = ", ".join(safe(i) for i in result.signer_key_ids)
    return AuthResult(False, "pgp", _cut(why + (f" (key ids {ids})" if ids else "")))


def effective_mode(configured: str, guardian_mode: str | None) -> str:
    """The stricter of broker.toml's mode and the guardian's own (team file): a guardian
    can raise the bar for replies in their name, never lower it."""
    order = AUTH_STRENGTH
    if guardian_mode in order and configured in order:
        return max(configured, guardian_mode, key=order.index)
    return configured


# The peer recorded for mail fetched from the broker's mailbox (IMAP mode): "imap:HOST".
MAILBOX_PEER = "imap:"


def from_trusted_relay(peer: str, relays: tuple[str, ...]) -> bool:
    """Is ``host:port`` (``[v6]:port``) one of the trusted relay addresses?"""
    host = peer.rpartition(":")[0].strip("[]") if ":" in peer else peer
    try:
        return str(ipaddress.ip_address(host)) in relays
    except ValueError:
        return False


def _cut(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."
