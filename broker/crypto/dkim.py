"""DKIM verification of guardians' replies (dkimpy), behind one cached key resolver.

Every DKIM key lookup goes through `dnsfunc`, which caches answers (positive and
negative) for CACHE_TTL seconds and asks dkimpy's own DNS lookup (dnspython) on a miss.
Tests give keys without network in one of two explicit ways:

- unit tests pass their own ``dnsfunc`` to `verify_dkim`;
- end-to-end tests, where the running service does the lookup, call
  `set_resolver(fn)` once (and `set_resolver(None)` after) - a module-level hook that
  replaces the DNS lookup behind the cache and clears the cache. Production code
  never calls it.

Alignment (`aligned`): a signature counts for a From domain when its ``d=`` is that
domain or a parent of it (From ``dana@mail.home.example`` is covered by
``d=home.example`` or ``d=mail.home.example``), and ``d=`` has at least two labels.
This is stricter than DMARC's relaxed alignment (which also accepts ``d=`` being a
*subdomain* of the From organisational domain) because finding the organisational
domain needs the Public Suffix List; with the parent-only rule a signer must control
DNS at or above the From domain, so no sibling under a shared suffix can align.

A signature is also refused when it does not cover the From header, or when it carries
an ``l=`` body length (content appended after the signed length would be unsigned).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import dkim as dkimpy

# name (b"sel._domainkey.example.org.") -> the TXT record's bytes, or None.
Resolver = Callable[[bytes], "bytes | None"]

CACHE_TTL = 600.0
CACHE_MAX = 1024
# A reply carries one or two signatures; more is not a reason to do more DNS lookups.
MAX_SIGNATURES = 8
DNS_TIMEOUT = 5
MIN_RSA_BITS = 1024

_lock = threading.Lock()
_cache: dict[bytes, tuple[float, bytes | None]] = {}
_resolver: Resolver | None = None


def set_resolver(fn: Resolver | None) -> None:
    """FOR TESTS: answer DKIM key lookups with ``fn(name)`` instead of DNS (None restores
    DNS). Clears the cache, so keys of an earlier test are never reused."""
    global _resolver
    with _lock:
        _resolver = fn
        _cache.clear()


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _dns_lookup(name: bytes, timeout: float) -> bytes | None:
    return dkimpy.get_txt(name, timeout=timeout)


def dnsfunc(name: bytes, timeout: float = DNS_TIMEOUT) -> bytes | None:
    """The one lookup of DKIM keys (dkimpy's ``dnsfunc`` interface), with a cache.

    Timeouts are not cached (dkimpy's DnsTimeoutError propagates and the signature
    counts as not verified); answers and "no such record" are.
    """
    key = name.lower()
    now = time.monotonic()
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        resolver = _resolver
    value = resolver(key) if resolver is not None else _dns_lookup(key, timeout)
    with _lock:
        if len(_cache) >= CACHE_MAX:
            _cache.clear()
        _cache[key] = (now + CACHE_TTL, value)
    return value


def _norm(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def aligned(signing_domain: str, from_domain: str) -> bool:
    """``d=`` is the From domain or a parent of it (and not a bare top-level label)."""
    d, f = _norm(signing_domain), _norm(from_domain)
    if not d or not f or "." not in d:
        return False
    return f == d or f.endswith("." + d)


_SAFE = re.compile(r"[^a-z0-9._-]")


def safe(text: str, limit: int = 80) -> str:
    """A sender-supplied token as it may appear in audit details and notices."""
    return _SAFE.sub("?", text.lower())[:limit]


@dataclass(frozen=True)
class DkimCheck:
    ok: bool
    domain: str = ""  # the aligned d= that verified, when ok
    seen: tuple[str, ...] = ()  # one line per signature: what was found and why it failed

    def describe(self) -> str:
        return "; ".join(self.seen) if self.seen else "no DKIM-Signature"


def verify_dkim(raw: bytes, from_domain: str, lookup: Callable | None = None) -> DkimCheck:
    """Verify each DKIM-Signature of ``raw`` (top first); ok when one verifies, covers
    From, has no l= and its d= is aligned with ``from_domain``. Never raises.

    ``lookup`` replaces the cached `dnsfunc` (unit tests); dkimpy calls it as
    ``lookup(name, timeout=...)``."""
    lookup = lookup or dnsfunc
    seen: list[str] = []
    try:
        count = len([1 for name, _ in dkimpy.DKIM(raw).headers
                     if name.lower() == b"dkim-signature"])
    except Exception as exc:  # malformed headers: nothing verifies
        return DkimCheck(False, seen=(f"dkim: message unreadable ({type(exc).__name__})",))
    for idx in range(min(count, MAX_SIGNATURES)):
        checker = dkimpy.DKIM(raw, minkey=MIN_RSA_BITS, timeout=DNS_TIMEOUT)
        try:
            good = checker.verify(idx=idx, dnsfunc=lookup)
        except dkimpy.DKIMException as exc:
            good, why = False, f"error ({type(exc).__name__})"
        except Exception as exc:  # dkimpy on hostile input; fail closed
            good, why = False, f"error ({type(exc).__name__})"
        else:
            why = "verified" if good else "signature did not verify"
        sig = checker.signature_fields or {}
        d = sig.get(b"d", b"").decode("ascii", "replace")
        s = sig.get(b"s", b"").decode("ascii", "replace")
        label = f"dkim d={safe(d)} s={safe(s)}"
        if not good:
            seen.append(f"{label}: {why}")
            continue
        headers = [h.lower() for h in getattr(checker, "include_headers", ())]
        if b"from" not in headers:
            seen.append(f"{label}: verified but does not sign From")
        elif b"l" in sig:
            seen.append(f"{label}: verified but has a body length limit (l=)")
        elif not aligned(d, from_domain):
            seen.append(f"{label}: verified but not aligned with From domain "
                        f"{safe(from_domain)}")
        else:
            seen.append(f"{label}: verified, aligned with {safe(from_domain)}")
            return DkimCheck(True, _norm(d), tuple(seen))
    if count > MAX_SIGNATURES:
        seen.append(f"dkim: {count - MAX_SIGNATURES} further signatures not checked")
    return DkimCheck(False, seen=tuple(seen))
