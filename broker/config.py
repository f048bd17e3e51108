"""Settings from <home>/broker.toml, with a few environment overrides.

The file is written once by `broker init` and meant to be read by a person: every
setting has a comment there. Environment variables win so tests and containers can
point the same home at another database (BROKER_DATABASE_URL).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "broker.toml"
AUTH_MODES = ("token", "dkim", "pgp")
SMTP_PROTOCOLS = ("smtp", "lmtp")


class ConfigError(Exception):
    """broker.toml is missing or wrong; the message says which setting and why."""


RELAY_TLS_MODES = ("none", "starttls", "implicit")


@dataclass(frozen=True)
class RelaySettings:
    """[relay]: the submission server outbound copies are handed to.

    tls: "none", "starttls" (plain connect, STARTTLS before anything else) or "implicit"
    (TLS from the first byte, usually port 465). `starttls = True` is the older spelling
    of tls = "starttls". verify checks the relay's certificate chain and host name;
    ca_file is a PEM bundle trusted instead of the system's CAs. AUTH (PLAIN/LOGIN) when
    username is set, over TLS only unless allow_plaintext_auth."""

    host: str = "127.0.0.1"
    port: int = 25
    starttls: bool = False
    username: str = ""
    password: str = field(default="", repr=False)
    timeout: float = 30.0
    tls: str = "none"
    verify: bool = True
    ca_file: str = ""
    allow_plaintext_auth: bool = False

    def __post_init__(self) -> None:
        if self.tls not in RELAY_TLS_MODES:
            raise ConfigError(f"relay.tls must be one of {', '.join(RELAY_TLS_MODES)}, "
                              f"got {self.tls!r}")
        if self.starttls and self.tls == "none":
            object.__setattr__(self, "tls", "starttls")


def _relay(section: object, home: Path, source: str) -> RelaySettings:
    """[relay], with BROKER_RELAY_PASSWORD winning over password and password_file."""
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [relay] must be a table")
    kinds: dict[str, type | tuple[type, ...]] = {
        "host": str, "port": int, "starttls": bool, "tls": str, "verify": bool,
        "ca_file": str, "username": str, "password": str, "password_file": str,
        "allow_plaintext_auth": bool, "timeout": (int, float),
    }
    for key, value in section.items():
        kind = kinds.get(key)
        if kind is None:
            raise ConfigError(f"{source}: relay.{key} is not a relay setting "
                              f"(known: {', '.join(kinds)})")
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            name = kind.__name__ if isinstance(kind, type) else "a number"
            raise ConfigError(f"{source}: relay.{key} must be {name}, got {value!r}")
    tls = section.get("tls")
    starttls = section.get("starttls", False)
    if tls is None:
        tls = "starttls" if starttls else "none"
    elif tls not in RELAY_TLS_MODES:
        raise ConfigError(f"{source}: relay.tls must be one of "
                          f"{', '.join(repr(m) for m in RELAY_TLS_MODES)}, got {tls!r}")
    elif starttls and tls != "starttls":
        raise ConfigError(f"{source}: relay.starttls = true contradicts relay.tls = {tls!r}; "
                          "drop starttls (tls replaces it)")
    ca_file = section.get("ca_file", "")
    if ca_file:
        ca_path = (home / Path(ca_file).expanduser()).resolve()
        if not ca_path.is_file():
            raise ConfigError(f"{source}: relay.ca_file {ca_path} is not a file")
        ca_file = str(ca_path)
    password = section.get("password", "")
    password_file = section.get("password_file", "")
    if password and password_file:
        raise ConfigError(f"{source}: relay.password and relay.password_file are both set; "
                          "keep one")
    env_password = os.environ.get("BROKER_RELAY_PASSWORD")
    if password_file and not env_password:
        password = _read_password_file(home / Path(password_file).expanduser(), source)
    default_port = {"implicit": 465, "starttls": 587}.get(tls, 25)
    return RelaySettings(
        host=section.get("host") or "127.0.0.1",
        port=section.get("port") or default_port,
        tls=tls,
        verify=section.get("verify", True),
        ca_file=ca_file,
        username=section.get("username", ""),
        password=env_password or password,
        allow_plaintext_auth=section.get("allow_plaintext_auth", False),
        timeout=float(section.get("timeout") or 30.0),
    )


def _read_password_file(path: Path, source: str) -> str:
    """The relay password from a file only the broker's user can read (mode 600/400)."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"{source}: relay.password_file {path} is open to group/others (mode "
                f"{mode & 0o777:o}); refusing to use it: chmod 600 {path}")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: relay.password_file {path}: {exc.strerror}") from exc
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"{source}: relay.password_file {path} is empty")
    return password


