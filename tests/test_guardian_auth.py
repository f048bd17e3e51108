"""Story: the operator runs the broker in token mode, but Dana's team entry says
`authentication = "dkim"` -> her unsigned APPROVE releases nothing; a guardian can
raise the bar for replies in their name, never lower it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.review.authenticate import effective_mode
from broker.team.spec import TeamFileError, parse_team
from tests.harness import DOMAIN, TEAM, World, reply_to, report

STRICT_TEAM = TEAM.replace('email = "dana@home.example"\n',
                           'email = "dana@home.example"\nauthentication = "dkim"\n')


@pytest.mark.parametrize(("configured", "guardian", "effective"), [
    ("token", None, "token"),
    ("token", "dkim", "dkim"),
    ("dkim", "token", "dkim"),  # never lowered
    ("dkim", "pgp", "pgp"),
    ("pgp", "dkim", "pgp"),
])
def test_the_stricter_mode_wins(configured: str, guardian: str | None, effective: str) -> None:
    assert effective_mode(configured, guardian) == effective


def test_team_file_checks_the_guardian_mode() -> None:
    assert parse_team(STRICT_TEAM).guardians[0].authentication == "dkim"
    with pytest.raises(TeamFileError, match="authentication must be one of"):
        parse_team(STRICT_TEAM.replace('"dkim"', '"password"'))
    with pytest.raises(TeamFileError, match="needs a pgp_key"):
        parse_team(STRICT_TEAM.replace('"dkim"', '"pgp"'))


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url, team=STRICT_TEAM).start()
    yield w
    w.stop()


def test_unsigned_approve_from_a_strict_guardian_releases_nothing(world: World) -> None:
    assert world.settings.reply_auth == "token"
    world.send(report(), "lee@clinic.example", f"sam@{DOMAIN}")
    review = world.wait_for(lambda m: "Review needed" in str(m.msg["Subject"]))[0]
    world.send(reply_to(review, "APPROVE"), "dana@home.example", str(review.msg["Reply-To"]))
    refused = world.wait_for(lambda m: m.rcpt_tos == ["dana@home.example"]
                             and "Reply refused" in str(m.msg["Subject"]))[0]
    assert "DKIM" in refused.text() or "signature" in refused.text().lower()
    world.settle(0.5)
    assert world.to("park@school.example") == [] and world.to("ortiz@school.example") == []
    assert world.record().state == "awaiting_review"
