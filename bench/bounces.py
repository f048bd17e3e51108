"""How well broker.release.bounces reads real bounces: the sisimai set-of-emails corpus.

    .venv/bin/python bench/bounces.py [--corpus DIR] [--verbose]

For every message listed in EXPECTED.json: does it parse, and for every expected
delivery-failure record (by index): is there a recipient, is its status the expected
RFC 3463 code, and does our hard call agree with sisimai's "hardbounce"? Auto-replies,
feedback reports and non-bounces count as right when nothing is reported as a failure.

Note on hard/soft: the broker calls a bounce hard when the copy will not arrive (Action
failed + 5.x.x), so a parent is told; sisimai's "hardbounce" means the *address* is bad
(user unknown, host unknown, moved). A full mailbox or a spam refusal with 5.x.x is hard
here and soft there; the "address" line compares our address-problem calls (5.1.x,
5.4.4, 5.4.1 hard) with sisimai's verdict instead.
"""

from __future__ import annotations

import argparse
import email
import json
import mailbox
import sys
from dataclasses import dataclass, field
from email import policy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.release.bounces import Bounce, RecipientStatus, parse_bounce  # noqa: E402

CORPUS = ROOT.parent / "shared/corpus/bounces/sisimai-set-of-emails"
NOT_BOUNCES = {"vacation": "autoreply", "feedback": "feedback"}


def address_problem(r: RecipientStatus) -> bool:
    """The address itself is bad (sisimai's hardbounce): user/host unknown, moved."""
    return r.outcome == "hard" and (
        r.status.startswith("5.1.") or r.status in ("5.4.4", "5.4.1")
        or r.reason in ("mailbox does not exist", "address's mail server not found"))


@dataclass
class Score:
    messages: int = 0
    parsed: int = 0
    records: int = 0
    recipients: int = 0
    statuses: int = 0
    hard: int = 0
    address: int = 0
    non_bounces: int = 0
    non_bounces_right: int = 0
    misses: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        n = self.records
        return [
            f"messages parsed:  {self.parsed}/{self.messages}",
            f"recipients:       {self.recipients}/{n}",
            f"statuses:         {self.statuses}/{n}",
            f"hard/soft:        {self.hard}/{n}  (broker rule: failed + 5.x.x = hard)",
            f"address bad:      {self.address}/{n}  (vs sisimai's hardbounce)",
            f"not bounces:      {self.non_bounces_right}/{self.non_bounces}"
            "  (auto-replies, feedback, plain mail: nothing reported)",
        ]


def read(path: Path) -> Bounce:
    """One file; an mbox of several bounces (a "From " line first) is read as one."""
    data = path.read_bytes()
    if data.startswith(b"From "):
        box = mailbox.mbox(str(path), factory=None, create=False)
        raws = [box.get_bytes(key) for key in box.iterkeys()]
    else:
        raws = [data]
    found = []
    for raw in raws:
        msg = email.message_from_bytes(raw, policy=policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        found.append(parse_bounce(msg, ""))
    first = found[0]
    return Bounce(first.kind, first.source, tuple(r for b in found for r in b.recipients),
                  tuple(i for b in found for i in b.message_ids))


def score(corpus: Path = CORPUS) -> Score:
    expected = json.loads((corpus / "EXPECTED.json").read_text())["files"]
    sc = Score()
    for name, entry in sorted(expected.items()):
        sc.messages += 1
        try:
            bounce = read(corpus / name)
        except Exception as exc:  # the bench counts, never stops
            sc.misses.append(f"{name}: does not parse ({type(exc).__name__})")
            continue
        results = entry["results"]
        reasons = {r["reason"] for r in results}
        if not results or reasons <= set(NOT_BOUNCES):
            sc.parsed += 1
            sc.non_bounces += 1
            want = NOT_BOUNCES.get(next(iter(reasons), ""), "")
            if not bounce.failures and (not want or bounce.kind == want):
                sc.non_bounces_right += 1
            else:
                sc.misses.append(f"{name}: want {want or 'no bounce'}, got {bounce.kind} "
                                 f"{[r.status for r in bounce.failures]}")
            continue
        if bounce.recipients:
            sc.parsed += 1
        for want in results:
            sc.records += 1
            i = want["index"] - 1
            if i >= len(bounce.recipients):
                sc.misses.append(f"{name}#{i + 1}: no recipient (kind {bounce.kind})")
                continue
            got = bounce.recipients[i]
            sc.recipients += 1
            if got.status == want["status"]:
                sc.statuses += 1
            else:
                sc.misses.append(f"{name}#{i + 1}: status {got.status!r}, want "
                                 f"{want['status']!r} ({want['reason']})")
            if (got.outcome == "hard") == want["hardbounce"]:
                sc.hard += 1
            else:
                sc.misses.append(f"{name}#{i + 1}: {got.outcome} ({got.status}, {got.reason})"
                                 f", sisimai hardbounce={want['hardbounce']} "
                                 f"({want['reason']})")
            if address_problem(got) == want["hardbounce"]:
                sc.address += 1
        if len(bounce.recipients) > len(results):
            sc.misses.append(f"{name}: {len(bounce.recipients) - len(results)} extra "
                             "recipient(s)")
    return sc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args()
    if not (args.corpus / "EXPECTED.json").is_file():
        print(f"no corpus at {args.corpus}", file=sys.stderr)
        return 2
    sc = score(args.corpus)
    print("\n".join(sc.lines()))
    if args.verbose:
        print("\nmisses:" if sc.misses else "\nno misses")
        for miss in sc.misses:
            print("  " + miss)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