IMAP_TLS_MODES = ("implicit", "starttls", "none")


@dataclass(frozen=True)
class ImapSettings:
    """[imap]: take mail from a mailbox at an ordinary provider (broker.intake.imap) instead
    of, or besides, the SMTP intake."""

    host: str
    port: int = 993
    tls: str = "implicit"  # "implicit" (IMAPS), "starttls" or "none"
    user: str = ""
    password: str = field(default="", repr=False)
    folder: str = "INBOX"  # watched for new mail
    processed_folder: str = "Processed"  # taken mail is moved here (created when missing)
    verify: bool = True  # check the server's TLS certificate and name
    poll_interval: float = 60.0  # seconds between checks (and IDLE renewals)
    # Child slug whose list address mail is for when it names none of the broker's
    # addresses (the mailbox is one address); empty: the only child there is.
    child: str = ""
    timeout: float = 60.0  # seconds a single IMAP command may take


@dataclass(frozen=True)
class Limits:
    """What one message or one client may ask of the broker. At SMTP: connections per
    client address (421), recipients per message (452), header fields and header field
    length (552); message size is smtp.max_message_size (552). In the pipeline: MIME depth,
    MIME parts and attachments (the record is quarantined with the reason)."""

    max_headers: int = 500
    max_header_length: int = 8 * 1024
    max_mime_depth: int = 20
    max_mime_parts: int = 200
    max_attachments: int = 50
    max_recipients: int = 100
    connections_per_address: int = 20
    limit_loopback: bool = True
    notices_per_address_per_day: int = 50


@dataclass(frozen=True)
class Settings:
    home: Path
    domain: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 2525
    # [smtp] protocol: "smtp", or "lmtp" when an MTA in front delivers with LMTP.
    smtp_protocol: str = "smtp"
    relay: RelaySettings = field(default_factory=RelaySettings)
    database_url: str = ""
    max_message_size: int = 25 * 1024 * 1024
    # broker.toml [hold] lifetime_days: overrides rules/default.toml [hold] when set.
    hold_days: float | None = None
    reply_auth: str = "token"
    # authserv-ids of the operator's own MTA whose Authentication-Results are believed
    # (lower case); see broker.crypto.authresults for which of its headers count.
    trusted_authserv_ids: tuple[str, ...] = ()
    # Connecting addresses whose Authentication-Results may be believed at all.
    trusted_relays: tuple[str, ...] = ("127.0.0.1", "::1")
    # [receipts] forwarded: tell the sender when their message was forwarded.
    notify_sender_on_release: bool = False
    # Retry schedule for outbound copies, in seconds; the last step repeats until
    # give_up_after seconds have passed since the first attempt.
    retry_schedule: tuple[float, ...] = (60, 300, 1800, 7200, 21600)
    give_up_after: float = 3 * 24 * 3600
    # Seconds a copy claimed by a sender is kept from other attempts; a sender killed
    # mid-send leaves its copies to be sent again (same bytes) once this has passed.
    claim_lease: float = 600.0
    # How often the timer looks for expired holds, in seconds.
    expiry_interval: float = 60.0
    # [smtp] burst_rate, burst_wait: while more than burst_rate messages a second arrive,
    # the workers wait (at most burst_wait seconds per burst) and the intake has the
    # machine (broker.intake.burst). burst_rate = 0 turns this off.
    burst_rate: float = 200.0
    burst_wait: float = 5.0
    # [limits]: hostile or broken input gets a clear answer, never a crash (see the template).
    limits: Limits = field(default_factory=Limits)
    # [imap]: a mailbox to watch (broker.intake.imap); None when the section is absent.
    imap: ImapSettings | None = None

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def content_dir(self) -> Path:
        return self.home / "content"


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what} must look like HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def default_database_url(home: Path) -> str:
    return f"sqlite:///{home / 'broker.db'}"


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    value = home or os.environ.get("BROKER_HOME")
    if not value:
        raise ConfigError("no broker home: pass --home DIR or set BROKER_HOME")
    return Path(value).expanduser().resolve()


