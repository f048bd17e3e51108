"""Intake bursts: while mail arrives faster than the pipeline could ever follow, the
pipeline waits (a bounded time) and the intake has the machine; nothing is lost, and the
pipeline takes everything in once the burst ends or outlasts ``burst_wait``."""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Iterator
from email import policy
from pathlib import Path

import pytest

from broker import config
from broker.intake.burst import BurstDeferral
from tests.harness import DOMAIN, World, report


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the rule


def test_a_burst_is_the_last_rate_x_window_arrivals_within_the_window() -> None:
    clock = Clock()
    burst = BurstDeferral(rate=100, longest=5, window=0.2, clock=clock)
    assert burst.count == 20
    for _ in range(19):
        burst.arrived()
        clock.now += 0.001
    assert not burst.defer(), "19 arrivals are not yet 100/s over 0.2 s"
    burst.arrived()
    assert burst.defer()
    clock.now += 0.25  # quiet for longer than the window
    assert not burst.defer()


def test_a_steady_trickle_below_the_rate_never_defers() -> None:
    clock = Clock()
    burst = BurstDeferral(rate=100, longest=5, window=0.2, clock=clock)
    for _ in range(500):  # 50 a second for 10 s
        burst.arrived()
        assert not burst.defer()
        clock.now += 0.02


def test_one_burst_defers_at_most_longest_then_not_again_until_quiet() -> None:
    clock = Clock()
    burst = BurstDeferral(rate=100, longest=2, window=0.2, clock=clock)
    deferred: list[bool] = []
    for _ in range(1000):  # 1,000 a second for a second, then on: a flood
        burst.arrived()
        deferred.append(burst.defer())
        clock.now += 0.001
    assert deferred[20:] == [True] * 980
    for _ in range(1500):  # the flood goes on: 2.5 s since it began
        burst.arrived()
        deferred.append(burst.defer())
        clock.now += 0.001
    # The burst began with arrival 20 (0.019 s in): deferred until 2.019 s, not after.
    assert all(deferred[19:2010]) and not any(deferred[2030:]), "deferred 2 s, no longer"
    clock.now += 0.3  # quiet; then a new burst defers again
    for _ in range(20):
        burst.arrived()
    assert burst.defer()


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        BurstDeferral(rate=0, longest=5)
    with pytest.raises(ValueError):
        BurstDeferral(rate=100, longest=0)


# --------------------------------------------------------------------------- settings


def _written_settings(tmp_path: Path) -> config.Settings:
    """What `broker init` writes, loaded back."""
    text = config.render_config(domain=DOMAIN, listen="127.0.0.1:0", relay="127.0.0.1:25",
                                auth="token")
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / config.CONFIG_NAME).write_text(text)
    return config.load(home)


def test_the_written_config_has_the_defaults_and_zero_turns_it_off(tmp_path: Path) -> None:
    written = _written_settings(tmp_path)
    assert (written.burst_rate, written.burst_wait) == (200.0, 5.0)
    text = (tmp_path / "home" / config.CONFIG_NAME).read_text()
    assert "burst_rate = 200" in text and "burst_wait = 5" in text
    off = config.from_mapping(tmp_path, {"domain": DOMAIN, "smtp": {"burst_rate": 0}})
    assert off.burst_rate == 0


@pytest.mark.parametrize("smtp, message", [
    ({"burst_rate": -1}, "smtp.burst_rate must be >= 0"),
    ({"burst_wait": 0}, "smtp.burst_wait must be a positive number"),
    ({"burst_rate": "fast"}, "smtp.burst_rate must be float"),
])
def test_bad_burst_settings_are_named(tmp_path: Path, smtp: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.from_mapping(tmp_path, {"domain": DOMAIN, "smtp": smtp})


# --------------------------------------------------------------------------- the story


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url, burst_rate=5.0, burst_wait=30.0).start()
    yield w
    w.stop()


def _flood(world: World, count: int, pause: float, sent: list[str]) -> None:
    """``count`` reports over one session, ``pause`` seconds apart."""
    with smtplib.SMTP("127.0.0.1", world.port, timeout=30) as smtp:
        for n in range(count):
            subject = f"burst report {n + 1}"
            data = report(subject=subject).as_bytes(policy=policy.SMTP)
            smtp.sendmail("lee@clinic.example", [f"sam@{DOMAIN}"], data)
            sent.append(subject)
            time.sleep(pause)


def test_reports_in_a_burst_wait_in_the_spool_and_are_all_taken_in_after(
        world: World) -> None:
    """Provider's system sends a burst -> every report gets its 250 -> while the burst
    lasts no record is made -> the burst ends -> every report is a record, one review
    request each."""
    assert world.service is not None and world.service.burst is not None
    # The configured values reach the service: 5 a second over 0.2 s is one arrival.
    assert (world.service.burst.count, world.service.burst.longest) == (1, 30.0)
    # Any arrival within a second is a burst: a wide window, so a slow machine's pause
    # between two sends does not end it.
    world.service.burst = BurstDeferral(rate=1, longest=30, window=1.0)
    sent: list[str] = []
    sender = threading.Thread(target=_flood, args=(world, 12, 0.05, sent))
    sender.start()
    seen_during: list[int] = []
    while sender.is_alive():
        seen_during.append(len(world.records()))
        time.sleep(0.1)
    sender.join()
    assert len(sent) == 12
    # At most the first: the pipeline's periodic look at the spool may find it between
    # its store and its announcement.
    assert max(seen_during) <= 1, "records were made while the burst lasted"
    assert world.service.rt.spool.pending(), "the burst's mail waits in the spool"
    deadline = time.monotonic() + 30
    while len(world.records()) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(r.subject for r in world.records()) == sorted(sent)
    world.wait_for(lambda m: "Review needed" in str(m.msg.get("Subject", "")),
                   count=len(sent), timeout=30)


def test_a_burst_longer_than_burst_wait_does_not_hold_the_pipeline(world: World) -> None:
    assert world.service is not None
    world.service.burst = BurstDeferral(rate=1, longest=0.5, window=1.0)
    sent: list[str] = []
    sender = threading.Thread(target=_flood, args=(world, 16, 0.15, sent))
    sender.start()
    taken_during = 0
    while sender.is_alive():
        taken_during = max(taken_during, len(world.records()))
        time.sleep(0.1)
    sender.join()
    assert taken_during > 0, "the pipeline waited past burst_wait"
    deadline = time.monotonic() + 30
    while len(world.records()) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(world.records()) == len(sent)


def test_burst_rate_zero_never_defers(tmp_path: Path, db_url: str) -> None:
    w = World(tmp_path / "home", db_url, burst_rate=0.0).start()
    try:
        assert w.service is not None and w.service.burst is None
        w.send(report(subject="one report"), "lee@clinic.example", f"sam@{DOMAIN}")
        w.wait_state("awaiting_review")
    finally:
        w.stop()


def test_the_pipeline_starts_when_the_burst_ends_not_at_its_next_idle_poll(
        tmp_path: Path, db_url: str) -> None:
    w = World(tmp_path / "home", db_url, poll=30.0, burst_rate=5.0).start()
    try:
        assert w.service is not None
        w.service.burst = BurstDeferral(rate=1, longest=30, window=0.5)
        sent: list[str] = []
        _flood(w, 6, 0.05, sent)
        ended = time.monotonic()
        while len(w.records()) < len(sent) and time.monotonic() - ended < 20:
            time.sleep(0.05)
        took = time.monotonic() - ended
        assert len(w.records()) == len(sent)
        assert took < 10, f"taken in {took:.1f} s after the burst: it waited for the poll"
    finally:
        w.stop()
