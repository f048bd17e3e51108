"""`broker key ...`: the broker's keys."""

from __future__ import annotations

import click

from broker import config


@click.group()
def key() -> None:
    """The broker's keys: its OpenPGP key pair (and the content key)."""


def _home(home: str | None):
    try:
        settings = config.load(config.resolve_home(home))
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    return settings


@key.command("export")
@click.option("--home", envvar="BROKER_HOME", type=click.Path(file_okay=False),
              help="The broker's home directory (or set BROKER_HOME).")
def export(home: str | None) -> None:
    """Print the broker's OpenPGP public key (give it to the team)."""
    from broker.crypto.keys import KeyFileError, broker_public_key

    settings = _home(home)
    try:
        click.echo(broker_public_key(settings.home), nl=False)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from exc


@key.command("init")
@click.option("--home", envvar="BROKER_HOME", type=click.Path(file_okay=False),
              help="The broker's home directory (or set BROKER_HOME).")
def init_pgp(home: str | None) -> None:
    """Create the broker's OpenPGP key pair in a home made before keys existed."""
    from broker.crypto import pgp
    from broker.crypto.keys import KeyFileError, create_broker_key

    settings = _home(home)
    try:
        private, public = create_broker_key(settings.home, settings.domain)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created {private} (mode 0600) and {public}")
    click.echo(f"fingerprint: {pgp.fingerprint(public.read_text(encoding='ascii'))}")
    click.echo("`broker key export` prints the public key for the team")


# -- the content key (encryption at rest, broker.crypto.vault) ---------------------------------

home_opt = click.option("--home", envvar="BROKER_HOME", type=click.Path(file_okay=False),
                        help="The broker's home directory (or set BROKER_HOME).")


@key.command("status")
@home_opt
def content_status(home: str | None) -> None:
    """Show the content keys and how much is sealed under each."""
    from broker.content import rekey
    from broker.crypto import vault as vaults
    from broker.db.engine import Database

    settings = _home(home)
    try:
        vault = vaults.load_vault(settings.home)
    except vaults.VaultError as exc:
        raise click.ClickException(str(exc)) from exc
    db = Database(settings.database_url)
    try:
        counts = rekey.count(settings, vault, db)
    finally:
        db.dispose()
    click.echo(f"content keys from {vault.source}:")
    for k in vault.keys:
        mark = "current (seals)" if k is vault.current else "opens only"
        click.echo(f"  {k.hex_id}  {k.created or '-':20}  {mark}")
    known = {k.hex_id for k in vault.keys}
    click.echo("sealed under each key (content files / spool files / database fields):")
    for kid in sorted(counts.total(), key=lambda x: (x not in known, x)):
        label = kid if kid in known or kid == rekey.PLAINTEXT else f"{kid} (NOT IN KEYRING)"
        click.echo(f"  {label}: {counts.content[kid]} / {counts.spool[kid]} / "
                   f"{counts.database[kid]}")
    stale = {k for k, n in counts.total().items() if n and k != vault.current.hex_id}
    if stale:
        click.echo("`broker key rotate` (or --reseal-only) re-seals these under the current key")


@key.command("rotate")
@home_opt
@click.option("--drop-old", is_flag=True,
              help="Forget the old keys afterwards (backups made before cannot be opened).")
@click.option("--reseal-only", is_flag=True,
              help="Add no key: re-seal everything under the newest key already there "
                   "(e.g. after adding one to BROKER_CONTENT_KEY).")
def content_rotate(home: str | None, drop_old: bool, reseal_only: bool) -> None:
    """Make a new content key current and re-seal all stored content under it.

    Stop the broker first. Nothing is lost at any point: the new key is saved before
    anything is re-sealed, and each file is written anew and synced before it replaces
    the old one. Old keys are kept unless --drop-old.
    """
    from broker.content import rekey
    from broker.crypto import vault as vaults

    settings = _home(home)
    try:
        if reseal_only:
            vault = vaults.load_vault(settings.home)
            result = rekey.reseal(settings, vault)
            if drop_old:
                result.dropped = rekey.drop_old_keys(settings, vault, result)
        else:
            result = rekey.rotate(settings, drop_old=drop_old, progress=click.echo)
    except vaults.VaultError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"re-sealed under {result.new_key}: {result.content} content file(s), "
               f"{result.spool} spool file(s), {result.database} database field(s)")
    for err in result.errors:
        click.echo(f"  not re-sealed: {err}", err=True)
    if result.dropped:
        click.echo(f"dropped old key(s): {', '.join(result.dropped)}")
    elif not reseal_only:
        click.echo("old keys kept (they open backups made before); --drop-old forgets them")
    if result.errors:
        raise click.ClickException(f"{len(result.errors)} item(s) could not be re-sealed; "
                                   "they stay under their old key")