def load(home: Path) -> Settings:
    path = home / CONFIG_NAME
    if not path.exists():
        raise ConfigError(f"{path} not found: run `broker init --home {home}` first")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return from_mapping(home, raw, source=str(path))


def from_mapping(home: Path, raw: dict, source: str = CONFIG_NAME) -> Settings:
    def need(section: dict, key: str, kind: type, where: str) -> Any:
        value = section.get(key)
        if value is None:
            return None
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise ConfigError(f"{source}: {where}{key} must be {kind.__name__}, got {value!r}")
        return value

    domain = need(raw, "domain", str, "")
    if not domain:
        raise ConfigError(f"{source}: `domain` is required")
    smtp = raw.get("smtp", {})
    listen = need(smtp, "listen", str, "smtp.") or "127.0.0.1:2525"
    lhost, lport = parse_hostport(listen, f"{source}: smtp.listen")
    protocol = need(smtp, "protocol", str, "smtp.") or "smtp"
    if protocol not in SMTP_PROTOCOLS:
        raise ConfigError(f"{source}: smtp.protocol must be one of "
                          f"{', '.join(SMTP_PROTOCOLS)}, got {protocol!r}")
    relay = _relay(raw.get("relay", {}), home, source)
    db = raw.get("database", {})
    url = os.environ.get("BROKER_DATABASE_URL") or need(db, "url", str, "database.") or ""
    hold = raw.get("hold", {})
    replies = raw.get("replies", {})
    # Missing: the default `broker init` writes (token mode must be chosen explicitly).
    auth = need(replies, "authentication", str, "replies.") or "dkim"
    if auth not in AUTH_MODES:
        raise ConfigError(
            f"{source}: replies.authentication must be one of {', '.join(AUTH_MODES)}, got {auth!r}"
        )
    trusted = replies.get("trusted_authserv_ids", [])
    if not isinstance(trusted, list) or not all(
        isinstance(t, str) and t.strip() and not any(c.isspace() or c == ";" for c in t.strip())
        for t in trusted
    ):
        raise ConfigError(f"{source}: replies.trusted_authserv_ids must be a list of "
                          "authserv-ids (host names, no spaces or ';')")
    relays = replies.get("trusted_relays", ["127.0.0.1", "::1"])
    try:
        if not isinstance(relays, list):
            raise ValueError
        relays = [str(ipaddress.ip_address(r)) for r in relays]
    except ValueError as exc:
        raise ConfigError(f"{source}: replies.trusted_relays must be a list of IP addresses"
                          ) from exc
    release = raw.get("release", {})
    outbox = raw.get("outbox", {})
    schedule = outbox.get("retry_schedule")
    if schedule is not None and (
        not isinstance(schedule, list) or not schedule
        or not all(isinstance(s, int | float) and s >= 0 for s in schedule)
    ):
        raise ConfigError(f"{source}: outbox.retry_schedule must be a list of seconds")
    size = need(smtp, "max_message_size", int, "smtp.") or 25 * 1024 * 1024
    burst_rate = need(smtp, "burst_rate", float, "smtp.")
    burst_wait = need(smtp, "burst_wait", float, "smtp.")
    if burst_rate is not None and burst_rate < 0:
        raise ConfigError(f"{source}: smtp.burst_rate must be >= 0 (0 turns it off)")
    if burst_wait is not None and burst_wait <= 0:
        raise ConfigError(f"{source}: smtp.burst_wait must be a positive number of seconds")
    limits = _limits(raw.get("limits", {}), source)
    return Settings(
        home=home,
        domain=domain.lower(),
        listen_host=lhost,
        listen_port=lport,
        smtp_protocol=protocol,
        relay=relay,
        database_url=url or default_database_url(home),
        max_message_size=size,
        hold_days=need(hold, "lifetime_days", float, "hold.") or None,
        reply_auth=auth,
        trusted_authserv_ids=tuple(dict.fromkeys(t.strip().lower() for t in trusted)),
        trusted_relays=tuple(relays),
        notify_sender_on_release=_forwarded_receipts(raw.get("receipts", {}), release, source),
        retry_schedule=tuple(float(s) for s in schedule) if schedule else Settings.retry_schedule,
        give_up_after=need(outbox, "give_up_after", float, "outbox.") or 3 * 24 * 3600.0,
        claim_lease=need(outbox, "claim_lease", float, "outbox.") or 600.0,
        expiry_interval=need(hold, "check_interval", float, "hold.") or 60.0,
        burst_rate=Settings.burst_rate if burst_rate is None else burst_rate,
        burst_wait=Settings.burst_wait if burst_wait is None else burst_wait,
        limits=limits,
        imap=_imap(raw.get("imap"), home, source),
    )


