"""Authentication-Results (RFC 8601) written by the operator's own MTA, read with authres.

Which headers are believed - the trust rule
-------------------------------------------
An Authentication-Results header counts only if BOTH hold:

1. its authserv-id is one the operator lists in broker.toml
   (``[replies] trusted_authserv_ids``; empty by default, so none counts), and
2. it stands ABOVE the topmost ``Received`` header of the message as the broker got it.

Every MTA prepends a ``Received`` header when it accepts a message (RFC 5321 4.4),
and the broker's own intake adds none. So when the operator's MTA relays a reply to
the broker, the topmost ``Received`` is that MTA's own, and only headers above it were
added by that MTA after it received the message. Anything below it - including an
Authentication-Results naming a trusted id - came from outside; RFC 8601 section 5
says a receiving MTA must remove those, and this rule treats them as removed. It is
applied when the pipeline reads the reply; the stored raw bytes are never rewritten
(the audit keeps exactly what arrived). A message without any ``Received`` header did
not pass through the operator's MTA, so none of its Authentication-Results counts.

This is sound only if the sender cannot reach the broker's intake except through the
operator's MTA: a sender talking SMTP straight to the intake writes every header,
Received ones included. Set ``trusted_authserv_ids`` only when the intake listens for
that MTA alone (loopback or a firewalled port); with the intake as the public MX,
leave it empty and rely on the broker's own DKIM verification.

The MTA must add its Authentication-Results above its own Received header (Rspamd
and milters that insert at the top do; check yours).

What passes: from a trusted header, ``dkim=pass`` whose ``header.d`` (or the domain
of ``header.i``) is aligned with the From domain (see broker.crypto.dkim.aligned),
or ``dmarc=pass`` whose ``header.from`` equals the From domain.

authres raises on headers it cannot parse (Microsoft's, with no authserv-id, among
them); those are ignored and listed as such, never fatal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email import policy
from email.parser import BytesHeaderParser

import authres

from broker.crypto.dkim import aligned, safe

# More than this many Authentication-Results headers is not read further.
MAX_HEADERS = 32
_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class ARCheck:
    ok: bool
    authserv_id: str = ""  # the trusted id whose result passed, when ok
    seen: tuple[str, ...] = ()

    def describe(self) -> str:
        return "; ".join(self.seen) if self.seen else "no Authentication-Results"


def header_list(raw: bytes) -> list[tuple[str, str]]:
    """The message's header fields, top first, unfolded; empty if unreadable."""
    try:
        msg = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
        return [(str(k), _FOLD.sub("", str(v))) for k, v in msg.items()]
    except Exception:
        return []


def parse(value: str) -> authres.AuthenticationResultsHeader | None:
    """One header value parsed, or None when authres cannot read it (never raises)."""
    try:
        return authres.AuthenticationResultsHeader.parse_value(value)
    except Exception:
        return None


def _prop(result: object, type_: str, name: str) -> str:
    for p in getattr(result, "properties", None) or ():
        if p.type == type_ and p.name == name and p.value:
            return str(p.value)
    return ""


def _passes(header: authres.AuthenticationResultsHeader, from_domain: str) -> str | None:
    """What in this trusted header vouches for ``from_domain``, if anything."""
    f = from_domain.lower().rstrip(".")
    for r in header.results or ():
        method = str(getattr(r, "method", "") or "").lower()
        result = str(getattr(r, "result", "") or "").lower()
        if result != "pass":
            continue
        if method == "dkim":
            d = _prop(r, "header", "d") or _prop(r, "header", "i").rpartition("@")[2]
            if d and aligned(d, f):
                return f"dkim=pass header.d={safe(d)}"
        elif method == "dmarc":
            hf = _prop(r, "header", "from").lower().rstrip(".")
            if hf and hf == f:
                return f"dmarc=pass header.from={safe(hf)}"
    return None


def _summary(header: authres.AuthenticationResultsHeader) -> str:
    parts = []
    for r in (header.results or ())[:6]:
        method = safe(str(getattr(r, "method", "") or ""), 16)
        result = safe(str(getattr(r, "result", "") or ""), 16)
        if not method:
            continue
        d = _prop(r, "header", "d") or _prop(r, "header", "from")
        parts.append(f"{method}={result}" + (f" ({safe(d)})" if d else ""))
    return ", ".join(parts) or "none"


def check_authentication_results(
    headers: Sequence[tuple[str, str]], from_domain: str, trusted_ids: Iterable[str],
    *, mailbox: bool = False,
) -> ARCheck:
    """Apply the trust rule above to ``headers`` (top first); ok when a trusted header
    above the first Received says dkim=pass / dmarc=pass for ``from_domain``.

    ``mailbox``: the message was fetched from a mailbox (IMAP mode), delivered by the
    mailbox provider, which adds its own result below its own Received lines and removes
    incoming headers claiming its authserv-id (RFC 8601 section 5). Then only the topmost
    header with a trusted authserv-id counts, wherever it stands; any further one is
    ignored (it could have come from outside)."""
    trusted = {t.strip().lower() for t in trusted_ids if t.strip()}
    seen: list[str] = []
    above_received = True
    has_received = any(name.lower() == "received" for name, _ in headers)
    count = 0
    for name, value in headers:
        lname = name.lower()
        if lname == "received":
            above_received = False
            continue
        if lname != "authentication-results":
            continue
        count += 1
        if count > MAX_HEADERS:
            seen.append("authentication-results: further headers not read")
            break
        header = parse(value)
        if header is None or not header.authserv_id:
            seen.append("authentication-results: unparseable, ignored")
            continue
        sid = str(header.authserv_id).lower()
        label = f"authentication-results {safe(sid)} [{_summary(header)}]"
        if sid not in trusted:
            seen.append(f"{label}: untrusted authserv-id, ignored")
        elif mailbox:
            # The topmost header of the provider decides, pass or not.
            why = _passes(header, from_domain)
            seen.append(f"{label}: the mailbox provider's, "
                        + (why or f"no pass for {safe(from_domain)}"))
            return ARCheck(why is not None, sid if why is not None else "", tuple(seen))
        elif not has_received:
            seen.append(f"{label}: no Received header (not relayed by the operator's MTA), "
                        "ignored")
        elif not above_received:
            seen.append(f"{label}: below the first Received (arrived from outside), ignored")
        elif (why := _passes(header, from_domain)) is not None:
            seen.append(f"{label}: trusted, {why}")
            return ARCheck(True, sid, tuple(seen))
        else:
            seen.append(f"{label}: trusted, no pass for {safe(from_domain)}")
    return ARCheck(False, seen=tuple(seen))

