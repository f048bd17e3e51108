"""The `broker` command's entry point: `broker audit`'s listing straight away, the rest
through click (broker.cli.main).

A parent asks "who has seen Sam's records?" with `broker audit --child sam`, and a new
process spends most of its time starting: importing click alone is some 16 ms of a
budget of 100. So this module reads the listing's plain arguments itself - the options
of `broker audit` and nothing else - and prints the listing through broker.audit.listing,
the same code the click command prints with. Anything it does not take for certain (help,
a subcommand, an unknown or repeated option, a value click would refuse, an unknown
child, a home or database it cannot read that way) goes to click untouched, before
anything is printed: click then answers, or explains the error, exactly as it always has.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Sequence
from typing import Any

# The listing's options that take a value, and its flags (broker.cli.audit.audit).
VALUE_OPTIONS = ("--home", "--child", "--since", "--until", "--record", "--limit")
FLAGS = ("--all", "--json", "--csv")


def parse_listing(argv: Sequence[str]) -> dict[str, Any] | None:
    """`audit` and its listing options as `broker.cli.audit.audit` would take them:
    {home, child, since, until, record, show_all, as_json, as_csv, limit}; None for
    anything else, or anything click might read differently or refuse."""
    if not argv or argv[0] != "audit":
        return None
    seen: dict[str, str | bool] = {}
    rest = list(argv[1:])
    while rest:
        token = rest.pop(0)
        name, eq, value = token.partition("=")
        if name in VALUE_OPTIONS:
            if not eq:
                if not rest:
                    return None
                value = rest.pop(0)
            if not value or value.startswith("-"):
                return None  # click may read these another way: let it
        elif name in FLAGS and not eq:
            value = True  # type: ignore[assignment]
        else:
            return None  # help, a subcommand, an unknown option, "--"
        if name in seen:
            return None
        seen[name] = value
    try:
        got = {
            "home": seen.get("--home") or os.environ.get("BROKER_HOME") or None,
            "child": seen.get("--child"),
            "since": _day(seen.get("--since")),
            "until": _day(seen.get("--until")),
            "record": _number(seen.get("--record"), least=1),
            "limit": _number(seen.get("--limit"), least=0),
            "show_all": "--all" in seen, "as_json": "--json" in seen, "as_csv": "--csv" in seen,
        }
    except ValueError:
        return None
    if got["as_json"] and got["as_csv"]:
        return None
    if got["since"] and got["until"] and got["since"] > got["until"]:
        return None
    return got


def _day(value: str | bool | None) -> dt.date | None:
    return None if value is None else dt.date.fromisoformat(str(value).strip())


def _number(value: str | bool | None, least: int) -> int | None:
    if value is None:
        return None
    number = int(str(value))
    if number < least:
        raise ValueError(value)
    return number


def listing_fast(options: dict[str, Any]) -> bool:
    """Prints the listing and returns True; False, having printed nothing, wherever
    click's command should answer instead."""
    from broker import config
    from broker.audit import fastread, listing
    from broker.crypto import vault as vaults

    try:
        settings = config.load(config.resolve_home(options["home"]))
        vault = vaults.open_home_vault(settings.home, settings.database_url)
        want = listing.Listing(**{k: v for k, v in options.items() if k != "home"})
        items, total = listing.read_fast(settings, vault, want)
    except (config.ConfigError, vaults.VaultError, fastread.Unavailable,
            listing.UnknownChild, OSError):
        return False
    listing.print_listing(items, total, show_all=want.show_all, as_json=want.as_json,
                          as_csv=want.as_csv)
    return True


def main() -> None:
    options = parse_listing(sys.argv[1:])
    if options is not None and listing_fast(options):
        return
    from broker.cli.main import cli

    cli()