def _imap(section: object, home: Path, source: str) -> ImapSettings | None:
    """[imap]: absent means no mailbox is watched. The password comes from
    BROKER_IMAP_PASSWORD, else password_file (relative to the home), else password."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [imap] must be a table")
    known = {"host", "port", "tls", "user", "password", "password_file", "folder",
             "processed_folder", "verify", "poll_interval", "child", "timeout"}
    for key in section:
        if key not in known:
            raise ConfigError(f"{source}: imap.{key} is not a known setting "
                              f"(known: {', '.join(sorted(known))})")

    def get(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = section.get(key, default)
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{source}: imap.{key} must not be true/false, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"{source}: imap.{key} has the wrong type: {value!r}")
        return value

    host = get("host", str, "").strip()
    if not host:
        raise ConfigError(f"{source}: imap.host is required")
    tls = get("tls", str, "implicit")
    if tls not in IMAP_TLS_MODES:
        raise ConfigError(f"{source}: imap.tls must be one of {', '.join(IMAP_TLS_MODES)}, "
                          f"got {tls!r}")
    port = get("port", int, 993 if tls == "implicit" else 143)
    if not 0 < port < 65536:
        raise ConfigError(f"{source}: imap.port must be a TCP port, got {port!r}")
    user = get("user", str, "")
    if not user:
        raise ConfigError(f"{source}: imap.user is required")
    password = os.environ.get("BROKER_IMAP_PASSWORD") or ""
    password_file = get("password_file", str, "")
    if not password and password_file:
        path = Path(password_file).expanduser()
        path = path if path.is_absolute() else home / path
        try:
            password = path.read_text(encoding="utf-8").strip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{source}: imap.password_file {path}: {exc.strerror}") from exc
    if not password:
        password = get("password", str, "")
    if not password:
        raise ConfigError(f"{source}: [imap] needs a password: imap.password, "
                          "imap.password_file or BROKER_IMAP_PASSWORD")
    folder = get("folder", str, "INBOX") or "INBOX"
    processed = get("processed_folder", str, "Processed") or "Processed"
    if processed == folder:
        raise ConfigError(f"{source}: imap.processed_folder must differ from imap.folder")
    poll = float(get("poll_interval", (int, float), 60.0))
    timeout = float(get("timeout", (int, float), 60.0))
    if poll <= 0 or timeout <= 0:
        raise ConfigError(f"{source}: imap.poll_interval and imap.timeout must be positive")
    return ImapSettings(
        host=host, port=port, tls=tls, user=user, password=password, folder=folder,
        processed_folder=processed, verify=get("verify", bool, True), poll_interval=poll,
        child=get("child", str, "").strip().lower(), timeout=timeout,
    )


def _forwarded_receipts(receipts: object, release: dict, source: str) -> bool:
    """[receipts] forwarded (older homes: [release] notify_sender); off by default."""
    if not isinstance(receipts, dict):
        raise ConfigError(f"{source}: [receipts] must be a table")
    value = receipts.get("forwarded", release.get("notify_sender", False))
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: receipts.forwarded must be true or false")
    return value


def _limits(section: object, source: str) -> Limits:
    """[limits]: every key optional; each a positive integer (limit_loopback a boolean)."""
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [limits] must be a table")
    known = {f.name: f.default for f in fields(Limits)}
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in known:
            raise ConfigError(f"{source}: limits.{key} is not a known limit "
                              f"(known: {', '.join(known)})")
        if isinstance(known[key], bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: limits.{key} must be true or false")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: limits.{key} must be a positive integer, "
                              f"got {value!r}")
        values[key] = value
    return Limits(**values)


CONFIG_TEMPLATE = """\
# broker.toml - settings of this disclosure broker. Edit with care; `broker serve`
# reads it at start. Secrets may come from the environment instead
# (BROKER_RELAY_PASSWORD, BROKER_DATABASE_URL).

