"""The README's first command: `broker demo` runs the whole round trip on loopback and
checks itself (the redacted paragraph never reaches the school; the teacher, whom the
rules do not route OT notes to, gets nothing; the audit chain verifies)."""

from __future__ import annotations

from click.testing import CliRunner

from broker.cli.main import cli


def test_demo_round_trip_succeeds() -> None:
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Held because:" in out and "sender tag ot -> category ot_progress" in out
    assert "6. Ms Park (school) receives exactly what was approved" in out
    assert "Mr Jones (teacher) received nothing" in out
    assert "audit chain: OK" in out
