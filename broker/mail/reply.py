"""Reply extraction: the new text a parent typed above (or below) the quoted original.

Parents answer review requests from whatever client they have, in whatever
language it is set to; the commands they type are only the *new* text, so we
must drop the quoted request, the client's "On ... wrote:" attribution line
(often wrapped over several lines), Outlook's ``From:/Sent:/To:`` block,
``-----Original Message-----`` and forwarded-message headers, and the
signatures and "Sent from my iPhone" lines that clients append.

How it works (a pure function over text, no I/O):

1. Normalise line endings; mark fenced code blocks as plain text.
2. Classify every line with one letter: ``e`` empty, ``q`` quoted (``>``,
   ``Name>``), ``m`` start of an embedded message (attribution line, possibly
   spanning several lines; separator such as "Original Message"; the first
   line of a header block), ``f`` further lines of such a header block,
   ``d`` delimiter (``--``, ``____``, Gmail's invisible signature marker...),
   ``s`` a client boilerplate signature line, ``t`` text.
3. Apply cutting rules to that string of letters (the technique of Discourse's
   email_reply_trimmer, re-implemented here as linear scans): cut at the first
   delimiter, drop boilerplate lines, keep the text
   written *below* a leading quote, cut at an embedded message that ends the
   mail, drop a trailing quote, and drop any attribution lines left inside an
   interleaved reply.

email-reply-parser's own splitter (English "On ... wrote:" only, and a signature
rule that eats lines such as ``-Bob``) reached 28 of the 64 Discourse cases, so
it is not used for the text path; see ``bench/reply_accuracy.py``.

A reply that is *only* quoted text (no new line at all) gives ``""``: it cannot
carry a decision, and treating quoted lines as commands would let the quoted
review request approve itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage, Message

from lxml.html import HtmlElement, tostring

from broker.mail.html import parse_html, remove_hidden, tree_to_text

__all__ = [
    "ReplyText",
    "extract_reply",
    "extract_reply_from_html",
    "extract_reply_from_message",
    "remove_html_quote",
]

# --------------------------------------------------------------------------
# Line classification
# --------------------------------------------------------------------------

# Words that open a localised attribution line ("On <date> X wrote:",
# "Am <date> schrieb X:", "Le <date>, X a écrit :", ...). Always followed by a
# date, so the start rules below also demand a digit.
_LEAD = r"(?:On|At|Am|Le|El|Em|Op|Il|Den|Dnia|W\s+dniu|På|Pe|Dne|Dňa|在)"
# The verb of an attribution line, in the languages parents write in.
_VERB = (
    r"(?:wrote|writes|has\s+written|schrieb|geschrieben|a\s+écrit|escribió|escreveu|"
    r"ha\s+scritto|scrisse|napisał\(a\)|napisała?|написал\(а\)|написала?|написав|"
    r"пише|пишет|skrev|schreef|geschreven|kirjoitti|írta|yazdı|napsal\(a\)|napsal|"
    r"skrifaði|写道|寫道|書きました|작성)"
)
_DAY_NAMES = (
    r"(?:(?:mon|tue|tues|wed|thu|thur|thurs|fri|sat|sun)(?:day|sday|nesday|rsday|urday)?"
    r"|lun|mar|mer|jeu|ven|sam|dim|lundi|mardi|mercredi|jeudi|vendredi|samedi|dimanche"
    r"|montag|dienstag|mittwoch|donnerstag|freitag|samstag|sonntag"
    r"|(?:mo|di|mi|do|fr|sa|so)(?=[.,])"
    r"|понедельник|вторник|среда|четверг|пятница|суббота|воскресенье|пн|вт|ср|чт|пт|сб|вс"
    r"|понеділок|вівторок|середа|четвер|п[ʼ']ятниця|субота|неділя)\.?,?\s"
)

# Each attribution form is a conjunction of small, linear-time tests rather than
# one expression with several ".*": those backtrack cubically on a long line
# full of digits and verbs, and every line of every reply goes through here.
_LEAD_RE = re.compile(rf"^{_LEAD}\s", re.IGNORECASE)
_ZOHO_RE = re.compile(rf"^-+\s*{_LEAD}\s", re.IGNORECASE)
_VERB_RE = re.compile(_VERB, re.IGNORECASE)
_VERB_AT_END_RE = re.compile(rf"{_VERB}\s*[:：]$", re.IGNORECASE)
_VERB_THEN_DASHES_RE = re.compile(rf"{_VERB}\s*-+$", re.IGNORECASE)
_VERB_THEN_DATE_RE = re.compile(rf"\s{_VERB}\s+(?:am|on|le|el)\s", re.IGNORECASE)
_DATE_START_RE = re.compile(r"^\d{1,4}(?:[./\-年]|\s+\S)")
_DAY_START_RE = re.compile(rf"^{_DAY_NAMES}", re.IGNORECASE)
_TIME_RE = re.compile(r"\d{1,2}[:.h]\d{2}")
_DIGIT_RE = re.compile(r"\d")
_EMAIL_RE = re.compile(r"[^\s<>@\"]+@[\w-]+(?:\.[\w-]+)+")
_GMAIL_ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}\s+\d{1,2}:\d{2}\s+GMT[+-]\d{1,2}:?\d{2}\b")
_GMAIL_SLASH_RE = re.compile(r"^\d{4}/\d{1,2}/\d{1,2}\s")
_CHINESE_RE = re.compile(r"^在.*?(?:写道|寫道)\s*[:：]?$")


def _ends_with_address(line: str) -> bool:
    """``... <x@y.z>:`` or ``... x@y.z>`` - the last token is a mail address."""
    tokens = line.rstrip(":： ").split()
    return bool(tokens) and _EMAIL_RE.fullmatch(tokens[-1].strip("<>\"'()[]")) is not None


def _attribution_form(line: str) -> str | None:
    """Name of the attribution form ``line`` (whitespace-normalised) has, else None."""
    colon = line.endswith((":", "："))
    has_digit = _DIGIT_RE.search(line) is not None
    # "On <date>, X wrote:" and its translations: lead word, a digit, the verb,
    # a colon at the end (German and Norwegian put the verb before the name).
    if colon and has_digit and _LEAD_RE.match(line) and _VERB_RE.search(line):
        return "on-date-wrote"
    # "---- On <date> X wrote ----" (Zoho).
    if has_digit and _ZOHO_RE.match(line) and _VERB_THEN_DASHES_RE.search(line):
        return "zoho"
    # "<date> X <mail> napisał(a):", "X <mail> wrote:", "X via List <mail> schrieb:",
    # "понедельник, 6 октября 2014 г. пользователь X написал:" - it must open with
    # a date or a day name, or hold an address: "NOTE in 2019 the therapist
    # wrote:" is a parent's text.
    if _VERB_AT_END_RE.search(line) and (
        _DATE_START_RE.match(line)
        or (_DAY_START_RE.match(line) and has_digit)
        or _EMAIL_RE.search(line)
    ):
        return "someone-wrote"
    # "X <mail> schrieb am Fr., 28. Apr. 2017 um 11:53 Uhr:"
    if colon and has_digit and _EMAIL_RE.search(line) and _VERB_THEN_DATE_RE.search(line):
        return "wrote-on-date"
    # Webmail without a verb: "26.06.2014, 14:41, "X" <mail>:" (Yandex),
    # "Thu, 26 Jun 2014 14:00:51 +0400 от X <mail>:" (Mail.ru),
    # "2016-10-24 15:36 GMT+02:00 X <mail>:" (old Gmail).
    if (
        colon
        and (_DATE_START_RE.match(line) or _DAY_START_RE.match(line))
        and _TIME_RE.search(line)
        and _ends_with_address(line)
    ):
        return "date-address"
    # Old Gmail without a colon: "2016-03-03 17:21 GMT+01:00 Some One".
    if _GMAIL_ISO_RE.match(line):
        return "gmail-iso-date"
    # Older Gmail: "2013/7/20 X via List <mail>".
    if _GMAIL_SLASH_RE.match(line) and _ends_with_address(line) and line.rstrip(":").endswith(">"):
        return "gmail-slash-date"
    # Chinese clients: "在 2016年12月12日 ... 写道："
    if _CHINESE_RE.match(line):
        return "chinese"
    return None


def _may_start_attribution(line: str) -> bool:
    """Whether ``line`` may open an attribution that the client wrapped.

    Kept narrow (lead word and a digit, a date, or an address with the verb) so
    that a command line followed by an attribution is never swallowed into it.
    """
    line = line.lstrip("-").strip()
    return bool(
        (_LEAD_RE.match(line) and _DIGIT_RE.search(line))
        or _DATE_START_RE.match(line)
        or ("@" in line and _VERB_RE.search(line))
    )


_ATTRIBUTION_WINDOW = 6  # lines
_ATTRIBUTION_MAX_LEN = 400  # characters once joined

_SEPARATOR_RES: tuple[re.Pattern[str], ...] = (
    re.compile(
        r"^[\s*_]*[-=_]{2,}\s*(?:original\s+message|forwarded\s+message|reply\s+message|"
        r"ursprüngliche\s+nachricht|weitergeleitete\s+nachricht|originalnachricht|"
        r"mensaje\s+original|mensaje\s+reenviado|message\s+d'origine|message\s+original|"
        r"message\s+transféré|messaggio\s+originale|messaggio\s+inoltrato|"
        r"oorspronkelijk\s+bericht|origineel\s+bericht|doorgestuurd\s+bericht|"
        r"originalmeddelande|vidarebefordrat\s+meddelande|opprinnelig\s+melding|"
        r"videresendt\s+melding|oprindelig\s+meddelelse|wiadomość\s+oryginalna|"
        r"oryginalna\s+wiadomość|przekazana\s+wiadomość|mensagem\s+original|"
        r"mensagem\s+encaminhada|исходное\s+сообщение|пересылаемое\s+сообщение|"
        r"пересланное\s+сообщение|оригінальне\s+повідомлення|"
        r"переслане\s+повідомлення|原始邮件|原始郵件|转发邮件|轉寄郵件)"
        r"\s*[-=_]{2,}[\s*_]*$",
        re.IGNORECASE,
    ),
    re.compile(
        r"^\s*(?:begin\s+forwarded\s+message|anfang\s+der\s+weitergeleiteten\s+nachricht|"
        r"début\s+du\s+message\s+réexpédié|inicio\s+del\s+mensaje\s+reenviado|"
        r"início\s+da\s+mensagem\s+reencaminhada)\s*:",
        re.IGNORECASE,
    ),
)

# "Key: value" lines of an embedded header block (Outlook, Apple, Gmail forward).
_HEADER_LINE = re.compile(r"^\s*[*_]*\s*([^\W\d_][^:：*]{0,24}?)\s*[*_]*\s*[:：]\s*[*_]*(.*)$")
_FROM_KEYS = frozenset(
    [
        "from",
        "von",
        "de",
        "da",
        "van",
        "från",
        "fra",
        "od",
        "от",
        "від",
        "expéditeur",
        "remitente",
        "mittente",
        "afzender",
        "lähettäjä",
        "feladó",
        "kimden",
        "发件人",
        "寄件者",
        "差出人",
    ]
)
_OTHER_KEYS = frozenset(
    [
        "sent",
        "date",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "gesendet",
        "an",
        "betreff",
        "datum",
        "kopie",
        "envoyé",
        "à",
        "objet",
        "enviado",
        "para",
        "asunto",
        "fecha",
        "inviato",
        "a",
        "oggetto",
        "data",
        "risposta",
        "skickat",
        "till",
        "ämne",
        "kopia",
        "sendt",
        "til",
        "emne",
        "dato",
        "verzonden",
        "aan",
        "onderwerp",
        "wysłano",
        "do",
        "temat",
        "dw",
        "отправлено",
        "кому",
        "тема",
        "дата",
        "копия",
        "надіслано",
        "копія",
        "发送时间",
        "收件人",
        "主题",
        "日期",
        "抄送",
        "傳送時間",
        "收件者",
        "主旨",
        "副本",
        "送信日時",
        "宛先",
        "件名",
        "enviada",
        "assunto",
        "cópia",
        "lähetetty",
        "vastaanottaja",
        "aihe",
        "elküldve",
        "címzett",
        "tárgy",
    ]
)
_HEADER_KEYS = _FROM_KEYS | _OTHER_KEYS
_HEADER_BLOCK_MAX = 15  # lines a header block may run before its blank line

# Lines made of separator characters only ("--", "-- ", "____", "***", "####",
# "~~~~", "====", "++++") and Gmail's invisible signature marker U+1427.
_DELIMITER = re.compile(r"^\s*(?:[-_=*#~+]{2,}|\u1427)\s*$")

_QUOTE = re.compile(r"^\s*(?:>|[A-Za-z]{1,10}>(?!>))")
_FENCE = re.compile(r"^\s*(?:```|~~~)")

# Client boilerplate, matched on whole lines only.
_SIGNATURE_RES: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^\s*[(<]*\s*sent\s+(?:from|with|via|by|using|on)\s.{1,200}$",
        r"^\s*from\s+my\s+(?:iphone|ipad|ipod|android|mobile|phone|blackberry|samsung|"
        r"galaxy|smartphone|tablet)\b.*$",
        r"^\s*\S+\s+from\s+(?:my\s+)?mobile\s*$",
        r"^\s*get\s+\[?outlook\s+for\s+(?:ios|android).*$",
        r"^\s*envoyé\s+(?:de|depuis)\s+(?:mon|ma)\s.*$",
        r"^\s*(?:von\s+meinem|gesendet\s+(?:von|mit)\s).*$",
        r"^\s*diese\s+nachricht\s+wurde\s+von\s+meinem\s.*gesendet\.?\s*$",
        r"^\s*(?:verzonden|verstuurd)\s+(?:met|vanaf|van|via)\s.*$",
        r"^\s*enviado\s+(?:desde|de|do|a\s+partir\s+do)\s+(?:mi|meu|o\s+meu|my)\s.*$",
        r"^\s*inviato\s+da\s.*$",
        r"^\s*(?:skickat|skickades)\s+från\s.*$",
        r"^\s*sendt\s+fra\s.*$",
        r"^\s*wysłane\s+z\s.*$",
        r"^\s*(?:отправлено|надіслано)\s+(?:с|з|из)\s.*$",
        r"^\s*(?:从我的|從我的|发自我的|發自我的).*$",
    )
)

# Cutting rules work on the string of line kinds (one letter per line). They are
# written as scans rather than regular expressions over that string: the
# natural expressions (e.g. "te*m[^q]*$") backtrack quadratically, and a mail
# of 20,000 lines must not stall the pipeline worker.
_INLINE_ANSWER_LINES = 7  # text lines after a quote that make it an inline reply


def _is_attribution(line: str) -> bool:
    if len(line) > 2 * _ATTRIBUTION_MAX_LEN:
        return False
    line = " ".join(line.split())
    return len(line) <= _ATTRIBUTION_MAX_LEN and _attribution_form(line) is not None


def _header_key(line: str) -> str | None:
    if len(line) > 2000:  # no header line is that long; keeps the regex cheap
        return None
    m = _HEADER_LINE.match(line)
    if not m or not m.group(2).strip():
        return None
    return m.group(1).strip().lower()


def _mark_attributions(lines: list[str], kinds: list[str]) -> None:
    """Mark attribution lines, joining the ones a client wrapped over several lines."""
    for i, line in enumerate(lines):
        if kinds[i] != "t":
            continue
        # A line ending inside "<address" continues on the next line.
        if _is_attribution(line) and line.count("<") <= line.count(">"):
            kinds[i] = "m"
            continue
        if len(line) > _ATTRIBUTION_MAX_LEN or not _may_start_attribution(line.strip()):
            continue
        parts = [line.strip()]
        raw = line
        for j in range(i + 1, min(i + _ATTRIBUTION_WINDOW, len(lines))):
            if kinds[j] not in "tqe":
                break
            raw += lines[j]  # the '>' of a wrapped "<address\n>" closes the bracket
            piece = lines[j].strip().lstrip(">").strip()
            if piece:
                parts.append(piece)
            joined = " ".join(parts)
            if len(joined) > _ATTRIBUTION_MAX_LEN:
                break
            if piece and raw.count("<") <= raw.count(">") and _is_attribution(joined):
                for k in range(i, j + 1):
                    kinds[k] = "m"
                break


def _mark_header_blocks(lines: list[str], kinds: list[str]) -> None:
    """Mark embedded ``From:/Sent:/To:`` blocks and forwarded-message separators.

    A block needs a From-like key and one other known key on adjacent lines, so a
    parent's single "To: someone" line is never mistaken for one. Its first line
    becomes ``m``; the rest, up to the next blank line, ``f`` (this also covers
    wrapped ``Subject:`` values).
    """
    i = 0
    while i < len(lines):
        start = None
        if kinds[i] == "t" and any(r.match(lines[i]) for r in _SEPARATOR_RES):
            start = i
        elif kinds[i] == "t" and _header_key(lines[i]) is not None:
            run = i
            keys: list[str] = []
            while run < min(len(lines), i + _HEADER_BLOCK_MAX) and kinds[run] == "t":
                key = _header_key(lines[run])
                if key is None or key not in _HEADER_KEYS:
                    break
                keys.append(key)
                run += 1
            has_from = any(k in _FROM_KEYS for k in keys)
            has_other = any(k in _OTHER_KEYS - _FROM_KEYS for k in keys)
            if len(keys) >= 2 and has_from and (has_other or len(keys) >= 3):
                start = i
        if start is None:
            i += 1
            continue
        kinds[start] = "m"
        j = start + 1
        if any(r.match(lines[start]) for r in _SEPARATOR_RES):
            while j < len(lines) and kinds[j] == "e":  # separator, blank, then headers
                j += 1
            if j >= len(lines) or _header_key(lines[j]) is None:
                i = start + 1
                continue
        while j < len(lines) and j < start + _HEADER_BLOCK_MAX and kinds[j] in "tm":
            kinds[j] = "f"
            j += 1
        i = j


def _classify(lines: list[str]) -> list[str]:
    kinds: list[str] = []
    in_fence = False
    for line in lines:
        if _FENCE.match(line):
            in_fence = not in_fence
            kinds.append("t")
        elif in_fence:
            kinds.append("t")
        elif not line.strip():
            kinds.append("e")
        elif _QUOTE.match(line):
            kinds.append("q")
        elif _DELIMITER.match(line):
            kinds.append("d")
        elif any(r.match(line) for r in _SIGNATURE_RES):
            kinds.append("s")
        else:
            kinds.append("t")
    _mark_header_blocks(lines, kinds)
    _mark_attributions(lines, kinds)
    return kinds


def _text_before(pattern: str, k: int) -> int:
    """Index of the 't' that precedes position ``k`` across blank lines, or -1."""
    j = k - 1
    while j >= 0 and pattern[j] == "e":
        j -= 1
    return j if j >= 0 and pattern[j] == "t" else -1


def _reply_below_quote(pattern: str) -> int:
    """Start of the text when the mail opens with a quote and answers below it, or -1.

    The shape is: only quotes, markers and blanks (with at least one marker), then
    text and blanks to the end. Thunderbird and some phones put the reply there.
    """
    first_t = pattern.find("t")
    if first_t < 0 or "m" not in pattern[:first_t]:
        return -1
    return first_t if not any(c in "qmf" for c in pattern[first_t:]) else -1


def _marker_without_quote(pattern: str) -> int:
    """Last line to keep when an embedded message (no quoted lines after it) ends the mail."""
    last_q = pattern.rfind("q")
    for k in range(last_q + 1, len(pattern)):
        if pattern[k] == "m":
            t = _text_before(pattern, k)
            if t >= 0:
                return t
    return -1


def _marker_then_short_quote(pattern: str) -> int:
    """Last line to keep when text is followed by a marker, a quote and a short tail.

    The tail after the marker must be quotes/markers/blanks, then only text and
    blanks; with fewer than ``_INLINE_ANSWER_LINES`` text lines it is the quote's
    footer (or a signature), with more it is an inline answer and is kept.
    """
    n = len(pattern)
    tail_ok = [False] * (n + 1)  # pattern[k:] has the shape [eqmf]*[te]*
    t_after = [0] * (n + 1)  # number of 't' in pattern[k:]
    tail_ok[n] = True
    seen_qmf = False
    for k in range(n - 1, -1, -1):
        c = pattern[k]
        t_after[k] = t_after[k + 1] + (c == "t")
        if c in "qmf":
            seen_qmf = True
            tail_ok[k] = tail_ok[k + 1]
        elif c == "t":
            tail_ok[k] = tail_ok[k + 1] and not seen_qmf
        else:
            tail_ok[k] = tail_ok[k + 1]
    for k in range(n):
        if pattern[k] == "m" and tail_ok[k + 1]:
            t = _text_before(pattern, k)
            if t >= 0:
                return t if t_after[k + 1] < _INLINE_ANSWER_LINES else -1
    return -1


def _trim(lines: list[str], kinds: list[str]) -> list[str]:
    """Apply the cutting rules; ``kinds`` is one letter per line (see module doc)."""
    pattern = "".join(kinds)

    # Everything after a delimiter is a signature or a footer.
    cut = pattern.find("d")
    if cut >= 0:
        lines, pattern = lines[:cut], pattern[:cut]

    # Client boilerplate ("Sent from my iPhone") goes wherever it is.
    keep = [i for i, k in enumerate(pattern) if k != "s"]
    lines, pattern = [lines[i] for i in keep], "".join(pattern[i] for i in keep)

    # Reply written below the quote (Thunderbird's default, "bottom posting").
    start = _reply_below_quote(pattern)
    if start >= 0:
        return lines[start:]

    # An embedded message with no quoted lines after it is the rest of the mail;
    # one followed by a quote and a few lines, too (the quote's footer).
    for rule in (_marker_without_quote, _marker_then_short_quote):
        last = rule(pattern)
        if last >= 0:
            lines, pattern = lines[: last + 1], pattern[: last + 1]

    # A quote that ends the mail.
    last_t = pattern.rfind("t")
    if last_t >= 0:
        lines, pattern = lines[: last_t + 1], pattern[: last_t + 1]

    # Attribution lines left inside an interleaved (inline) reply.
    keep = [i for i, k in enumerate(pattern) if k not in "mf"]
    lines, pattern = [lines[i] for i in keep], "".join(pattern[i] for i in keep)

    if "t" not in pattern:  # quotes only: nothing new was written
        return []
    return lines


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


def extract_reply(text: str) -> str:
    """Return the new text of a reply body, without quoted history and signatures.

    Leading and trailing blank lines are removed, as is trailing whitespace;
    indentation inside the text is kept (it can be meaningful, e.g. code).
    A body with no new text (only quotes, headers or a signature) gives ``""``.
    """
    lines = _normalise(text).split("\n")
    kept = _trim(lines, _classify(lines))
    return "\n".join(kept).strip("\n").rstrip()


# --------------------------------------------------------------------------
# HTML replies
# --------------------------------------------------------------------------

# Elements that start the quoted original in the HTML of common clients; the
# element and everything after it in document order are the quote.
_HTML_QUOTE_XPATH = " | ".join(
    (
        "//*[contains(concat(' ', normalize-space(@class), ' '), ' gmail_quote ')]",
        "//*[contains(concat(' ', normalize-space(@class), ' '), ' gmail_quote_container ')]",
        "//*[contains(concat(' ', normalize-space(@class), ' '), ' moz-cite-prefix ')]",
        "//*[contains(concat(' ', normalize-space(@class), ' '), ' OutlookMessageHeader ')]",
        "//*[contains(concat(' ', normalize-space(@class), ' '), ' yahoo_quoted ')]",
        "//*[contains(concat(' ', normalize-space(@class), ' '), ' zmail_extra ')]",
        "//*[@id='divRplyFwdMsg' or @id='appendonsend' or @id='stopSpelling'"
        " or @id='OLK_SRC_BODY_SECTION' or @id='mail-editor-reference-message-container']",
        "//*[@name='messageReplySection' or @name='quote']",
        "//blockquote",
    )
)


def _remove_from(element: HtmlElement) -> None:
    """Remove ``element`` and everything that follows it in document order."""
    node: HtmlElement | None = element
    while node is not None:
        parent = node.getparent()
        if parent is None:
            break
        for sibling in list(node.itersiblings()):
            parent.remove(sibling)
        node = parent
    element.tail = None
    parent = element.getparent()
    if parent is not None:
        parent.remove(element)


def _remove_quote_in_tree(tree: HtmlElement) -> None:
    found = tree.xpath(_HTML_QUOTE_XPATH)  # in document order
    if found:
        _remove_from(found[0])


def remove_html_quote(html: str) -> str:
    """Return ``html`` with the quoted original (and what follows it) removed.

    Handles Gmail (``gmail_quote``), Thunderbird (``moz-cite-prefix``), Outlook
    (``divRplyFwdMsg``, ``OutlookMessageHeader``), Hotmail (``stopSpelling``),
    Yahoo, and any ``<blockquote>`` (Yandex, Mail.ru, Apple Mail).
    """
    tree = parse_html(html)
    if tree is None:
        return ""
    _remove_quote_in_tree(tree)
    return tostring(tree, encoding="unicode")


def extract_reply_from_html(html: str) -> str:
    """Return the new text of an HTML reply body.

    The quote is cut from the HTML first (its container is unambiguous there),
    then the text is run through :func:`extract_reply` for what only shows in the
    text: attribution lines outside the quote container, Outlook header blocks
    drawn as ``<p>``s, signatures.
    """
    tree = parse_html(html)
    if tree is None:
        return ""
    # Only what the parent could see counts: hidden elements are removed, and a reply
    # whose style sheet hides things cannot be read safely at all (no CSS engine here).
    if remove_hidden(tree):
        return ""
    _remove_quote_in_tree(tree)
    return extract_reply(tree_to_text(tree))


# --------------------------------------------------------------------------
# Whole messages
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyText:
    """The extracted reply and the whole decoded body it came from (for the audit trail)."""

    text: str
    full: str


def _is_attachment(part: Message) -> bool:
    return part.get_content_disposition() == "attachment"


def _part_text(part: Message) -> str:
    """Decoded text of a part; an unknown or lying charset must not crash intake."""
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except (LookupError, UnicodeError, AssertionError):
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else ""
    if isinstance(content, bytes):
        content = content.decode("utf-8", errors="replace")
    return content if isinstance(content, str) else ""


def _leaf_parts(part: Message, depth: int = 0) -> Iterator[Message]:
    """Leaf parts in order, not descending into attached messages (their body is not
    the reply) and bounded in depth against pathological nesting."""
    if part.get_content_maintype() == "message" or depth > 20:
        return
    if part.is_multipart():
        for sub in part.iter_parts():  # type: ignore[attr-defined]
            yield from _leaf_parts(sub, depth + 1)
    else:
        yield part


def _first_part(msg: Message, subtype: str) -> Message | None:
    for part in _leaf_parts(msg):
        if part.get_content_type() == f"text/{subtype}" and not _is_attachment(part):
            return part
    return None


def extract_reply_from_message(msg: EmailMessage) -> ReplyText:
    """Extract the reply from a parsed message (parse it with ``policy.default``).

    Takes the first ``text/plain`` body part; failing that, the ``text/html`` part,
    whose quote is removed before it is converted to text. ``full`` is the whole
    decoded body (HTML rendered as text, quote included).
    """
    plain = _first_part(msg, "plain")
    if plain is not None:
        body = _normalise(_part_text(plain))
        return ReplyText(text=extract_reply(body), full=body)
    html_part = _first_part(msg, "html")
    if html_part is None:
        return ReplyText(text="", full="")
    html = _part_text(html_part)
    return ReplyText(text=extract_reply_from_html(html), full=tree_to_text(parse_html(html)))