# The mail domain the broker owns: <child>@{domain}, review+TOKEN@{domain},
# bounces+ID@{domain}.
domain = "{domain}"

[smtp]
# Where the broker's SMTP intake listens (HOST:PORT).
listen = "{listen}"
# Larger mail is refused with 552 (bytes; 25 MB). Behind Postfix, set its
# message_size_limit to the same number (deploy/postfix/README.md).
max_message_size = {max_size}
# "smtp", or "lmtp" when the MTA in front hands mail over with LMTP
# (Postfix: lmtp:inet:HOST:PORT in its transport map).
protocol = "smtp"
# Bursts: while more than burst_rate messages a second arrive, the pipeline waits
# (at most burst_wait seconds per burst) so the intake answers first; the mail is
# safe in the spool meanwhile. burst_rate = 0 turns this off.
burst_rate = 200
burst_wait = 5

[limits]
# What one message or one client may ask of the broker. Refused at SMTP, so the
# sender's own server tells them why (besides smtp.max_message_size, answered 552):
#   connections_per_address - concurrent SMTP sessions from one client IP address;
#       more are answered "421 too many connections from your address" at connect.
#       limit_loopback = false exempts 127.0.0.1 and ::1 (a local MTA in front).
#   max_recipients - RCPT TO per message; more are answered 452 (the sender retries).
#   max_headers, max_header_length - header fields per message, and bytes in one
#       header field with its folded continuation lines; answered 552. (Any single
#       line over 1000 bytes, RFC 5321 4.5.3.1.6, is refused with 500 at DATA.)
# Checked when a team member's message is read; the record is quarantined with the
# reason, and the guardians are told:
#   max_mime_depth, max_mime_parts, max_attachments
# And the broker's own mail: at most notices_per_address_per_day notices (receipts,
# help, not understood, refusals, quarantine notices) to one address per UTC day; over
# it they are not sent and the audit says `notice_capped` once. Review requests,
# previews and released copies are never capped.
connections_per_address = 20
limit_loopback = true
max_recipients = 100
max_headers = 500
max_header_length = 8192
max_mime_depth = 20
max_mime_parts = 200
max_attachments = 50
notices_per_address_per_day = 50

[relay]
# The SMTP server that carries the broker's outbound mail (your submission server).
host = "{relay_host}"
port = {relay_port}
# Encryption: "starttls" (usually port 587: connect, then STARTTLS before anything
# else), "implicit" (usually port 465: TLS from the first byte) or "none" (only for
# a relay on this machine or a network you control).
tls = "none"
# Check the relay's certificate (chain and host name). Leave on. For a relay with a
# private CA, point ca_file at its PEM bundle (trusted instead of the system's CAs).
verify = true
ca_file = ""
# Log in (AUTH PLAIN or LOGIN) when username is set. The password: here, or in
# password_file (a file only the broker's user may read: chmod 600), or in the
# environment as BROKER_RELAY_PASSWORD (wins over both). A refused login or an
# untrusted certificate keeps the copies queued and is logged for you to fix.
username = ""
password = ""
password_file = ""
# The login is only sent over TLS; true allows it on tls = "none" (never across a
# network you do not control).
allow_plaintext_auth = false
# Seconds to wait for the relay.
timeout = 30.0

