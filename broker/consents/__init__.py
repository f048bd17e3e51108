"""Consents on file: the release a family signed, filed, revoked and renewed (DESIGN.md
section 6). The functions live in `broker.consents.manage`."""

from broker.consents.manage import (
    ConsentError,
    RevokeResult,
    active_for_child,
    add_consent,
    renew_consent,
    revoke_consent,
    terms_of,
)

__all__ = [
    "ConsentError",
    "RevokeResult",
    "active_for_child",
    "add_consent",
    "renew_consent",
    "revoke_consent",
    "terms_of",
]
