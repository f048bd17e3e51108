"""Finding the signed part of a multipart/signed message: the delimiter search gives what
the regular expression it replaced gave, on any bytes (untrusted mail goes through it)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.crypto.pgpmime import _after_first_delimiter

DELIM = b"--===b0undary=="
pieces = st.sampled_from([DELIM, b"--", b"=", b"b0undary", b"\r\n", b"\n", b"\r", b" ", b"\t",
                          b"x", b"--===b0undary==--"])


def _by_regex(raw: bytes, delim: bytes) -> int:
    m = re.search(rb"(?:^|\r\n)" + re.escape(delim) + rb"[ \t]*\r\n", raw)
    return m.end() if m else -1


@settings(max_examples=2000, deadline=None)
@given(st.lists(pieces, max_size=14).map(b"".join))
def test_the_delimiter_search_matches_the_regular_expression(raw: bytes) -> None:
    assert _after_first_delimiter(raw, DELIM) == _by_regex(raw, DELIM)


def test_examples() -> None:
    assert _after_first_delimiter(DELIM + b"\r\nbody", DELIM) == len(DELIM) + 2
    assert _after_first_delimiter(b"pre" + DELIM + b"\r\n", DELIM) == -1  # not at a line start
    assert _after_first_delimiter(b"a\r\n" + DELIM + b" \t\r\nb", DELIM) == 3 + len(DELIM) + 4
    assert _after_first_delimiter(DELIM + b"x\r\n" + b"\r\n" + DELIM + b"\r\n", DELIM) \
        == 2 * len(DELIM) + 7
