"""The policy folder (rules/, DESIGN.md section 6), read and checked into frozen values.

`load_rules(folder)` reads `default.toml` and `jurisdictions/*.toml` and returns `Rules`, or
raises `RulesError` listing every mistake; `check_rules(folder)` returns the same mistakes as
"file:line: message" strings. Everything after reading the text is pure (`parse_rules`).

The files are an operator's contract: unknown keys are errors (a typo must not silently turn
a rule off), regexes must compile, routing may only name defined categories, and `extends`
must name an existing jurisdiction without a loop. Each error names the file and the line:
tomllib's syntax errors carry it in their message; for the rest, `_KeyLines` finds the line
where the offending key (or its nearest enclosing table) is written.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

DEFAULT_FILE = "default.toml"
JURISDICTIONS_DIR = "jurisdictions"

# DS4P (HL7 Data Segmentation for Privacy) sensitivity names used in rules files, with the
# HL7 v3 ActInformationSensitivityPolicy code each stands for.
DS4P_CODES: Mapping[str, str] = MappingProxyType({
    "mental_health": "PSY",
    "psychotherapy_notes": "PSYTHPN",
    "substance_use": "ETH",
    "hiv": "HIV",
    "genetic": "GDIS",
    "sexual_reproductive_health": "SEX",
    "abuse_violence": "SDV",
})
NORMAL = "normal"

CATEGORY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
PATTERN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
JURISDICTION_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")
# The same shape as a tag in the team file (broker.team.spec.TAG).
TAG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")

MAX_DAYS = 3650
MAX_AGE = 30


# -- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Category:
    name: str
    description: str
    sensitivity: str  # a DS4P name or "normal"
    sensitive: bool
    sender_tags: tuple[str, ...]
    words: tuple[str, ...]
    attachment_names: tuple[str, ...]
    # (word, compiled whole-word regex) and (glob, compiled regex), built once at load.
    word_patterns: tuple[tuple[str, re.Pattern[str]], ...] = field(
        default=(), compare=False, repr=False)
    attachment_patterns: tuple[tuple[str, re.Pattern[str]], ...] = field(
        default=(), compare=False, repr=False)

    @property
    def ds4p_code(self) -> str | None:
        return DS4P_CODES.get(self.sensitivity)


@dataclass(frozen=True)
class Hold:
    lifetime_days: int
    reminder_days: tuple[int, ...]


@dataclass(frozen=True)
class Pattern:
    name: str
    kind: str  # "always" | "suggest"
    regex: str
    why: str
    compiled: re.Pattern[str] = field(compare=False, repr=False)


@dataclass(frozen=True)
class CategoryRule:
    """What a jurisdiction says about one category."""

    standing_consent: bool = True
    release_notice: str | None = None
    co_consent_age: int | None = None
    minor_veto: bool = False
    citation: str | None = None


@dataclass(frozen=True)
class Jurisdiction:
    id: str
    name: str
    extends: tuple[str, ...]  # the chain of files it builds on, nearest first
    majority_age: int
    majority_notice_age: int | None
    consent_requires_expiry: bool
    citation: str | None
    categories: Mapping[str, CategoryRule]

    def rule(self, category: str) -> CategoryRule:
        return self.categories.get(category, CategoryRule())


@dataclass(frozen=True)
class Rules:
    source: str
    default_jurisdiction: str | None
    hold: Hold
    categories: Mapping[str, Category]
    routing: Mapping[str, tuple[str, ...]]
    always_redact: tuple[Pattern, ...]
    suggest: tuple[Pattern, ...]
    jurisdictions: Mapping[str, Jurisdiction]


@dataclass(frozen=True, order=True)
class RuleError:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class RulesError(Exception):
    """The rules folder has mistakes; `errors` lists each with its file and line."""

    def __init__(self, errors: list[RuleError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


# -- entry points -------------------------------------------------------------------------------


def load_rules(folder: Path) -> Rules:
    rules, errors = _load(Path(folder))
    if errors or rules is None:
        raise RulesError(errors)
    return rules


def check_rules(folder: Path) -> list[str]:
    _rules, errors = _load(Path(folder))
    return [str(e) for e in errors]


def _load(folder: Path) -> tuple[Rules | None, list[RuleError]]:
    default_path = folder / DEFAULT_FILE
    if not folder.is_dir():
        return None, [RuleError(str(folder), 1, "no such rules folder")]
    try:
        default_text = default_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [RuleError(str(default_path), 1, "missing: every rules folder needs one")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [RuleError(str(default_path), 1, f"cannot read: {exc}")]
    jurisdictions: dict[str, tuple[str, str]] = {}
    errors: list[RuleError] = []
    jdir = folder / JURISDICTIONS_DIR
    if jdir.is_dir():
        for path in sorted(jdir.glob("*.toml")):
            try:
                jurisdictions[path.stem] = (str(path), path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(RuleError(str(path), 1, f"cannot read: {exc}"))
    rules, parse_errors = _parse(str(folder), (str(default_path), default_text), jurisdictions)
    errors += parse_errors
    return (None if errors else rules), errors


def parse_rules(
    default: tuple[str, str],
    jurisdictions: Mapping[str, tuple[str, str]],
    source: str = "rules",
) -> Rules:
    """Pure: (display name, text) of default.toml and of each jurisdiction file by id."""
    rules, errors = _parse(source, default, jurisdictions)
    if errors or rules is None:
        raise RulesError(errors)
    return rules


def _parse(
    source: str,
    default: tuple[str, str],
    jurisdictions: Mapping[str, tuple[str, str]],
) -> tuple[Rules | None, list[RuleError]]:
    errors: list[RuleError] = []
    dfile = _File(default[0], default[1], errors)
    parsed = _parse_default(dfile)
    category_names = set(parsed["categories"]) if parsed else None
    jfiles = {jid: _File(name, text, errors) for jid, (name, text) in jurisdictions.items()}
    resolved = _parse_jurisdictions(jfiles, category_names)
    if parsed and parsed["jurisdiction"] is not None and parsed["jurisdiction"] not in jfiles:
        dfile.error(("jurisdiction",), f"jurisdiction {parsed['jurisdiction']!r} has no file "
                    f"{JURISDICTIONS_DIR}/{parsed['jurisdiction']}.toml")
    order = {default[0]: 0}
    errors.sort(key=lambda e: (order.get(e.file, 1), e.file, e.line))
    if errors or parsed is None:
        return None, errors
    return Rules(
        source=source,
        default_jurisdiction=parsed["jurisdiction"],
        hold=parsed["hold"],
        categories=MappingProxyType(parsed["categories"]),
        routing=MappingProxyType(parsed["routing"]),
        always_redact=parsed["always"],
        suggest=parsed["suggest"],
        jurisdictions=MappingProxyType(resolved),
    ), errors


# -- finding the line of a key ------------------------------------------------------------------

_BARE = r"[A-Za-z0-9_-]+"
_BASIC = r'"(?:[^"\\\n]|\\.)*"'
_LITERAL = r"'[^'\n]*'"
_KEY = rf"(?:{_BARE}|{_BASIC}|{_LITERAL})"
_DOTTED = rf"{_KEY}(?:[ \t]*\.[ \t]*{_KEY})*"
_HEADER = re.compile(rf"^[ \t]*(\[\[?)[ \t]*({_DOTTED})[ \t]*\]")
_KEYVAL = re.compile(rf"^[ \t]*({_DOTTED})[ \t]*=")
_KEYPART = re.compile(_KEY)

Path_ = tuple[str | int, ...]


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for raw in _KEYPART.findall(dotted):
        if raw.startswith('"'):
            try:
                parts.append(tomllib.loads(f"k = {raw}")["k"])
            except tomllib.TOMLDecodeError:
                parts.append(raw[1:-1])
        elif raw.startswith("'"):
            parts.append(raw[1:-1])
        else:
            parts.append(raw)
    return parts


class _KeyLines:
    """Where each key and table of a TOML text is written: path -> 1-based line.

    A path is the list of keys from the root, with an index after each array of tables
    (("patterns", "always", 1, "regex")). Lines inside multi-line strings and arrays are
    skipped, so text in them is never taken for a key. Keys inside inline tables are not
    indexed: they resolve to the line of the key holding the inline table.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[Path_, int] = {}
        self.last_line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
        arrays: dict[Path_, int] = {}
        current: Path_ = ()
        in_string: str | None = None
        depth = 0
        for lineno, line in enumerate(text.split("\n"), start=1):
            if in_string is None and depth == 0:
                header = _HEADER.match(line)
                keyval = None if header else _KEYVAL.match(line)
                if header:
                    is_array = header.group(1) == "[["
                    keys = _key_parts(header.group(2))
                    path: Path_ = ()
                    for i, key in enumerate(keys):
                        path += (key,)
                        if (i < len(keys) - 1 or not is_array) and path in arrays:
                            path += (arrays[path] - 1,)
                    if is_array:
                        arrays[path] = arrays.get(path, 0) + 1
                        path += (arrays[path] - 1,)
                    current = path
                    self._note(path, lineno)
                elif keyval:
                    full = current
                    for key in _key_parts(keyval.group(1)):
                        full += (key,)
                        self._note(full, lineno)
            in_string, depth = _scan(line, in_string, depth)

    def _note(self, path: Path_, lineno: int) -> None:
        self.lines.setdefault(path, lineno)

    def line_of(self, path: Path_) -> int:
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1


