"""The accounting of disclosures as CSV, HTML and PDF (see broker.audit.report).

- CSV: one row per released copy, a stable header (`CSV_FIELDS`), ISO 8601 UTC times.
  A cell that a spreadsheet would run as a formula (it starts with = + - @ or a tab) is
  prefixed with an apostrophe: subjects and file names come from outside.
- HTML: the Jinja2 template ``templates/report/disclosures.html.j2`` with autoescaping on
  (subjects are untrusted text), inline CSS, printable on its own.
- PDF: fpdf2, pure Python. Its built-in fonts (Helvetica, Courier) cover Windows-1252 only
  and no Unicode font ships with it, so other characters are written as their Unicode code
  point, "[U+4E2D]" (accents are dropped first where that leaves a readable letter, and a
  note under the header says so); the HTML and CSV carry the exact text.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import jinja2
from fpdf import FPDF, FontFace
from fpdf.enums import MethodReturnValue, XPos, YPos

from broker.audit.report import Disclosure, Report, human_size, iso, when
from broker.review.render import templates_dir

CSV_FIELDS = (
    "number", "date", "date_kind", "record", "delivery", "audit_seq",
    "recipient_email", "recipient_name", "recipient_role", "recipient_tags",
    "requested_by_email", "requested_by_name", "requested_by_role",
    "subject", "document_type", "author", "received_at", "attachments",
    "copy_sha256", "message_id", "purpose", "basis", "consent_id",
    "approved_by", "automatic", "redactions", "notices",
    "status", "status_at", "status_detail", "openpgp",
)  # fmt: skip
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# -- CSV ------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _attachment_cell(d: Disclosure) -> str:
    parts = []
    for a in d.attachments:
        facts = [a.content_type, f"{a.size} bytes" if a.size is not None else "",
                 f"{a.pages} pages" if a.pages is not None else "",
                 f"sha256 {a.sha256}" if a.sha256 else ""]
        known = ", ".join(f for f in facts if f)
        parts.append(f"{a.filename} ({known})" if known else a.filename)
    return "; ".join(parts)


def _approver_cell(d: Disclosure) -> str:
    out = []
    for a in d.approvers:
        who = f"{a.name} <{a.email}>" if a.name else a.email
        facts = [a.role, f"auth={a.auth or 'unknown'}", f"at={iso(a.at)}" if a.at else ""]
        out.append(f"{who} ({'; '.join(f for f in facts if f)})")
    return " | ".join(out)


def csv_row(d: Disclosure) -> dict[str, str]:
    """The CSV fields of one disclosure (strings, before formula guarding)."""
    return {
        "number": str(d.number),
        "date": iso(d.date),
        "date_kind": d.date_kind,
        "record": "" if d.record_id is None else str(d.record_id),
        "delivery": "" if d.delivery_id is None else str(d.delivery_id),
        "audit_seq": "" if d.audit_seq is None else str(d.audit_seq),
        "recipient_email": d.recipient.email,
        "recipient_name": d.recipient.name,
        "recipient_role": d.recipient.role,
        "recipient_tags": "; ".join(d.recipient.tags),
        "requested_by_email": d.requested_by.email,
        "requested_by_name": d.requested_by.name,
        "requested_by_role": d.requested_by.role,
        "subject": d.subject,
        "document_type": "; ".join(d.categories),
        "author": d.requested_by.text,
        "received_at": iso(d.received_at),
        "attachments": _attachment_cell(d),
        "copy_sha256": d.copy_sha256,
        "message_id": d.message_id,
        "purpose": d.purpose,
        "basis": "parent-directed" if d.parent_directed else f"consent #{d.consent_id}",
        "consent_id": "" if d.consent_id is None else str(d.consent_id),
        "approved_by": _approver_cell(d),
        "automatic": "yes" if d.automatic else "no",
        "redactions": d.redactions.text,
        "notices": " | ".join(d.notices),
        "status": d.status.state,
        "status_at": iso(d.status.at),
        "status_detail": d.status.detail,
        "openpgp": d.openpgp,
    }


def to_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for d in report.disclosures:
        writer.writerow({k: _cell(v) for k, v in csv_row(d).items()})
    return out.getvalue()


# -- HTML -----------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _html_environment(folder: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        autoescape=True,  # subjects and file names are untrusted text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["size"] = human_size
    return env


def to_html(report: Report, *, templates: Path | str | None = None) -> str:
    env = _html_environment(templates_dir(templates).resolve())
    return env.get_template("report/disclosures.html.j2").render(
        report=report, summary=report.summary, chain=report.chain
    )


# -- PDF ------------------------------------------------------------------------------------

# Close stand-ins for common characters outside Windows-1252.
_PDF_STANDINS = {
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2015": "-", "\u2212": "-",
    "\u2190": "<-", "\u2192": "->", "\u2194": "<->", "\u21d2": "=>",
    "\u2264": "<=", "\u2265": ">=", "\u2260": "!=", "\u2248": "~",
    "\u00a0": " ", "\u2009": " ", "\u200a": " ", "\u202f": " ", "\u2002": " ", "\u2003": " ",
    "\u200b": "", "\u200c": "", "\u200d": "", "\u2060": "", "\ufeff": "",
    "\u2713": "v", "\u2714": "v", "\u2717": "x", "\u2718": "x",
    "\u0141": "L", "\u0142": "l", "\u0110": "D", "\u0111": "d", "\u0131": "i",
}  # fmt: skip


def _encodable(text: str) -> bool:
    try:
        text.encode("cp1252")
    except UnicodeEncodeError:
        return False
    return True


def pdf_text(text: str) -> tuple[str, bool]:
    """Text the PDF's built-in fonts can draw, and whether anything had to be replaced."""
    out: list[str] = []
    replaced = False
    for ch in text:
        if ch == "\n" or (ch >= " " and ch != "\x7f" and _encodable(ch)):
            out.append(ch)
            continue
        if ch in _PDF_STANDINS:
            out.append(_PDF_STANDINS[ch])
            continue
        if ch == "\t":
            out.append(" ")
            continue
        replaced = True
        base = "".join(c for c in unicodedata.normalize("NFKD", ch)
                       if not unicodedata.combining(c))
        if base and base != ch and base.isprintable() and _encodable(base):
            out.append(base)
        else:
            out.append(f"[U+{ord(ch):04X}]")
    return "".join(out), replaced


