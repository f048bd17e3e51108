"""What the policy costs the pipeline: records per second through the whole pipeline (parse,
rules, consents, who decides, review request queued, all in the database), and the share
of that taken by the pure rules evaluation, measured in the same run.

    .venv/bin/python bench/policy.py [--records 400] [--rounds 3] [--consents 20]

A temporary home on SQLite (or --database-url), the shipped rules, a team of eight, and
--consents consents on file (only some of which cover the records). Each round spools the
records (not timed), drains them through `Pipeline.run_once` (timed) and separately runs
`evaluate` over the same documents (timed). Figures are medians of the rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker import config
from broker.consents.manage import active_for_child, add_consent
from broker.db.migrate import upgrade
from broker.db.models import Child, Person
from broker.intake.pipeline import Pipeline
from broker.intake.spool import Envelope
from broker.mail.parse import parse_message
from broker.policy.context import member, team_members
from broker.policy.evaluate import evaluate
from broker.runtime import Runtime
from broker.team.apply import apply_team
from broker.team.spec import parse_team

DOMAIN = "records.example"
TEAM = """
[child]
slug = "sam"
name = "Sam Rivera"
birthdate = "2013-05-01"
jurisdiction = "us-il"
approval = "all"

[[guardians]]
name = "Dana"
email = "dana@home.example"

[[guardians]]
name = "Chris"
email = "chris@home.example"

[student]
name = "Sam"
email = "sam@student.example"
""" + "".join(f"""
[[members]]
name = "{name}"
email = "{email}"
role = "{role}"
tags = [{tags}]
""" for name, email, role, tags in (
    ("Dr. Lee", "lee@clinic.example", "provider", '"ot"'),
    ("Dr. Kim", "kim@therapy.example", "provider", '"therapy"'),
    ("Mr Ortiz", "ortiz@school.example", "school", '"ot"'),
    ("Ms Park", "park@school.example", "school", '"case-manager"'),
    ("Mrs Jones", "jones@school.example", "school", '"teacher"'),
    ("Mr Ng", "ng@school.example", "school", '"counselor"'),
))

PARAGRAPH = ("Sam practised handwriting and scissor skills; fine motor progress is steady. "
             "We tried a weighted pencil and a slant board; call (312) 555-0147 with "
             "questions. ")


def message(i: int, size: int) -> bytes:
    body = "\n\n".join(PARAGRAPH * 3 for _ in range(max(1, size // (len(PARAGRAPH) * 3))))
    if i % 4 == 0:
        body += "\n\nSam's anxiety was lower this week."
    sender = "kim@therapy.example" if i % 5 == 0 else "lee@clinic.example"
    return (f"From: Provider <{sender}>\r\nTo: sam@{DOMAIN}\r\nSubject: Weekly note {i}\r\n"
            f"Message-ID: <bench{i}@clinic.example>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000"
            "\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            + body.replace("\n", "\r\n") + "\r\n").encode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--consents", type=int, default=20)
    ap.add_argument("--size", type=int, default=10_000, help="bytes of body per record")
    ap.add_argument("--database-url", default="")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        home = Path(tmp)
        (home / config.CONFIG_NAME).write_text(config.render_config(
            domain=DOMAIN, listen="127.0.0.1:0", relay="127.0.0.1:9", auth="token"))
        settings = config.load(home)
        if args.database_url:
            settings = config.Settings(**{**settings.__dict__,
                                          "database_url": args.database_url})
        upgrade(settings.database_url)
        rt = Runtime.open(settings)
        with rt.db.session() as s:
            apply_team(s, parse_team(TEAM))
            for n in range(args.consents):
                add_consent(s, rt, child_slug="sam", disclosers=["lee@clinic.example"],
                            recipients=["tag:ot" if n % 2 else "park@school.example"],
                            categories=["ot_progress"] if n % 3 else ["speech_progress"],
                            purpose=f"bench {n}", valid_until=dt.date(2027, 11, 1),
                            signed_by=["dana@home.example", "chris@home.example"])
        pipeline = Pipeline(rt)
        datas = [message(i, args.size) for i in range(args.records)]
        docs = [parse_message(d) for d in datas]
        pipe_rates: list[float] = []
        eval_ms: list[float] = []
        for _ in range(args.rounds):
            for d in datas:
                rt.spool.store(d, Envelope.for_message(
                    d, mail_from="lee@clinic.example", rcpt_tos=[f"sam@{DOMAIN}"],
                    peer="127.0.0.1:1", helo="bench"))
            t0 = time.perf_counter()
            done = 0
            while done < len(datas):
                got = pipeline.run_once(limit=100)
                if not got:
                    pipeline._last_scan = float("-inf")  # look at the spool again now
                done += got
            pipe_rates.append(len(datas) / (time.perf_counter() - t0))

            with rt.db.read_session() as s:
                child = s.query(Child).one()
                people = list(s.query(Person).filter(Person.child_id == child.id))
                members = team_members(people)
                senders = {p.email: member(p) for p in people if p.role == "provider"}
                consents = active_for_child(s, child.id, dt.date(2026, 11, 23))
                jurisdiction = child.jurisdiction
            t0 = time.perf_counter()
            for doc in docs:
                evaluate(rt.rules, jurisdiction=jurisdiction,
                         sender=senders.get(doc.sender, senders["lee@clinic.example"]),
                         members=members, subject=doc.subject,
                         paragraphs=[p.text for p in doc.paragraphs], attachment_names=[],
                         consents=consents, day=dt.date(2026, 11, 23))
            eval_ms.append((time.perf_counter() - t0) * 1000 / len(docs))
        rt.close()

    rate = statistics.median(pipe_rates)
    ev = statistics.median(eval_ms)
    per = 1000 / rate
    print(f"records: {args.records} x {args.rounds} rounds, ~{args.size} B body, "
          f"{args.consents} consents on file, "
          f"{'SQLite' if not args.database_url else args.database_url.split(':')[0]}")
    print(f"pipeline (parse, rules, consents, who decides, review request queued): "
          f"{rate:.0f} records/s, {per:.1f} ms/record (rounds: "
          f"{', '.join(f'{r:.0f}' for r in pipe_rates)})")
    print(f"rules evaluation alone (classify, route, patterns, consent coverage): "
          f"{ev:.2f} ms/record = {ev / per:.1%} of the pipeline's time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
