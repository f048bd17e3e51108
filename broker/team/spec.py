"""The team file (TOML), read and checked without touching the database.

The format is a user-facing contract documented in the README; errors name the
entry and the field so the operator can fix the file.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path

from broker.crypto import pgp

SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
TAG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
ROLES = ("provider", "school")
RESERVED_SLUGS = frozenset({"review", "bounces", "postmaster", "abuse", "mailer-daemon"})


# Reply-authentication modes from weakest to strongest; a guardian's own setting can
# only raise the bar set in broker.toml, never lower it.
AUTH_STRENGTH = ("token", "dkim", "pgp")
APPROVAL_MODES = ("any", "all")


class TeamFileError(Exception):
    """The team file is wrong; the message says where."""


@dataclass(frozen=True)
class PersonSpec:
    name: str
    email: str
    role: str  # guardian | student | provider | school
    tags: tuple[str, ...] = ()
    pgp_key: str | None = None  # armored public key, read from the file pgp_key names
    pgp_key_revoked: bool = False
    require_encryption: bool = False
    # Guardians only: a reply-authentication mode stricter than broker.toml's.
    authentication: str | None = None


@dataclass(frozen=True)
class TeamSpec:
    slug: str
    name: str
    birthdate: dt.date | None
    jurisdiction: str | None
    guardians: tuple[PersonSpec, ...]
    members: tuple[PersonSpec, ...]
    # "any": one guardian's decision is enough; "all": a release waits for every guardian.
    approval: str = "any"
    # The child's own address: gets review requests where the jurisdiction gives the child
    # a say (co-consent) and decides alone from the age of majority.
    student: PersonSpec | None = None

    @property
    def people(self) -> tuple[PersonSpec, ...]:
        return self.guardians + ((self.student,) if self.student else ()) + self.members


def _email(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise TeamFileError(f"{where}: email is required")
    _, addr = parseaddr(value)
    addr = addr.strip().lower()
    local, at, domain = addr.rpartition("@")
    if not at or not local or "." not in domain or addr != value.strip().lower():
        raise TeamFileError(f"{where}: {value!r} is not a plain e-mail address")
    return addr


def _str(entry: dict, key: str, where: str, required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None:
        if required:
            raise TeamFileError(f"{where}: `{key}` is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise TeamFileError(f"{where}: `{key}` must be a non-empty string")
    return value.strip()


def _flag(entry: dict, key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise TeamFileError(f"{where}: `{key}` must be true or false")
    return value


def _pgp(entry: dict, where: str, base: Path | None) -> tuple[str | None, bool]:
    """The armored public key named by `pgp_key` (relative to the team file) and the
    `pgp_key_revoked` flag. Expired keys are accepted here (the broker refuses them when
    it would use them); a missing file, a private key or no key at all are errors."""
    revoked = _flag(entry, "pgp_key_revoked", where)
    name = _str(entry, "pgp_key", where, required=False)
    if name is None:
        if revoked:
            raise TeamFileError(f"{where}: `pgp_key_revoked` without `pgp_key`")
        return None, False
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TeamFileError(f"{where}: pgp_key {name!r} cannot be read ({exc})") from exc
    if "PRIVATE KEY BLOCK" in text:
        raise TeamFileError(f"{where}: pgp_key {name!r} is a private key; give the public key")
    try:
        pgp.fingerprint(text)
    except pgp.PGPError as exc:
        raise TeamFileError(f"{where}: pgp_key {name!r} is not an OpenPGP public key "
                            f"({exc})") from exc
    return text, revoked


def parse_team(text: str, source: str = "team file", base: Path | None = None) -> TeamSpec:
    """``base``: the folder `pgp_key` paths are relative to (the team file's folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TeamFileError(f"{source}: {exc}") from exc
    child = raw.get("child")
    if not isinstance(child, dict):
        raise TeamFileError(f"{source}: a [child] table is required")
    slug = _str(child, "slug", f"{source} [child]") or ""
    if not SLUG.match(slug) or slug in RESERVED_SLUGS:
        raise TeamFileError(
            f"{source} [child]: slug {slug!r} must be lower-case letters, digits, '.', '_' or "
            f"'-' and not one of {', '.join(sorted(RESERVED_SLUGS))}"
        )
    name = _str(child, "name", f"{source} [child]") or ""
    birthdate = child.get("birthdate")
    if birthdate is not None and not isinstance(birthdate, dt.date):
        try:
            birthdate = dt.date.fromisoformat(str(birthdate))
        except ValueError as exc:
            raise TeamFileError(f"{source} [child]: birthdate must be YYYY-MM-DD") from exc
    jurisdiction = _str(child, "jurisdiction", f"{source} [child]", required=False)
    approval = _str(child, "approval", f"{source} [child]", required=False) or "any"
    if approval not in APPROVAL_MODES:
        raise TeamFileError(f"{source} [child]: approval must be \"any\" or \"all\", "
                            f"got {approval!r}")

    guardians: list[PersonSpec] = []
    for i, g in enumerate(raw.get("guardians", []), start=1):
        where = f"{source} [[guardians]] #{i}"
        key, revoked = _pgp(g, where, base)
        auth = _str(g, "authentication", where, required=False)
        if auth is not None and auth not in AUTH_STRENGTH:
            raise TeamFileError(f"{where}: authentication must be one of "
                                f"{', '.join(AUTH_STRENGTH)}, got {auth!r}")
        if auth == "pgp" and key is None:
            raise TeamFileError(f"{where}: authentication = \"pgp\" needs a pgp_key")
        guardians.append(
            PersonSpec(_str(g, "name", where) or "", _email(g.get("email"), where), "guardian",
                       pgp_key=key, pgp_key_revoked=revoked, authentication=auth)
        )
    if not guardians:
        raise TeamFileError(f"{source}: at least one [[guardians]] entry is required")

    student: PersonSpec | None = None
    raw_student = raw.get("student")
    if raw_student is not None:
        where = f"{source} [student]"
        if not isinstance(raw_student, dict):
            raise TeamFileError(f"{where}: must be a table with name and email")
        key, revoked = _pgp(raw_student, where, base)
        auth = _str(raw_student, "authentication", where, required=False)
        if auth is not None and auth not in AUTH_STRENGTH:
            raise TeamFileError(f"{where}: authentication must be one of "
                                f"{', '.join(AUTH_STRENGTH)}, got {auth!r}")
        if auth == "pgp" and key is None:
            raise TeamFileError(f"{where}: authentication = \"pgp\" needs a pgp_key")
        if birthdate is None:
            raise TeamFileError(f"{where}: the child's birthdate is needed to know when the "
                                "student has a say ([child] birthdate = YYYY-MM-DD)")
        student = PersonSpec(_str(raw_student, "name", where) or "",
                             _email(raw_student.get("email"), where), "student",
                             pgp_key=key, pgp_key_revoked=revoked, authentication=auth)

    members: list[PersonSpec] = []
    for i, m in enumerate(raw.get("members", []), start=1):
        where = f"{source} [[members]] #{i}"
        role = _str(m, "role", where) or ""
        if role not in ROLES:
            raise TeamFileError(f"{where}: role must be provider or school, got {role!r}")
        tags = m.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and TAG.match(t) for t in tags):
            raise TeamFileError(f"{where}: tags must be a list of lower-case words")
        key, revoked = _pgp(m, where, base)
        members.append(
            PersonSpec(_str(m, "name", where) or "", _email(m.get("email"), where), role,
                       tuple(dict.fromkeys(tags)), pgp_key=key, pgp_key_revoked=revoked,
                       require_encryption=_flag(m, "require_encryption", where))
        )

    seen: dict[str, str] = {}
    for p in guardians + ([student] if student else []) + members:
        if p.email in seen:
            raise TeamFileError(f"{source}: {p.email} appears twice ({seen[p.email]} and {p.role})")
        seen[p.email] = p.role
    return TeamSpec(slug, name, birthdate, jurisdiction, tuple(guardians), tuple(members),
                    approval=approval, student=student)