INK = (17, 17, 17)
MUTED = (80, 80, 80)
RULE = (150, 150, 150)
SHADE = (232, 232, 232)
RED = (153, 27, 27)
GREEN = (20, 83, 45)
LABEL_WIDTH = 40.0  # mm


def _lines(values: Sequence[str], empty: str = "none") -> str:
    return "\n".join(values) if values else empty


def _needs_note(report: Report) -> bool:
    texts = [report.child_name, report.child_slug]
    for d in report.disclosures:
        texts.extend(csv_row(d).values())
    return any(pdf_text(t)[1] for t in texts)


class _Document(FPDF):
    """US Letter, Helvetica, a running header from page 2 and "Page X of Y" on every page."""

    def __init__(self, report: Report) -> None:
        super().__init__(orientation="P", unit="mm", format="Letter")
        self.report = report
        self.continuing = ""  # the disclosure a page break falls inside, for the header
        self.core_fonts_encoding = "windows-1252"
        self.set_margins(18, 16, 18)
        self.set_auto_page_break(True, margin=18)
        self.set_title(f"Accounting of disclosures: {pdf_text(report.child_name)[0]}")
        self.set_author("disclosure broker")
        self.set_subject(f"Disclosures of records about {pdf_text(report.child_name)[0]}")
        self.set_creator("broker audit report")
        self.set_creation_date(report.generated_at)

    def t(self, text: str) -> str:
        return pdf_text(text)[0]

    def header(self) -> None:
        if self.page_no() == 1:
            return
        r = self.report
        self.set_font("Helvetica", "", 8)
        self.set_text_color(*MUTED)
        self.cell(0, 4, self.t(f"Accounting of disclosures - {r.child_name} ({r.child_slug})"),
                  new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_draw_color(*RULE)
        self.line(self.l_margin, self.get_y() + 1, self.w - self.r_margin, self.get_y() + 1)
        self.ln(5)
        if self.continuing:
            self.set_font("Helvetica", "I", 9)
            self.cell(0, 5, self.t(self.continuing), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            self.ln(1)
        self.set_text_color(*INK)

    def footer(self) -> None:
        r = self.report
        self.set_y(-13)
        self.set_draw_color(*RULE)
        self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
        self.set_font("Helvetica", "", 8)
        self.set_text_color(*MUTED)
        self.cell(0, 6, self.t(f"Generated {when(r.generated_at)}. Audit chain: "
                               f"{r.chain.status.lower()}."), align="L")
        self.set_x(self.l_margin)
        self.cell(0, 6, f"Page {self.page_no()} of {{nb}}", align="R")
        self.set_text_color(*INK)

    # -- pieces ---------------------------------------------------------------------------

    def heading(self, text: str, size: float = 13) -> None:
        self.set_font("Helvetica", "B", size)
        self.set_text_color(*INK)
        self.cell(0, size * 0.5, self.t(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.ln(1.5)

    def fields(self, rows: Sequence[tuple[str, str, FontFace | None]]) -> None:
        """A two-column table: labels on the left, values on the right."""
        width = self.epw
        self.set_draw_color(*RULE)
        self.set_line_width(0.2)
        self.set_fill_color(255, 255, 255)
        with self.table(
            width=width, col_widths=(LABEL_WIDTH, width - LABEL_WIDTH),
            first_row_as_headings=False, text_align=("LEFT", "LEFT"), v_align="TOP",
            borders_layout="HORIZONTAL_LINES", line_height=LINE, padding=PADDING,
            align="LEFT", cell_fill_mode="NONE",
        ) as table:
            for name, value, style in rows:
                row = table.row()
                row.cell(self.t(name), style=LABEL)
                row.cell(self.t(value) or " ", style=style or PLAIN)
        self.ln(2)

    def fields_height(self, rows: Sequence[tuple[str, str, FontFace | None]]) -> float:
        """About how tall `fields(rows)` will be (to keep a disclosure on one page)."""
        value_width = self.epw - LABEL_WIDTH - PADDING[1] - PADDING[3] - 1
        total = 2.0
        for _name, value, style in rows:
            face = style or PLAIN
            self.set_font(face.family, _emphasis(face), face.size_pt)
            lines = self.multi_cell(value_width, LINE, self.t(value) or " ", dry_run=True,
                                    output=MethodReturnValue.LINES)
            total += len(lines) * LINE + PADDING[0] + PADDING[2]
        return total

    def disclosure(self, d: Disclosure, total: int) -> None:
        rows = disclosure_rows(d)
        bar = 8.0
        height = bar + self.fields_height(rows)
        room = self.page_break_trigger - self.get_y()
        # One page per disclosure when it fits in what is left; else split it only if a
        # good half fits here (the rest is marked "continued" on the next page).
        if height > room and room < split_room(height, self.eph):
            self.add_page()
        top, width = self.get_y(), self.epw
        self.set_fill_color(*SHADE)
        self.rect(self.l_margin, top, width, bar - 0.5, style="F")
        self.set_text_color(*INK)
        self.set_font("Helvetica", "B", 10.5)
        self.set_xy(self.l_margin + 1, top)
        title = f"Disclosure {d.number} of {total}"
        self.cell(width / 2, bar - 0.5, self.t(title))
        self.set_font("Helvetica", "", 9.5)
        self.set_xy(self.l_margin, top)
        self.cell(width - 1, bar - 0.5, self.t(f"{when(d.date)} ({d.date_kind})"), align="R")
        self.set_xy(self.l_margin, top + bar)
        self.continuing = f"{title}, continued"
        try:
            self.fields(rows)
        finally:
            self.continuing = ""
        self.ln(2)

    def first_disclosure_height(self, d: Disclosure) -> float:
        return 8.0 + self.fields_height(disclosure_rows(d))


def split_room(height: float, page: float) -> float:
    """The least room a disclosure of this height may start in when it will not fit: a
    good half of it, at least 60 mm, and never more than 45% of a fresh page."""
    return min(max(0.5 * height, 60.0), 0.45 * page)


def _emphasis(face: FontFace) -> str:
    return face.emphasis.style if face.emphasis is not None else ""


LINE = 4.3
PADDING = (1.1, 2.0, 1.1, 2.0)
LABEL = FontFace(family="Helvetica", emphasis="BOLD", size_pt=8.5, color=MUTED)
PLAIN = FontFace(family="Helvetica", emphasis="", size_pt=9.5, color=INK)
MONO = FontFace(family="Courier", emphasis="", size_pt=8.5, color=INK)
ALARM = FontFace(family="Helvetica", emphasis="BOLD", size_pt=9.5, color=RED)


def _party_lines(who: str, role: str, note: str = "") -> str:
    return f"{who}\n{role}{note}" if who else "not recorded"


def disclosure_rows(d: Disclosure) -> list[tuple[str, str, FontFace | None]]:
    """The label/value rows of one disclosure block in the PDF."""
    sender = d.requested_by
    rows: list[tuple[str, str, FontFace | None]] = [
        ("Recipient", _party_lines(d.recipient.text, d.recipient.role_text), None),
        ("Requested by", _party_lines(sender.text if sender.email else "",
                                      sender.role_text, ", sender of the record"), None),
        ("Subject", d.subject or "(no subject)", None),
        ("Document type", d.document_type, None),
        ("Author", sender.text if sender.email else "not recorded", None),
        ("Received", when(d.received_at) or "not recorded", None),
    ]
    if not d.attachments:
        rows.append(("Attachments", "none", None))
    for i, a in enumerate(d.attachments, start=1):
        value = a.filename + (f"\n{a.facts}" if a.facts else "")
        value += f"\nsha256 {a.sha256}" if a.sha256 else ""
        rows.append((f"Attachment {i}", value, None))
    status = d.status.text + (f"\nOpenPGP: {d.openpgp}" if d.openpgp else "")
    rows += [
        ("Copy sent, sha256", d.copy_sha256 or "not recorded", MONO),
        ("Message-ID", d.message_id or "not recorded", MONO),
        ("Purpose", d.purpose, None),
        ("Basis", d.basis_text, None),
        ("Approved by", _lines(d.approval_lines), None),
        ("Redactions", _lines(d.redactions.lines()), None),
        ("Notice attached", _lines(list(d.notices)), None),
        ("Delivery status", status, None if d.sent else ALARM),
        ("Reference", d.reference, None),
    ]
    return rows


def to_pdf(report: Report) -> bytes:
    pdf = _Document(report)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 20)
    pdf.set_text_color(*INK)
    pdf.cell(0, 10, "Accounting of Disclosures", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("Helvetica", "", 10)
    pdf.set_text_color(*MUTED)
    pdf.multi_cell(0, 5, pdf.t(f"Records about {report.child_name} released through the "
                               "disclosure broker: to whom, when, what, why, on whose "
                               "approval, and what became of each copy."),
                   new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_draw_color(*INK)
    pdf.set_line_width(0.6)
    pdf.line(pdf.l_margin, pdf.get_y() + 2, pdf.w - pdf.r_margin, pdf.get_y() + 2)
    pdf.ln(6)
    chain = report.chain
    chain_style = FontFace(family="Helvetica", emphasis="BOLD", size_pt=9.5,
                           color=GREEN if chain.ok else RED)
    pdf.fields([
        ("Child", f"{report.child_name} ({report.child_slug})", None),
        ("Period", report.period_text, None),
        ("Generated", when(report.generated_at), None),
        ("Audit chain", f"{chain.status}: {chain.text}", chain_style),
        ("Events checked", f"{chain.checked} (whole log; head at seq {chain.head_seq})", None),
        ("Head hash", chain.head_hash or "(empty log)", MONO),
    ])
    if _needs_note(report):
        pdf.set_font("Helvetica", "I", 8.5)
        pdf.set_text_color(*MUTED)
        pdf.multi_cell(0, 4.2, "Characters this PDF's built-in fonts cannot show are written "
                       "as [U+XXXX] (their Unicode code point), or without their accent. The "
                       "HTML and CSV forms of this report carry the exact text.",
                       new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_text_color(*INK)
        pdf.ln(2)
    s = report.summary
    pdf.heading("Summary", 12)
    pdf.fields([(label, value, None) for label, value in s.rows()])
    pdf.ln(2)
    if report.disclosures and pdf.will_page_break(
        10 + split_room(pdf.first_disclosure_height(report.disclosures[0]), pdf.eph)
    ):
        pdf.add_page()
    pdf.heading("Disclosures", 12)
    if not report.disclosures:
        pdf.set_font("Helvetica", "", 10)
        pdf.multi_cell(0, 5, "No record was released in this period.",
                       new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    for d in report.disclosures:
        pdf.disclosure(d, len(report.disclosures))
    pdf.set_font("Helvetica", "", 8.5)
    pdf.set_text_color(*MUTED)
    if pdf.will_page_break(30):
        pdf.add_page()
    pdf.multi_cell(0, 4.2, pdf.t(_EXPLANATION), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    return bytes(pdf.output())


_EXPLANATION = (
    "How to read this report. Times are UTC. Basis \"consent #N\" means the copy went out "
    "under written consent number N on file with the broker; \"parent-directed\" means a "
    "guardian approved that very record by an authenticated reply. \"Copy sent, sha256\" is "
    "the SHA-256 of the exact message the broker handed to the mail relay: anyone holding "
    "that message can check it is the one recorded. The audit chain is the broker's "
    "append-only, hash-chained log; \"verified\" means every event was re-hashed and "
    "matched, so no event was altered, removed or reordered since it was written."
)
