"""The email policy for the broker's own outgoing mail: header objects made, and written
out, once per text.

The stdlib's ``policy.SMTP`` parses a header value into an object each time one is set
and each time one is read back from a parsed message: the generator asks a part for its
Content-Type some twenty times while writing it out. For composing and signing a review
request that was the largest single cost (about 40% of ``compose`` plus PGP/MIME
signing, 3.6 ms -> 2.1 ms per message with this policy). Header objects are immutable
strings with their parse, so one object can serve every message that carries the same
text: the broker's own From, Content-Type and Auto-Submitted repeat on every message it
sends, and within one message each read is the same text again.

Writing a header object out (folding it to lines) walks its parse again every time; the
folded bytes are kept on the object too, per folding setting, since the object never
changes. Raw header strings (those of a parsed message) are written as the stdlib writes
them: they are not folded again unless too long.

Only short values are kept (a subject or an address list, not a long References chain),
and at most ``CACHE_SIZE`` of them, so the memory held is small and bounded whatever
senders write into subjects.
"""

from __future__ import annotations

import functools
from email import policy
from email.headerregistry import BaseHeader, HeaderRegistry
from email.policy import EmailPolicy
from typing import Any

CACHE_SIZE = 1024
CACHE_LONGEST = 256  # characters of a value kept
CACHE_NAMES = 256  # header names whose class is kept


class CachedHeaderRegistry(HeaderRegistry):
    """The stdlib registry, answering repeated (name, value) pairs from a bounded cache
    of its own answers (so a class mapped on this registry is what the cache holds).

    The stdlib also makes a new header class (``type(...)``) on every lookup of a name,
    about 15 us each, some 70 times per released copy; the class made for a name is
    kept too (bounded: a parsed message's names are whatever its sender wrote)."""

    def __init__(self) -> None:
        super().__init__()
        self.cached = functools.lru_cache(maxsize=CACHE_SIZE)(super().__call__)
        self._class_for = functools.lru_cache(maxsize=CACHE_NAMES)(super().__getitem__)

    def __getitem__(self, name: str) -> type[BaseHeader]:
        return self._class_for(name.lower())

    def map_to_type(self, name: str, cls: type[BaseHeader]) -> None:
        super().map_to_type(name, cls)
        self._class_for.cache_clear()  # objects and classes made before the new mapping
        self.cached.cache_clear()

    def __call__(self, name: str, value: str) -> BaseHeader:
        if type(value) is str and len(value) <= CACHE_LONGEST:
            return self.cached(name, value)
        return super().__call__(name, value)


_FOLDED = "_broker_folded"  # on a header object: {folding settings: bytes}


class CachedFoldPolicy(EmailPolicy):
    """EmailPolicy whose header objects are folded once per folding setting."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        if not hasattr(value, "name"):  # a raw string, as a parsed message holds them
            return super().fold_binary(name, value)
        key = (name, self.max_line_length, self.linesep, self.utf8, self.cte_type)
        folded = value.__dict__.setdefault(_FOLDED, {})
        out = folded.get(key)
        if out is None:
            out = folded[key] = super().fold_binary(name, value)
        return out


# ``policy.SMTP`` (CRLF line ends) with the cached registry and folding: the same bytes,
# made faster.
SMTP = CachedFoldPolicy(**{**policy.SMTP.__dict__, "header_factory": CachedHeaderRegistry()})

# ``policy.default`` with a cached registry of its own, for reading mail that arrives. A
# parsed message keeps raw strings and makes a header object on every read: the parser
# itself, the reply reader and the automatic-mail checks ask each part for its
# Content-Type some ten times, and each ask parsed it again (a fifth of the pipeline's
# time on a parent's reply). The cache holds only short values, and only what a
# sender wrote: a header object is the same text with its parse, so one made for one
# message is the same answer for any other with that text.
INBOUND = policy.default.clone(header_factory=CachedHeaderRegistry())
