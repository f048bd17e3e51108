"""The one place that decides whether a reply really comes from the guardian.

A token shows the sender saw the review request; a From address says who they claim
to be; only a signature proves it. The mode comes from broker.toml (replies.
authentication). `token` trusts the From address of a registered guardian and is
for the demo and tests; DKIM/DMARC and OpenPGP verification plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage

from broker.config import Settings
from broker.db.models import Person


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    method: str
    detail: str = ""


def authenticate_reply(msg: EmailMessage, guardian: Person, settings: Settings) -> AuthResult:
    mode = settings.reply_auth
    if mode == "token":
        return AuthResult(True, "token", "token and guardian From address (no signature check)")
    # Fail closed: a mode this build cannot verify approves nothing.
    return AuthResult(False, mode, f"reply authentication mode {mode!r} is not available")
