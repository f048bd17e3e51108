"""Parse the parent's e-mail reply into commands.

Strict on purpose: the only way to get ``Approve`` is a line that is exactly ``APPROVE``
(any case, optionally followed by ``.`` or ``!``). Every other line must be a readable
command or part of a short sign-off, or it is reported as a problem; a reply with any
problem must change nothing (``broker.review.decisions.decide`` enforces that).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# --- commands -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Approve:
    """Release as shown (or as last previewed)."""


@dataclass(frozen=True)
class Deny:
    """Never release."""


@dataclass(frozen=True)
class Redact:
    """Remove paragraphs by id and phrases everywhere."""

    ids: tuple[str, ...] = ()  # "2", "A1.3"; ranges already expanded
    phrases: tuple[str, ...] = ()  # whitespace-normalised, as typed otherwise
    pages: tuple[str, ...] = ()  # whole pages of a PDF attachment: "A1 p.2"


@dataclass(frozen=True)
class Drop:
    """Leave attachments out."""

    labels: tuple[str, ...]  # "A2"


@dataclass(frozen=True)
class To:
    """Release only to these team members (addresses lower-cased, tags lower-cased)."""

    addresses: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Note:
    """The parent's note shown on top of what recipients get."""

    text: str


@dataclass(frozen=True)
class Help:
    """Send the command help back."""


@dataclass(frozen=True)
class Revoke:
    """Revoke the consent on file a record went out under automatically (answer to the
    FYI copy of an automatic release)."""


Command = Approve | Deny | Redact | Drop | To | Note | Help | Revoke


@dataclass(frozen=True)
class ParseResult:
    """Commands found, problems (each quoting the line), and sign-off lines ignored."""

    commands: tuple[Command, ...]
    problems: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return bool(self.commands) and not self.problems


# --- parsing --------------------------------------------------------------------------------

KEYWORDS = ("approve", "deny", "redact", "drop", "to", "note", "help", "revoke")
_BARE = {"approve": Approve, "deny": Deny, "help": Help, "revoke": Revoke}

# First ASCII word of a line, and what follows it.
_LEAD = re.compile(r"([A-Za-z]+)(.*)", re.S)
# A byte order mark at the very start of the text is an encoding artefact, not content.
_BOM = "\ufeff"
# Invisible characters that are not format (Cf) or control (Cc) characters: Hangul fillers,
# the combining grapheme joiner, the braille blank and the Mongolian vowel separator.
_INVISIBLE_EXTRA = frozenset("\u115f\u1160\u3164\uffa0\u034f\u2800\u180e")
# Variation selectors: invisible, and only legitimate after a non-ASCII character (emoji).
_VARIATION_SELECTORS = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]")
_QUOTED = re.compile(r"[\"“”„](.*?)[\"“”]", re.S)
_QUOTE_CHARS = re.compile(r"[\"“”„]")
_DASH = re.compile(r"\s*[-‐‑–—]\s*")  # hyphen and dash look-alikes
_SEPARATORS = re.compile(r"[\s,;]+")
# ASCII digits only: a fullwidth or Arabic-Indic digit is not silently read as a number.
_BODY_ID = re.compile(r"([0-9]+)")
_ATT_ID = re.compile(r"a([0-9]+)\.([0-9]+)", re.I)
_BODY_RANGE = re.compile(r"([0-9]+)-([0-9]+)")
_ATT_RANGE = re.compile(r"a([0-9]+)\.([0-9]+)-(?:a([0-9]+)\.)?([0-9]+)", re.I)
_LABEL = re.compile(r"a([0-9]+)", re.I)
# A whole page of a PDF attachment: "A1 p.2", "A1 p2", "A1 page 2", "A1 p.2-3".
_PAGE = re.compile(r"(?<![\w.])a([0-9]+)\s*(?:p\.?|pages?)\s*([0-9]+)(?:-([0-9]+))?(?![\w.])",
                   re.I)
_EMAIL = re.compile(r"[^@\s<>(),;:\"]+@[^@\s<>(),;:\"]+\.[^@\s<>(),;:\"]+")
_TAG = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_MAILTO = re.compile(r"<\s*mailto:([^>]*)>", re.I)

