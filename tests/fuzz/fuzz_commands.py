"""Hand-run fuzzer (atheris) for the reply command parser. Not collected by pytest.

Invariants checked on every input:
- parse_commands never raises;
- Approve only when some line is exactly APPROVE (ASCII, any case, surrounding whitespace,
  trailing '.' or '!'; a byte order mark may open the text);
- a reply with problems is never "ok".

Run: see tests/fuzz/README.md.
"""

from __future__ import annotations

import re
import sys

APPROVE_LINE = re.compile(r"approve[.!]*", re.IGNORECASE)


def check(text: str) -> None:
    from broker.review.commands import Approve, parse_commands

    result = parse_commands(text)
    if result.problems:
        assert not result.ok
    if Approve() in result.commands:
        lines = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
        assert any(x.strip().isascii() and APPROVE_LINE.fullmatch(x.strip()) for x in lines), repr(
            text
        )


def one_input(data: bytes) -> None:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    check(fdp.ConsumeUnicodeNoSurrogates(len(data)))


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        import broker.review.commands  # noqa: F401

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
