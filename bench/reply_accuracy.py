"""Print reply-extraction accuracy on the shared corpus, so the figures can be quoted.

Usage (from the repository root)::

    .venv/bin/python bench/reply_accuracy.py [--verbose] [--corpus PATH]

The corpus defaults to ``../shared/corpus`` next to the repository. The rules
are those of ``shared/corpus/README.md``: Discourse pairs compare the stripped
texts exactly; talon's standard replies compare exactly against ``Hello`` or
the ``*_reply_text`` file; talon's HTML replies compare with all whitespace
removed.
"""

from __future__ import annotations

import argparse
import email
import json
import re
import sys
from email import policy
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.mail.reply import (
    extract_reply,
    extract_reply_from_html,
    extract_reply_from_message,
)

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def discourse(corpus: Path) -> list[tuple[str, bool, str, str]]:
    """(name, ok, got, expected) for every Discourse pair."""
    root = corpus / "replies" / "discourse-email_reply_trimmer"
    rows = []
    for src in sorted((root / "emails").glob("*.txt")):
        expected = _read_text(root / "trimmed" / src.name).strip()
        got = extract_reply(_read_text(src).strip()).strip()
        rows.append((src.stem, got == expected, got, expected))
    return rows


def talon_standard(corpus: Path) -> list[tuple[str, bool, str, str]]:
    """(name, ok, got, expected) for talon's full client messages."""
    root = corpus / "replies" / "mailgun-talon"
    spec = json.loads((root / "EXPECTED.json").read_bytes())["standard_replies"]["files"]
    rows = []
    for name, facts in sorted(spec.items()):
        data = (root / "standard_replies" / name).read_bytes()
        msg = email.message_from_bytes(data, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        expected = facts["expected_reply"].strip()
        got = extract_reply_from_message(msg).text
        rows.append((Path(name).stem, got == expected, got, expected))
    return rows


def talon_html(corpus: Path) -> list[tuple[str, bool, str, str]]:
    """(name, ok, got, expected) for talon's HTML bodies, whitespace-insensitive."""
    root = corpus / "replies" / "mailgun-talon"
    spec = json.loads((root / "EXPECTED.json").read_bytes())["html_replies"]["files"]
    rows = []
    for name, facts in sorted(spec.items()):
        html = (root / "html_replies" / name).read_bytes().decode("utf-8", errors="replace")
        got = extract_reply_from_html(html)
        expected = facts["expected_reply_text"]
        ok = re.sub(r"\s+", "", got) == re.sub(r"\s+", "", expected)
        rows.append((Path(name).stem, ok, got, expected))
    return rows


def main() -> int:
    """Print one line per suite, and the failures with --verbose."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--verbose", "-v", action="store_true", help="show failing cases")
    args = parser.parse_args()
    if not (args.corpus / "replies").is_dir():
        print(f"corpus not found at {args.corpus}", file=sys.stderr)
        return 2
    suites = (
        ("discourse", "exact", discourse(args.corpus)),
        ("talon standard", "exact", talon_standard(args.corpus)),
        ("talon html", "whitespace-insensitive", talon_html(args.corpus)),
    )
    for title, rule, rows in suites:
        passed = sum(ok for _, ok, _, _ in rows)
        failed = [name for name, ok, _, _ in rows if not ok]
        print(f"{title}: {passed}/{len(rows)} {rule}" + (f"  failing: {failed}" if failed else ""))
        if args.verbose:
            for name, ok, got, expected in rows:
                if not ok:
                    print(f"--- {name}\n  expected: {expected!r}\n  got:      {got!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