_MAX_RANGE = 500
_SIGNOFF_LINES = 3
_SIGNOFF_WIDTH = 40
# A sign-off line containing one of these words may be an instruction, so it is never ignored.
_SIGNOFF_STOP = frozenset(
    {
        "approve", "approved", "approving", "deny", "denied", "redact", "redacted", "drop",
        "dropped", "not", "no", "nor", "never", "don't", "dont", "n't", "but", "except", "only",
        "unless", "without", "instead", "wait", "hold", "stop", "cancel", "remove", "delete",
        "share", "release", "forward",
    }
)  # fmt: skip
_SIGNOFF_STEMS = ("approv", "deny", "deni", "redact", "drop", "note", "help", "revok")
_ID_FILLER = frozenset({"and", "&", "paragraph", "paragraphs"})
_LABEL_FILLER = frozenset({"and", "&", "attachment", "attachments"})


def _quote(line: str) -> str:
    """Quote a line for a problem message, shortened so a pasted essay stays readable;
    hidden characters are written out as <U+XXXX>."""
    return f'"{show_hidden(line if len(line) <= 100 else line[:97] + "...")}"'


def _unreadable(line: str) -> str:
    return f"I could not read this line: {_quote(line)}"


def _unreadable_or_lookalike(line: str) -> str:
    if _deceptive(line, all_words=True):
        return _lookalike_problem(line)
    return _unreadable(line)


# --- look-alikes and hidden characters ------------------------------------------------------
#
# Nothing is normalised into a command: a line with an invisible or direction-changing
# character, or whose command word is spelt with look-alike letters, is a problem that
# quotes the line (hidden characters made visible) and asks for it to be typed plainly.

LOOKALIKE = (
    "this line contains characters that look like letters but are not; type the command plainly"
)

# Letters of other scripts that look like the Latin letters of the command words.
_CONFUSABLE = str.maketrans(
    {
        # Cyrillic
        "А": "A", "а": "a", "В": "B", "в": "b", "Е": "E", "е": "e", "К": "K", "к": "k",
        "М": "M", "м": "m", "Н": "H", "н": "h", "О": "O", "о": "o", "Р": "P", "р": "p",
        "С": "C", "с": "c", "Т": "T", "т": "t", "У": "Y", "у": "y", "Х": "X", "х": "x",
        "Ѕ": "S", "ѕ": "s", "І": "I", "і": "i", "Ј": "J", "ј": "j", "Ԁ": "D", "ԁ": "d",
        "Ԛ": "Q", "ԛ": "q", "Ԝ": "W", "ԝ": "w", "Ѵ": "V", "ѵ": "v", "Һ": "H", "һ": "h",
        "Ӏ": "l", "ӏ": "l", "Ү": "Y", "ү": "y", "Ь": "b", "п": "n", "г": "r", "ѡ": "w",
        "Ԍ": "G", "ԍ": "g", "Ԓ": "N",
        # Greek
        "Α": "A", "α": "a", "Β": "B", "Ε": "E", "ε": "e", "Ζ": "Z", "Η": "H", "Ι": "I",
        "ι": "i", "Κ": "K", "κ": "k", "Μ": "M", "Ν": "N", "ν": "v", "Ο": "O", "ο": "o",
        "Ρ": "P", "ρ": "p", "Τ": "T", "τ": "t", "Υ": "Y", "υ": "u", "Χ": "X", "χ": "x",
        "ϲ": "c", "Ϲ": "C", "ϳ": "j",
        # Latin and others
        "ı": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g", "ʟ": "l", "ℓ": "l", "ǀ": "l", "ɴ": "n",
        "ʀ": "r", "ᴅ": "d", "ᴇ": "e", "ᴘ": "p", "ᴏ": "o", "ᴠ": "v", "ᴀ": "a", "ʜ": "h",
        "օ": "o", "ս": "u", "ո": "n", "հ": "h", "ց": "g",
        "Ꭺ": "A", "Ꭼ": "E", "Ꮲ": "P", "Ꮢ": "R", "Ꮩ": "V", "Ꭰ": "D", "Ꮃ": "W", "Ꭲ": "T",
        "Ꮋ": "H", "Ꮮ": "L", "Ꮪ": "S", "Ꮓ": "Z", "Ꮯ": "C", "Ꮐ": "G",
    }
)  # fmt: skip
_LOOKALIKE_STEMS = (*KEYWORDS, "approv", "deni")


def is_hidden(ch: str) -> bool:
    """True for a character a reader cannot see: format (zero-width, bidi, BOM, soft
    hyphen, tag characters), control (other than tab) and a few invisible letters."""
    cat = unicodedata.category(ch)
    return cat == "Cf" or (cat == "Cc" and ch != "\t") or ch in _INVISIBLE_EXTRA