[database]
# SQLAlchemy URL. Empty: SQLite (WAL) in this home. For several broker processes
# use PostgreSQL, e.g. "postgresql+psycopg://broker@db.internal/broker".
url = ""

[hold]
# Days a record waits for a decision, and the reminder days, are set in the rules
# (rules/default.toml [hold]). Uncomment to override the lifetime for this broker:
# lifetime_days = 30
# Seconds between checks for expired holds.
check_interval = 60

[replies]
# How a guardian's reply is authenticated before it may decide anything:
#   token - the record's token and a guardian's From address (demo and tests only)
#   dkim  - also a DKIM signature the broker verifies, with d= the From domain or a
#           parent of it, or a trusted Authentication-Results (below)
#   pgp   - also a valid OpenPGP signature (PGP/MIME or inline) by the guardian's
#           key registered in the team file (pgp_key); commands are read only from
#           the signed text
authentication = "{auth}"
# dkim mode: authserv-ids of YOUR OWN mail server (the first field of the
# Authentication-Results header it adds, e.g. "mx.records.example") whose dkim=pass or
# dmarc=pass results are believed. Only its headers standing above the topmost
# Received header count (those below came from outside). Set this only when the
# broker's SMTP intake is reachable through that server alone (loopback or a
# firewalled port): a sender talking to the intake directly can write any header.
# Empty: no Authentication-Results is believed; the broker checks DKIM itself.
trusted_authserv_ids = []
# ...and only on mail handed over by one of these addresses (your mail server's
# connection to the intake). Mail from anywhere else is judged by DKIM alone.
trusted_relays = ["127.0.0.1", "::1"]

[receipts]
# Senders always get a receipt when their message is held for the family's review.
# true: also tell them when it was forwarded (never what was decided, never a denial).
forwarded = false

[outbox]
# Seconds between delivery attempts; the last step repeats until give_up_after.
retry_schedule = [60, 300, 1800, 7200, 21600]
give_up_after = 259200
# Seconds before a copy whose sending was cut short (the broker killed mid-send) is
# sent again, with the same bytes and Message-ID. A sender hands back what it has not
# tried after half this time, so no copy is ever in two senders' hands.
claim_lease = 600

# [imap]
# Mailbox mode: take mail from a mailbox at an ordinary provider instead of (or besides)
# the SMTP intake. `broker serve` watches the folder (IDLE, else polling), stores each new
# message in the spool and then moves it to processed_folder (created when missing).
# Mail naming none of the broker's addresses is for the list address of `child` (or
# the only child). The password may instead be in password_file (relative to this
# home) or the environment (BROKER_IMAP_PASSWORD).
# host = "imap.provider.example"
# port = 993
# tls = "implicit"            # "implicit" (port 993), "starttls" (143) or "none"
# user = "family.records@provider.example"
# password_file = "imap-password"
# folder = "INBOX"
# processed_folder = "Processed"
# verify = true               # check the server's certificate
# poll_interval = 60          # seconds between checks where IDLE is missing
# child = "sam"
"""


def render_config(
    *, domain: str, listen: str, relay: str, auth: str = "dkim", max_size: int = 25 * 1024 * 1024
) -> str:
    relay_host, relay_port = parse_hostport(relay, "--relay")
    parse_hostport(listen, "--listen")
    if auth not in AUTH_MODES:
        raise ConfigError(f"authentication must be one of {', '.join(AUTH_MODES)}")
    return CONFIG_TEMPLATE.format(
        domain=domain.lower(),
        listen=listen,
        relay_host=relay_host,
        relay_port=relay_port,
        auth=auth,
        max_size=max_size,
    )
