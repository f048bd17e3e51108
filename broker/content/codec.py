"""Documents and drafts to and from bytes, for the content store (JSON, versioned).

An attachment's bytes go inside the document's JSON (base64) unless the caller gives a
``put_blob``: then an attachment above SEPARATE_ABOVE is stored as content of its own and
the JSON names its reference (``data_ref``). A 19 MB PDF inside the JSON cost four copies
of about 25 MB each while the document was written (base64 text, the JSON text, its
bytes, the sealed bytes) and made the largest peak of a worker taking in a 25 MB record.
Documents written either way are read back the same.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

from broker.mail.document import Attachment, Document, Draft, Paragraph

VERSION = 1
SEPARATE_ABOVE = 256 * 1024  # bytes of one attachment stored as content of its own


def _paras(items: tuple[Paragraph, ...] | None) -> list[list] | None:
    if items is None:
        return None
    return [[p.id, p.text] if p.page is None else [p.id, p.text, p.page] for p in items]


def _unparas(items: list[list] | None) -> tuple[Paragraph, ...] | None:
    if items is None:
        return None
    return tuple(Paragraph(i[0], i[1], i[2] if len(i) > 2 else None) for i in items)


def _attachment_data(a: Attachment, put_blob: Callable[[bytes], str] | None) -> dict:
    if put_blob is not None and len(a.data) > SEPARATE_ABOVE:
        return {"data_ref": put_blob(a.data)}
    return {"data": base64.b64encode(a.data).decode("ascii")}


def document_to_bytes(doc: Document, put_blob: Callable[[bytes], str] | None = None) -> bytes:
    """The document as bytes; large attachments through ``put_blob`` (which stores bytes
    and returns their reference) when given, else inline."""
    obj = {
        "v": VERSION,
        "subject": doc.subject,
        "sender": doc.sender,
        "sender_name": doc.sender_name,
        "date": doc.date,
        "had_html": doc.had_html,
        "paragraphs": _paras(doc.paragraphs),
        "attachments": [
            {
                "label": a.label,
                "filename": a.filename,
                "content_type": a.content_type,
                "size": a.size,
                **_attachment_data(a, put_blob),
                "paragraphs": _paras(a.paragraphs),
                "note": a.note,
                "kind": a.kind,
                "pages": a.pages,
                "scanned": list(a.scanned),
                "problem": a.problem,
            }
            for a in doc.attachments
        ],
    }
    return json.dumps(obj, ensure_ascii=False).encode()


def document_from_bytes(data: bytes,
                        get_blob: Callable[[str], bytes] | None = None) -> Document:
    """Inverse of :func:`document_to_bytes`; ``get_blob`` reads a separately stored
    attachment by its reference (ValueError if one is needed and none is given)."""
    obj = json.loads(data)

    def attachment_data(a: dict) -> bytes:
        if "data_ref" not in a:
            return base64.b64decode(a["data"])
        if get_blob is None:
            raise ValueError("this document keeps an attachment apart: pass get_blob")
        return get_blob(a["data_ref"])

    return Document(
        subject=obj["subject"],
        sender=obj["sender"],
        sender_name=obj["sender_name"],
        date=obj["date"],
        had_html=obj["had_html"],
        paragraphs=_unparas(obj["paragraphs"]) or (),
        attachments=tuple(
            Attachment(
                label=a["label"],
                filename=a["filename"],
                content_type=a["content_type"],
                size=a["size"],
                data=attachment_data(a),
                paragraphs=_unparas(a["paragraphs"]),
                note=a.get("note", ""),
                kind=a.get("kind", ""),
                pages=a.get("pages"),
                scanned=tuple(a.get("scanned", ())),
                problem=a.get("problem", ""),
            )
            for a in obj["attachments"]
        ),
    )


def draft_to_bytes(draft: Draft) -> bytes:
    obj = {
        "v": VERSION,
        "redact_ids": sorted(draft.redact_ids),
        "redact_pages": sorted(draft.redact_pages),
        "phrases": list(draft.phrases),
        "dropped": sorted(draft.dropped),
        "recipients": None if draft.recipients is None else list(draft.recipients),
        "note": draft.note,
    }
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()


def draft_from_bytes(data: bytes) -> Draft:
    obj = json.loads(data)
    return Draft(
        redact_ids=frozenset(obj["redact_ids"]),
        redact_pages=frozenset(obj.get("redact_pages", ())),
        phrases=tuple(obj["phrases"]),
        dropped=frozenset(obj["dropped"]),
        recipients=None if obj["recipients"] is None else tuple(obj["recipients"]),
        note=obj["note"],
    )