def _scan(line: str, in_string: str | None, depth: int) -> tuple[str | None, int]:
    """Carry multi-line string and bracket state across one line."""
    i, n = 0, len(line)
    while i < n:
        if in_string is not None:
            j = line.find(in_string, i)
            while j > 0 and in_string == '"""' and _escaped(line, j):
                j = line.find(in_string, j + 1)
            if j < 0:
                return in_string, depth
            i = j + 3
            while i < n and line[i] == in_string[0]:  # up to two quotes may end the string
                i += 1
            in_string = None
            continue
        c = line[i]
        if c == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            in_string = line[i:i + 3]
            i += 3
            continue
        if c == '"':
            j = i + 1
            while j < n and (line[j] != '"' or _escaped(line, j)):
                j += 1
            i = j + 1
            continue
        if c == "'":
            j = line.find("'", i + 1)
            i = n if j < 0 else j + 1
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return in_string, depth


def _escaped(line: str, j: int) -> bool:
    backslashes = 0
    while j - backslashes - 1 >= 0 and line[j - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


# -- one file -----------------------------------------------------------------------------------

_SYNTAX_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def _show(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _File:
    def __init__(self, name: str, text: str, errors: list[RuleError]) -> None:
        self.name = name
        self.errors = errors
        self.data: dict[str, Any] | None = None
        self.keys = _KeyLines(text)
        try:
            self.data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            message = str(exc)
            found = _SYNTAX_LINE.search(message)
            line = int(found.group(1)) if found else self.keys.last_line
            where = f"column {found.group(2)}" if found else "at the end of the file"
            message = _SYNTAX_LINE.sub("", message).replace("(at end of document)", "").strip()
            self.errors.append(RuleError(name, line, f"TOML syntax: {message} ({where})"))

    def error(self, path: Path_, message: str) -> None:
        self.errors.append(RuleError(self.name, self.keys.line_of(path), message))

    # Typed reads: each reports its own mistake and returns None (or the default).

    def table(self, value: Any, path: Path_, allowed: tuple[str, ...],
              required: tuple[str, ...] = ()) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.error(path, f"{_show(path)} must be a table")
            return None
        for key in value:
            if key not in allowed:
                where = f"[{_show(path)}]" if path else "the top level"
                self.error((*path, key), f"unknown key {key!r} in {where} "
                           f"(allowed: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.error(path, f"{_show(path) or 'the file'} needs {key!r}")
        return value

    def string(self, tbl: dict[str, Any], key: str, path: Path_,
               default: str | None = None) -> str | None:
        if key not in tbl:
            return default
        value = tbl[key]
        if not isinstance(value, str) or not value.strip():
            self.error((*path, key), f"{_show((*path, key))} must be a non-empty string")
            return default
        return value.strip()

    def boolean(self, tbl: dict[str, Any], key: str, path: Path_,
                default: bool | None = None) -> bool | None:
        if key not in tbl:
            return default
        value = tbl[key]
        if not isinstance(value, bool):
            self.error((*path, key), f"{_show((*path, key))} must be true or false")
            return default
        return value

    def integer(self, tbl: dict[str, Any], key: str, path: Path_, low: int, high: int,
                default: int | None = None) -> int | None:
        if key not in tbl:
            return default
        value = tbl[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.error((*path, key), f"{_show((*path, key))} must be a whole number "
                       f"from {low} to {high}")
            return default
        return value

    def strings(self, tbl: dict[str, Any], key: str, path: Path_,
                shape: re.Pattern[str] | None = None, what: str = "strings") -> tuple[str, ...]:
        if key not in tbl:
            return ()
        value = tbl[key]
        where = _show((*path, key))
        if not isinstance(value, list):
            self.error((*path, key), f"{where} must be a list of {what}")
            return ()
        out: list[str] = []
        for item in value:
            if not isinstance(item, str) or not item.strip():
                self.error((*path, key), f"{where} must be a list of non-empty {what}, "
                           f"not {item!r}")
            elif shape is not None and not shape.match(item):
                self.error((*path, key), f"{where}: {item!r} is not a valid {what[:-1]}")
            else:
                out.append(item.strip())
        return tuple(dict.fromkeys(out))


# -- default.toml -------------------------------------------------------------------------------

_TOP = ("jurisdiction", "hold", "categories", "routing", "patterns")
_CATEGORY = ("description", "sensitivity", "sensitive", "sender_tags", "words",
             "attachment_names")
_PATTERN = ("name", "regex", "why")


def _parse_default(f: _File) -> dict[str, Any] | None:
    if f.data is None:
        return None
    before = len(f.errors)
    top = f.table(f.data, (), _TOP, required=("categories",))
    assert top is not None
    jurisdiction = f.string(top, "jurisdiction", ())
    if jurisdiction is not None and not JURISDICTION_ID.match(jurisdiction):
        f.error(("jurisdiction",), f"jurisdiction {jurisdiction!r} is not a file name "
                "(lower-case letters, digits and -)")

    hold = Hold(30, (3, 7, 21))
    if "hold" in top:
        tbl = f.table(top["hold"], ("hold",), ("lifetime_days", "reminder_days"))
        if tbl is not None:
            lifetime = f.integer(tbl, "lifetime_days", ("hold",), 1, MAX_DAYS, default=30)
            assert lifetime is not None
            reminders: list[int] = []
            raw = tbl.get("reminder_days", [3, 7, 21])
            path = ("hold", "reminder_days")
            if not isinstance(raw, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) for d in raw):
                f.error(path, "hold.reminder_days must be a list of whole numbers of days")
            elif any(not 1 <= d < lifetime for d in raw):
                f.error(path, f"hold.reminder_days must each be from 1 to {lifetime - 1} "
                        f"(before the hold expires after lifetime_days = {lifetime})")
            elif raw != sorted(set(raw)):
                f.error(path, "hold.reminder_days must be in ascending order, each once")
            else:
                reminders = raw
            hold = Hold(lifetime, tuple(reminders))

    categories: dict[str, Category] = {}
    raw_categories = top.get("categories", {})
    if isinstance(raw_categories, dict) and not raw_categories:
        f.error(("categories",), "[categories] defines no category")
    if not isinstance(raw_categories, dict):
        f.error(("categories",), "categories must be tables: [categories.<name>]")
        raw_categories = {}
    for name, value in raw_categories.items():
        category = _parse_category(f, name, value)
        if category is not None:
            categories[name] = category

    routing: dict[str, tuple[str, ...]] = {}
    if "routing" in top:
        tbl = top["routing"]
        if not isinstance(tbl, dict):
            f.error(("routing",), "routing must be a table: [routing]")
            tbl = {}
        for name in tbl:
            if name not in raw_categories:
                f.error(("routing", name), f"routing names category {name!r}, which is not "
                        "defined in [categories]")
                continue
            routing[name] = f.strings(tbl, name, ("routing",), TAG, "recipient tags")

    always: list[Pattern] = []
    suggest: list[Pattern] = []
    if "patterns" in top:
        tbl = f.table(top["patterns"], ("patterns",), ("always", "suggest"))
        seen: set[str] = set()
        for kind, out in (("always", always), ("suggest", suggest)):
            entries = (tbl or {}).get(kind, [])
            if not isinstance(entries, list):
                f.error(("patterns", kind), f"patterns.{kind} must be written [[patterns.{kind}]]")
                continue
            for i, entry in enumerate(entries):
                pattern = _parse_pattern(f, kind, i, entry, seen)
                if pattern is not None:
                    out.append(pattern)

    if len(f.errors) > before:
        return None
    return {"jurisdiction": jurisdiction, "hold": hold, "categories": categories,
            "routing": routing, "always": tuple(always), "suggest": tuple(suggest)}


def _parse_category(f: _File, name: str, value: Any) -> Category | None:
    path: Path_ = ("categories", name)
    if not CATEGORY_NAME.match(name):
        f.error(path, f"category name {name!r} must be lower-case letters, digits and _")
    tbl = f.table(value, path, _CATEGORY, required=("sensitivity", "sensitive"))
    if tbl is None:
        return None
    sensitivity = f.string(tbl, "sensitivity", path)
    if sensitivity is not None and sensitivity != NORMAL and sensitivity not in DS4P_CODES:
        f.error((*path, "sensitivity"), f"sensitivity {sensitivity!r} is not one of "
                f"{', '.join((*DS4P_CODES, NORMAL))}")
    sensitive = f.boolean(tbl, "sensitive", path)
    if sensitivity in DS4P_CODES and sensitive is False:
        f.error((*path, "sensitive"), f"category {name} has sensitivity {sensitivity!r}, "
                "so it must be sensitive = true")
    tags = f.strings(tbl, "sender_tags", path, TAG, "tags")
    words = f.strings(tbl, "words", path, re.compile(r".*\w", re.S), "words")
    globs = f.strings(tbl, "attachment_names", path, None, "patterns")
    return Category(
        name=name,
        description=f.string(tbl, "description", path, default="") or "",
        sensitivity=sensitivity or NORMAL,
        sensitive=bool(sensitive),
        sender_tags=tuple(t.lower() for t in tags),
        words=words,
        attachment_names=globs,
        word_patterns=tuple((w, word_regex(w)) for w in words),
        attachment_patterns=tuple(
            (g, re.compile(fnmatch.translate(g), re.IGNORECASE | re.DOTALL)) for g in globs),
    )


def word_regex(word: str) -> re.Pattern[str]:
    """Whole words, any case, any run of white space between the words of a phrase."""
    body = r"\s+".join(re.escape(part) for part in word.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def _parse_pattern(f: _File, kind: str, i: int, entry: Any, seen: set[str]) -> Pattern | None:
    path: Path_ = ("patterns", kind, i)
    tbl = f.table(entry, path, _PATTERN, required=_PATTERN)
    if tbl is None:
        return None
    name = f.string(tbl, "name", path)
    regex = f.string(tbl, "regex", path)
    why = f.string(tbl, "why", path)
    if name is not None:
        if not PATTERN_NAME.match(name):
            f.error((*path, "name"), f"pattern name {name!r} must be lower-case letters, "
                    "digits and _")
        elif name in seen:
            f.error((*path, "name"), f"pattern name {name!r} is used twice")
        seen.add(name)
    compiled = None
    if regex is not None:
        try:
            compiled = re.compile(regex, re.IGNORECASE)
        except re.error as exc:
            f.error((*path, "regex"), f"regex of pattern {name or i!r} does not compile: {exc}")
        else:
            if compiled.fullmatch(""):
                f.error((*path, "regex"), f"regex of pattern {name or i!r} matches "
                        "empty text")
                compiled = None
    if name is None or compiled is None or why is None or regex is None:
        return None
    return Pattern(name=name, kind=kind, regex=regex, why=why, compiled=compiled)


# -- jurisdictions/*.toml -----------------------------------------------------------------------

_J_TOP = ("name", "extends", "majority_age", "majority_notice_age", "consent_requires_expiry",
          "citation", "categories")
_J_CATEGORY = ("standing_consent", "release_notice", "co_consent_age", "minor_veto", "citation")


def _parse_jurisdictions(
    files: Mapping[str, _File], category_names: set[str] | None
) -> dict[str, Jurisdiction]:
    own: dict[str, dict[str, Any]] = {}
    for jid, f in files.items():
        if f.data is None:
            continue
        if not JURISDICTION_ID.match(jid):
            f.error((), f"file name {jid!r} must be lower-case letters, digits and - "
                    "(it is the name a team file uses)")
        top = f.table(f.data, (), _J_TOP, required=("name",))
        assert top is not None
        values: dict[str, Any] = {
            "name": f.string(top, "name", ()),
            "extends": f.string(top, "extends", ()),
            "majority_age": f.integer(top, "majority_age", (), 1, MAX_AGE),
            "majority_notice_age": f.integer(top, "majority_notice_age", (), 1, MAX_AGE),
            "consent_requires_expiry": f.boolean(top, "consent_requires_expiry", ()),
            "citation": f.string(top, "citation", ()),
            "categories": {},
        }
        raw = top.get("categories", {})
        if not isinstance(raw, dict):
            f.error(("categories",), "categories must be tables: [categories.<name>]")
            raw = {}
        for cat, value in raw.items():
            path: Path_ = ("categories", cat)
            if category_names is not None and cat not in category_names:
                f.error(path, f"category {cat!r} is not defined in {DEFAULT_FILE}")
            tbl = f.table(value, path, _J_CATEGORY)
            if tbl is None:
                continue
            values["categories"][cat] = {
                "standing_consent": f.boolean(tbl, "standing_consent", path),
                "release_notice": f.string(tbl, "release_notice", path),
                "co_consent_age": f.integer(tbl, "co_consent_age", path, 1, MAX_AGE),
                "minor_veto": f.boolean(tbl, "minor_veto", path),
                "citation": f.string(tbl, "citation", path),
            }
        own[jid] = values

    resolved: dict[str, Jurisdiction] = {}
    for jid in own:
        f = files[jid]
        chain = [jid]
        broken = False
        while own.get(chain[-1], {}).get("extends"):
            parent = own[chain[-1]]["extends"]
            if parent in chain:
                f.error(("extends",), "extends loops: " + " -> ".join([*chain, parent]))
                broken = True
                break
            if parent not in files:
                if chain[-1] == jid:
                    f.error(("extends",), f"extends {parent!r}, but there is no "
                            f"{JURISDICTIONS_DIR}/{parent}.toml")
                broken = True
                break
            if parent not in own:  # that file has a syntax error, reported there
                broken = True
                break
            chain.append(parent)
        if broken:
            continue
        merged: dict[str, Any] = {"categories": {}}
        for link in reversed(chain):
            for key, value in own[link].items():
                if key == "categories":
                    for cat, rule in value.items():
                        slot = merged["categories"].setdefault(cat, {})
                        slot.update({k: v for k, v in rule.items() if v is not None})
                elif value is not None:
                    merged[key] = value
        majority = merged.get("majority_age")
        if majority is None:
            f.error(("name",), "majority_age is set neither here nor in a file it extends")
            continue
        notice = merged.get("majority_notice_age")
        if notice is not None and notice >= majority:
            f.error(("majority_notice_age",), f"majority_notice_age ({notice}) must be below "
                    f"majority_age ({majority})")
        rules: dict[str, CategoryRule] = {}
        for cat, rule in merged["categories"].items():
            path = ("categories", cat)
            age = rule.get("co_consent_age")
            if age is not None and age >= majority:
                f.error((*path, "co_consent_age"), f"co_consent_age ({age}) for {cat} must be "
                        f"below majority_age ({majority})")
            if rule.get("minor_veto") and age is None:
                f.error((*path, "minor_veto"), f"minor_veto for {cat} needs a co_consent_age")
            rules[cat] = CategoryRule(
                standing_consent=rule.get("standing_consent", True),
                release_notice=rule.get("release_notice"),
                co_consent_age=age,
                minor_veto=rule.get("minor_veto", False),
                citation=rule.get("citation"),
            )
        resolved[jid] = Jurisdiction(
            id=jid,
            name=merged.get("name") or jid,
            extends=tuple(chain[1:]),
            majority_age=majority,
            majority_notice_age=notice,
            consent_requires_expiry=bool(merged.get("consent_requires_expiry", False)),
            citation=merged.get("citation"),
            categories=MappingProxyType(rules),
        )
    return resolved