def _has_hidden(line: str) -> bool:
    if any(is_hidden(ch) for ch in line):
        return True
    # A variation selector after an ASCII character changes nothing visible.
    return any(
        m.start() > 0 and line[m.start() - 1].isascii() for m in _VARIATION_SELECTORS.finditer(line)
    )


def _only_invisible(line: str) -> bool:
    """A line of nothing but whitespace and hidden characters reads as a blank line."""
    return all(ch.isspace() or is_hidden(ch) or _VARIATION_SELECTORS.fullmatch(ch) for ch in line)


def _skeleton(word: str) -> str:
    """What a word looks like in plain ASCII: compatibility forms unfolded (fullwidth,
    mathematical letters), accents dropped, look-alike letters replaced, case folded."""
    decomposed = unicodedata.normalize("NFKD", word)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return bare.translate(_CONFUSABLE).casefold()


def _words(line: str) -> list[str]:
    """Runs of letters and combining marks (so "A\u0301PPROVE" is one word)."""
    words: list[str] = []
    current: list[str] = []
    for ch in line:
        if unicodedata.category(ch)[0] in "LM":
            current.append(ch)
        elif current:
            words.append("".join(current))
            current = []
    if current:
        words.append("".join(current))
    return words


def _lookalike_word(word: str) -> bool:
    """A word that is not plain ASCII but reads as a command word."""
    return not word.isascii() and _skeleton(word).startswith(_LOOKALIKE_STEMS)


def _deceptive(line: str, *, all_words: bool) -> bool:
    """Hidden characters anywhere, or a command word spelt with look-alike letters: the
    first word of a line (a command line's keyword), or any word (other lines)."""
    if _has_hidden(line):
        return True
    stripped = line.lstrip()
    words = _words(stripped)
    if not all_words:
        first = words[:1] if stripped and unicodedata.category(stripped[0])[0] in "LM" else []
        return any(_lookalike_word(w) for w in first)
    return any(_lookalike_word(w) for w in words)


def show_hidden(line: str) -> str:
    """The line with every hidden character written as <U+XXXX>, so the parent sees it."""
    out = []
    for ch in line:
        if is_hidden(ch) or (_VARIATION_SELECTORS.fullmatch(ch) is not None):
            out.append(f"<U+{ord(ch):04X}>")
        else:
            out.append(ch)
    return "".join(out)


def _lookalike_problem(line: str) -> str:
    return f"{LOOKALIKE[0].upper()}{LOOKALIKE[1:]}: {_quote(line)}"


def _clean_lines(reply_text: str) -> list[str]:
    text = reply_text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.removeprefix(_BOM)
    return ["" if _only_invisible(line) else line.strip() for line in text.split("\n")]


def _keyword(line: str) -> tuple[str, str] | None:
    """(keyword, rest) if the line's first word is exactly a command keyword."""
    if _deceptive(line, all_words=False):
        return None
    m = _LEAD.match(line)
    if m is None or m.group(1).lower() not in KEYWORDS:
        return None
    return m.group(1).lower(), m.group(2)


def _looks_like_instruction(line: str) -> bool:
    """True if a would-be sign-off line could be an instruction (so it must not be ignored)."""
    if _deceptive(line, all_words=True):
        return True
    words = re.findall(r"[\w'’]+", _skeleton(line).replace("’", "'"))
    if words and (words[0] == "to" or words[0].startswith(_SIGNOFF_STEMS)):
        return True
    return any(w in _SIGNOFF_STOP or w.endswith("n't") for w in words)


def parse_commands(reply_text: str) -> ParseResult:
    """Read the parent's reply (already stripped of quoted text) into commands.

    One command per line; blank lines are skipped. A short sign-off after the last
    command and a blank line is ignored; every other unreadable line is a problem.
    """
    lines = _clean_lines(reply_text)
    last = max((i for i, line in enumerate(lines) if line and _keyword(line)), default=-1)

    commands: list[Command] = []
    problems: list[str] = []
    ignored: list[str] = []
    for line in lines[: last + 1]:
        if not line:
            continue
        found = _keyword(line)
        if found is None:
            problems.append(_unreadable_or_lookalike(line))
            continue
        if _deceptive(line, all_words=False):  # hidden characters after the keyword
            problems.append(_lookalike_problem(line))
            continue
        result = _parse_line(line, *found)
        if isinstance(result, str):
            problems.append(result)
        else:
            commands.append(result)

    tail = [line for line in lines[last + 1 :] if line]
    if tail:
        separated = last >= 0 and not lines[last + 1]
        if (
            commands
            and separated
            and len(tail) <= _SIGNOFF_LINES
            and all(len(t) <= _SIGNOFF_WIDTH and not _looks_like_instruction(t) for t in tail)
        ):
            ignored.extend(tail)
        else:
            problems.extend(_unreadable_or_lookalike(t) for t in tail)

    merged = _merge(commands)
    if not merged and not problems:
        problems.append("I found no command in your reply.")
    problems.extend(_conflicts(merged))
    return ParseResult(tuple(merged), tuple(problems), tuple(ignored))


