"""The database schema. Record content never lives here: only references into the
content store (raw mail, parsed document, drafts, outbound copies) and the metadata
needed to route, decide and audit.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores naive UTC, hands back aware UTC: SQLite has no time zones."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC)


class SealedText(TypeDecorator[str]):
    """Text sealed with the home's content key (encryption at rest, broker.crypto.vault).

    Python sees plaintext; the column holds base64 of an AES-256-GCM blob. A value written
    before sealing existed (no vault header) is read as it is; `broker key rotate` seals it.
    Equality filters on these columns cannot work (every seal differs): none are used."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect):
        if value is None:
            return None
        from broker.crypto import vault

        return vault.registered(getattr(dialect, "broker_url", None)).seal_text(value)

    def process_result_value(self, value: str | None, dialect):
        if value is None:
            return None
        from broker.crypto import vault

        if not vault.is_sealed_text(value):
            return value
        return vault.registered(getattr(dialect, "broker_url", None)).open_text(value)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class Child(Base):
    __tablename__ = "children"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    birthdate: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    jurisdiction: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Team file: "any" (one guardian's decision is enough) or "all" (a release waits for
    # every guardian's APPROVE of the same version).
    approval: Mapped[str] = mapped_column(String(8), default="any", server_default="any")
    # After the student comes of age: the student handed decisions back to the guardians
    # (`broker team delegate`).
    delegated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    people: Mapped[list[Person]] = relationship(back_populates="child", order_by="Person.id")


class Person(Base):
    """A guardian or a team member of one child. Addresses are stored lower-cased."""

    __tablename__ = "people"
    __table_args__ = (UniqueConstraint("child_id", "email", name="uq_people_child_email"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("children.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # guardian | student | provider | school
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320))
    tags: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # OpenPGP (team file): the armored public key, the team file's revocation flag (pgpy
    # ignores revocations) and whether this member must never receive plaintext.
    pgp_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    pgp_key_revoked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    require_encryption: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # A guardian's own reply-authentication mode, stricter than broker.toml's (or None).
    reply_auth: Mapped[str | None] = mapped_column(String(8), nullable=True)

    child: Mapped[Child] = relationship(back_populates="people")

    @property
    def is_guardian(self) -> bool:
        return self.role == "guardian"


class Inbound(Base):
    """Every message the intake accepted, whatever became of it: nothing is lost."""

    __tablename__ = "inbound"

    id: Mapped[int] = mapped_column(primary_key=True)
    spool_id: Mapped[str] = mapped_column(String(64), unique=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    mail_from: Mapped[str] = mapped_column(String(320))
    rcpt_tos: Mapped[str] = mapped_column(Text)  # JSON list
    # host:port that handed the message to the intake ([v6]:port for IPv6)
    peer: Mapped[str] = mapped_column(String(64), default="", server_default="")
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # resends (migration 0008)
    raw_ref: Mapped[str] = mapped_column(String(128))
    # record | reply | bounce | automatic | stray | duplicate | failed
    kind: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(Text, default="")
    child_id: Mapped[int | None] = mapped_column(ForeignKey("children.id"), nullable=True)
    record_id: Mapped[int | None] = mapped_column(ForeignKey("records.id"), nullable=True)
    processed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Record(Base):
    """A message posted to a child's list address, held until a guardian decides."""

    __tablename__ = "records"

    id: Mapped[int] = mapped_column(primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("children.id"), index=True)
    state: Mapped[str] = mapped_column(String(24), index=True)
    sender_email: Mapped[str] = mapped_column(String(320))
    sender_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"), nullable=True)
    subject: Mapped[str] = mapped_column(SealedText, default="")  # sealed: record content
    raw_ref: Mapped[str] = mapped_column(String(128))
    raw_sha256: Mapped[str] = mapped_column(String(64))
    doc_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    draft_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    hold_reasons: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    # What the rules found (broker.policy.evaluate.Evaluation as JSON): categories, each
    # matched rule with its reason, routing, patterns, consents. Sealed: the reasons quote
    # words of the message.
    policy: Mapped[str] = mapped_column(SealedText, default="{}")
    quarantine_reason: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    decided_by: Mapped[str] = mapped_column(String(320), default="")

    child: Mapped[Child] = relationship()


class Token(Base):
    """A review token, stored only as its SHA-256. One live token per record."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    version: Mapped[int] = mapped_column(Integer)  # the draft version it shows
    status: Mapped[str] = mapped_column(String(16), default="live")  # live|used|superseded|dead
    # "review": decides the record; "fyi": sent with the copy of an automatic release, its
    # only use is REVOKE (the consent the record went out under).
    purpose: Mapped[str] = mapped_column(String(8), default="review", server_default="review")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Delivery(Base):
    """One outbound copy to one recipient: the outbox. Bytes live in the content store,
    so a retry after a crash sends the very same message (same Message-ID)."""

    __tablename__ = "deliveries"
    # Migration 0009: a record's copies (settling a record as each copy is sent, and at
    # its decision) and the notices to one address today (the daily cap).
    __table_args__ = (
        Index("ix_deliveries_record_kind", "record_id", "kind"),
        Index("ix_deliveries_recipient_created", "recipient", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # "release:<record>:<email>" for releases: the database refuses a second copy.
    dedupe_key: Mapped[str | None] = mapped_column(String(400), unique=True, nullable=True)
    kind: Mapped[str] = mapped_column(String(16))  # review|preview|release|notice|receipt
    child_id: Mapped[int | None] = mapped_column(ForeignKey("children.id"), nullable=True)
    record_id: Mapped[int | None] = mapped_column(ForeignKey("records.id"), nullable=True)
    person_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"), nullable=True)
    recipient: Mapped[str] = mapped_column(String(320))
    message_id: Mapped[str] = mapped_column(String(400))
    content_ref: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    # For the audit when a release copy is delivered: subject, attachments, released_by.
    # Sealed (SealedText): it names the subject and attachments.
    summary: Mapped[str] = mapped_column(SealedText, default="{}")
    # Release copies: the consent the copy goes out under; None = parent-directed (an
    # explicit approval of this record). Revoking the consent cancels queued copies.
    consent_id: Mapped[int | None] = mapped_column(ForeignKey("consents.id"), nullable=True,
                                                   index=True)
    # queued | sent | failed | cancelled (consent revoked before it left)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Migration 0010. True: the content is the copy as composed, and the outbox signs it
    # with the broker's key as it sends it (the same bytes on every try); the signed bytes
    # replace the content and sha256 with its "sent" outcome (broker.release.sender).
    sign_on_send: Mapped[bool] = mapped_column(Boolean, default=False,
                                               server_default=false())


class Consent(Base):
    """A release on file (DESIGN.md section 6): who may tell whom what, for what purpose,
    from when until when, signed by whom. Never deleted: revoked or renewed (a renewal is a
    new consent pointing at the one it replaces). Lists are JSON: people by address,
    tags as "tag:<name>"."""

    __tablename__ = "consents"

    id: Mapped[int] = mapped_column(primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("children.id"), index=True)
    disclosers: Mapped[str] = mapped_column(Text)  # JSON list: addresses and tag:x
    recipients: Mapped[str] = mapped_column(Text)  # JSON list: addresses and tag:x
    categories: Mapped[str] = mapped_column(Text)  # JSON list of rules categories
    purpose: Mapped[str] = mapped_column(Text)
    valid_from: Mapped[dt.date] = mapped_column(Date)
    valid_until: Mapped[dt.date] = mapped_column(Date)  # last day it covers
    signed_by: Mapped[str] = mapped_column(Text)  # JSON list of addresses
    mode: Mapped[str] = mapped_column(String(8), default="review")  # review | auto
    form_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    form_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(12), default="active")  # active | revoked
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(320), default="operator")
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_by: Mapped[str] = mapped_column(String(320), default="")
    renews_id: Mapped[int | None] = mapped_column(ForeignKey("consents.id"), nullable=True)

    child: Mapped[Child] = relationship()


class Approval(Base):
    """One decider's decision on one version of a record, when a release waits for
    several (approval = "all", a student's co-consent)."""

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("record_id", "version", "person_id",
                                       name="uq_approvals_record_version_person"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    person_id: Mapped[int] = mapped_column(ForeignKey("people.id"))
    decision: Mapped[str] = mapped_column(String(8))  # approve | deny
    auth: Mapped[str] = mapped_column(String(80), default="")
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class SentReminder(Base):
    """What the scheduler has sent, by a key naming the occasion ("hold:12:day3"): the
    unique key is what makes a reminder go out once, across restarts and processes."""

    __tablename__ = "sent_reminders"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ContentBlob(Base):
    """Small content (parsed documents, drafts, outbound copies), sealed, in the database:
    written in the same transaction as the rows that refer to it (no extra flush), and
    shared by every broker process on one PostgreSQL. Large content stays in files."""

    __tablename__ = "content_blobs"

    ref: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[str] = mapped_column(Text)  # base64 of the sealed blob


class AuditEvent(Base):
    """Append-only, hash-chained. seq is assigned under the audit_head lock."""

    __tablename__ = "audit_events"
    # For `broker audit` filters (migration 0002): disclosures per child and period,
    # disclosures of everyone in a period, and every event of a child or a period.
    __table_args__ = (
        Index("ix_audit_events_child_action_at", "child", "action", "at"),
        Index("ix_audit_events_action_at", "action", "at"),
        Index("ix_audit_events_child_at", "child", "at"),
        Index("ix_audit_events_at", "at"),
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    child: Mapped[str] = mapped_column(String(64), default="", index=True)
    record_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(320))
    actor_role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32), index=True)
    recipients: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    description: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON object
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """One row: the last seq and hash. Locking it serialises appends across processes."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    hash: Mapped[str] = mapped_column(String(64))
