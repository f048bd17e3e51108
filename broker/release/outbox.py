"""The outbox: every outbound copy is a row plus its bytes in the content store.

Writing the bytes before the row commits means a retry after any crash sends the
same message again (same Message-ID), and a release copy exists at most once per
(record, recipient) because its dedupe key is unique.
"""

from __future__ import annotations

import hashlib
import json

from sqlalchemy.orm import Session

from broker.content.store import ContentStore
from broker.db.models import Delivery, utcnow


def enqueue(
    s: Session,
    content: ContentStore,
    *,
    kind: str,
    recipient: str,
    data: bytes,
    message_id: str,
    child_id: int | None = None,
    record_id: int | None = None,
    person_id: int | None = None,
    dedupe_key: str | None = None,
    summary: dict | None = None,
    sign_on_send: bool = False,
) -> Delivery:
    ref = content.put(data, s)
    delivery = Delivery(
        dedupe_key=dedupe_key,
        kind=kind,
        child_id=child_id,
        record_id=record_id,
        person_id=person_id,
        recipient=recipient.lower(),
        message_id=message_id,
        content_ref=ref,
        sha256=hashlib.sha256(data).hexdigest(),
        summary=json.dumps(summary or {}, ensure_ascii=False, sort_keys=True),
        state="queued",
        next_attempt_at=utcnow(),
        sign_on_send=sign_on_send,
    )
    # Flushed with the transaction's next statement or its commit (no flush of its own:
    # a record's copies then go to the database in one round trip).
    s.add(delivery)
    return delivery