def _parse_line(line: str, keyword: str, rest: str) -> Command | str:
    """One command from one line, or a problem message quoting the line."""
    if keyword in _BARE:
        if re.fullmatch(r"[.!]*", rest):
            return _BARE[keyword]()
        return f"{keyword.upper()} must be alone on its line. {_unreadable(line)}"
    if rest and not (rest[0].isspace() or rest[0] == ":"):
        return _unreadable(line)
    args = rest.lstrip(": \t").strip()
    if not args:
        return f"{keyword.upper()} needs something after it. {_unreadable(line)}"
    if keyword == "note":
        return Note(args)
    if keyword == "redact":
        return _parse_redact(line, args)
    if keyword == "drop":
        return _parse_drop(line, args)
    return _parse_to(line, args)


def _tokens(text: str, filler: frozenset[str]) -> list[str]:
    return [t for t in _SEPARATORS.split(text) if t and t.lower() not in filler]


def _strip_brackets(token: str) -> str:
    return token.strip("[]()")


def _parse_redact(line: str, args: str) -> Redact | str:
    phrases: list[str] = []
    for m in _QUOTED.finditer(args):
        phrase = " ".join(m.group(1).split())
        if not phrase:
            return f"An empty phrase cannot be removed. {_unreadable(line)}"
        phrases.append(phrase)
    rest = _QUOTED.sub(" ", args)
    if _QUOTE_CHARS.search(rest):
        return f"A quoted phrase is missing its closing quote. {_unreadable(line)}"
    pages: list[str] = []
    for m in _PAGE.finditer(_DASH.sub("-", rest)):
        att, lo = int(m.group(1)), int(m.group(2))
        hi = int(m.group(3)) if m.group(3) else lo
        if hi < lo or hi - lo >= _MAX_RANGE:
            return f"The page range {m.group(0).strip()} is not usable. {_unreadable(line)}"
        pages.extend(f"A{att} p.{n}" for n in range(lo, hi + 1))
    rest = _PAGE.sub(" ", _DASH.sub("-", rest))
    ids: list[str] = []
    for raw in _tokens(_DASH.sub("-", rest), _ID_FILLER):
        token = _strip_brackets(raw).rstrip(".")
        expanded = _expand_id(token)
        if isinstance(expanded, str):
            return f"{expanded} {_unreadable(line)}"
        ids.extend(expanded)
    if not ids and not phrases and not pages:
        return f"REDACT needs paragraph numbers or a quoted phrase. {_unreadable(line)}"
    return Redact(ids=_dedupe(ids), phrases=_dedupe(phrases, key=str.casefold),
                  pages=_dedupe(pages))


def _expand_id(token: str) -> list[str] | str:
    """Paragraph ids for one token ("2", "A1.3", "2-4", "A1.2-4"), or a problem."""
    if not token.isascii():
        return f"{_quote(token)}: {LOOKALIKE}."
    if m := _BODY_ID.fullmatch(token):
        return [str(int(m.group(1)))]
    if m := _ATT_ID.fullmatch(token):
        return [f"A{int(m.group(1))}.{int(m.group(2))}"]
    if m := _BODY_RANGE.fullmatch(token):
        return _range("", int(m.group(1)), int(m.group(2)), token)
    if m := _ATT_RANGE.fullmatch(token):
        att = int(m.group(1))
        if m.group(3) is not None and int(m.group(3)) != att:
            return f"A range must stay inside one attachment ({token})."
        return _range(f"A{att}.", int(m.group(2)), int(m.group(4)), token)
    return f"{_quote(token)} is not a paragraph number."


def _range(prefix: str, lo: int, hi: int, token: str) -> list[str] | str:
    if hi < lo:
        return f"The range {token} runs backwards."
    if hi - lo >= _MAX_RANGE:
        return f"The range {token} is too long."
    return [f"{prefix}{n}" for n in range(lo, hi + 1)]


def _parse_drop(line: str, args: str) -> Drop | str:
    labels: list[str] = []
    for raw in _tokens(args, _LABEL_FILLER):
        token = _strip_brackets(raw).rstrip(".")
        if not token.isascii():
            return _lookalike_problem(line)
        m = _LABEL.fullmatch(token)
        if m is None:
            return f"{_quote(token)} is not an attachment label like A2. {_unreadable(line)}"
        labels.append(f"A{int(m.group(1))}")
    if not labels:
        return f"DROP needs attachment labels like A2. {_unreadable(line)}"
    return Drop(_dedupe(labels))


def _parse_to(line: str, args: str) -> To | str:
    addresses: list[str] = []
    tags: list[str] = []
    tokens = _tokens(_MAILTO.sub(r" \1 ", args), frozenset({"and", "&"}))
    i = 0
    while i < len(tokens):
        token = tokens[i].strip("<>[]()").rstrip(".")
        i += 1
        if token.lower().startswith("mailto:"):
            token = token[7:]
        if token.lower().startswith("tag:"):
            tag = token[4:].lower()
            if not tag and i < len(tokens):  # "tag: ot"
                tag = tokens[i].strip("<>[]()").rstrip(".").lower()
                i += 1
            if not _TAG.fullmatch(tag):
                return f"{_quote(token)} is not a tag like tag:ot. {_unreadable(line)}"
            tags.append(tag)
        elif not token.isascii():
            return _lookalike_problem(line)
        elif _EMAIL.fullmatch(token):
            addresses.append(token.lower())
        else:
            return f"{_quote(token)} is not an e-mail address or tag:name. {_unreadable(line)}"
    return To(addresses=_dedupe(addresses), tags=_dedupe(tags))


def _dedupe(items: Iterable[str], key: Callable[[str], str] | None = None) -> tuple[str, ...]:
    """Keep the first of equal items, in order."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        k = key(item) if key is not None else item
        if k not in seen:
            seen.add(k)
            out.append(item)
    return tuple(out)


def _merge(commands: Sequence[Command]) -> list[Command]:
    """Drop repeated bare commands; join NOTE lines (newline) into the first NOTE."""
    out: list[Command] = []
    notes = [c.text for c in commands if isinstance(c, Note)]
    for c in commands:
        if isinstance(c, Note):
            if not any(isinstance(o, Note) for o in out):
                out.append(Note("\n".join(notes)))
        elif isinstance(c, Approve | Deny | Help | Revoke):
            if c not in out:
                out.append(c)
        else:
            out.append(c)
    return out


def _conflicts(commands: Sequence[Command]) -> list[str]:
    kinds = {type(c) for c in commands}
    if Revoke in kinds and len(kinds) > 1:
        return ["REVOKE cannot be combined with other commands; send REVOKE alone."]
    if Deny in kinds and len(kinds) > 1:
        return ["DENY cannot be combined with other commands; send DENY alone to refuse."]
    if Help in kinds and Approve in kinds:
        return ["APPROVE and HELP cannot be combined; nothing was approved."]
    if Help in kinds and len(kinds) > 1:
        return ["HELP cannot be combined with other commands; send HELP alone for the help."]
    return []


# --- summaries ------------------------------------------------------------------------------


def join_words(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c' - for sentences the parent reads."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def summarize(commands: Iterable[Command]) -> list[str]:
    """One plain-English line per command, for previews and confirmations."""
    lines: list[str] = []
    for c in commands:
        if isinstance(c, Approve):
            lines.append("Release as shown")
        elif isinstance(c, Deny):
            lines.append("Do not release this record")
        elif isinstance(c, Help):
            lines.append("Send the list of commands")
        elif isinstance(c, Redact):
            if c.ids:
                word = "paragraph" if len(c.ids) == 1 else "paragraphs"
                lines.append(f"Remove {word} {join_words(list(c.ids))}")
            lines.extend(f'Remove "{p}" everywhere it appears' for p in c.phrases)
            lines.extend(f"Remove page {p.split(' p.')[1]} of attachment {p.split(' ')[0]}"
                         for p in c.pages)
        elif isinstance(c, Drop):
            word = "attachment" if len(c.labels) == 1 else "attachments"
            lines.append(f"Leave out {word} {join_words(list(c.labels))}")
        elif isinstance(c, To):
            who = list(c.addresses) + [f"everyone tagged {t}" for t in c.tags]
            lines.append(f"Send only to {join_words(who)}")
        elif isinstance(c, Note):
            lines.append(f'Add your note: "{c.text.replace(chr(10), " / ")}"')
    return lines
