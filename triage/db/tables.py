"""Database tables (SQLAlchemy 2 declarative). API schemas live in ``triage.serve``, not here.

The schema is created and changed only by Alembic migrations in ``triage/migrations``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from triage.domain import AIStatus, ReadState, SeriesState

RANK_STALE = datetime(1970, 1, 1, tzinfo=UTC)
"""``studies.rank_valid_until`` of a study whose worklist rank must be computed again."""


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    __tablename__ = "studies"
    __table_args__ = (
        Index(
            "ix_studies_rank",
            "rank_tier",
            "rank_severity",
            "rank_a",
            "rank_b",
            "rank_c",
            "StudyInstanceUID",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    StudyInstanceUID: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    PatientID: Mapped[str | None] = mapped_column(String(64))
    PatientName: Mapped[str | None] = mapped_column(String(324))
    AccessionNumber: Mapped[str | None] = mapped_column(String(64))
    StudyDescription: Mapped[str | None] = mapped_column(String(256))
    StudyDate: Mapped[str | None] = mapped_column(String(16))
    order_priority: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ai_status: Mapped[str] = mapped_column(String(32), default=AIStatus.pending.value)
    ai_error: Mapped[str | None] = mapped_column(Text)
    ai_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    routing: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # "emergency", "inpatient" or None, from the patient's location (never the free text).
    location_class: Mapped[str | None] = mapped_column(String(16))
    # The reading work queue: unread -> claimed (with a lease) -> completed.
    read_state: Mapped[str] = mapped_column(String(16), default=ReadState.unread.value, index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claim_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_by: Mapped[str | None] = mapped_column(String(64))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The worklist's order, kept (worklist/rank.py): the policy's sort key for this study
    # (rank_tier 9: read), its class, tier, deadline and reasons, when the key must be
    # computed again (a time-driven change, or RANK_STALE after any change of what the policy
    # reads), the policy digest it was computed with; modalities and subspecialties as
    # "|CT|MR|" for filtering in SQL.
    rank_tier: Mapped[int] = mapped_column(Integer, default=3, server_default="3")
    rank_severity: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rank_a: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    rank_b: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    rank_c: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    priority_class: Mapped[str | None] = mapped_column(String(16))
    tier: Mapped[str | None] = mapped_column(String(16))
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rank_reasons: Mapped[list[str] | None] = mapped_column(JSON)
    rank_valid_until: Mapped[datetime] = mapped_column(
        DateTime(timezone=True),
        default=RANK_STALE,
        server_default="1970-01-01 00:00:00",
        index=True,
    )
    rank_valid_from: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rank_policy: Mapped[str | None] = mapped_column(String(16), index=True)
    modalities: Mapped[str | None] = mapped_column(String(128))
    subspecialties: Mapped[str | None] = mapped_column(String(128))

    series: Mapped[list[SeriesRow]] = relationship(back_populates="study", order_by="SeriesRow.id")
    findings: Mapped[list[FindingRow]] = relationship(
        back_populates="study", order_by="FindingRow.id", cascade="all, delete-orphan"
    )
    acknowledgements: Mapped[list[AcknowledgementRow]] = relationship(
        order_by="AcknowledgementRow.id"
    )


class SeriesRow(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    SeriesInstanceUID: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    Modality: Mapped[str | None] = mapped_column(String(16))
    SeriesDescription: Mapped[str | None] = mapped_column(String(256))
    BodyPartExamined: Mapped[str | None] = mapped_column(String(64))
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # receiving: instances still arriving; complete: quiet period passed, study queued.
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.receiving.value, index=True)

    study: Mapped[StudyRow] = relationship(back_populates="series")
    instances: Mapped[list[InstanceRow]] = relationship(back_populates="series")


class InstanceRow(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    SOPInstanceUID: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    SOPClassUID: Mapped[str] = mapped_column(String(64))
    TransferSyntaxUID: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str | None] = mapped_column(String(128))

    series: Mapped[SeriesRow] = relationship(back_populates="instances")


class JobRow(Base):
    """One analysis of one study. A study has at most one job queued or running at a time."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # a JobState
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    # Set when instances arrived while the job ran: the study is analysed again.
    stale: Mapped[int] = mapped_column(Integer, default=0)
    # A worker process's claim: who runs it, until when (renewed by its heartbeats); a job
    # whose lease lapsed is queued again for another worker.
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class FindingRow(Base):
    __tablename__ = "findings"
    __table_args__ = (UniqueConstraint("study_id", "finding", "model_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    finding: Mapped[str] = mapped_column(String(64))
    flag: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    SeriesInstanceUID: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    mask_path: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    study: Mapped[StudyRow] = relationship(back_populates="findings")


class AcknowledgementRow(Base):
    """A reader acknowledged a critical-finding alert of a study: who, which finding, when.
    Kept for the record (the page shows it and raises no banner for it again); also in the
    audit trail."""

    __tablename__ = "acknowledgements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    finding: Mapped[str] = mapped_column(String(64))
    reader: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FeedbackRow(Base):
    """A radiologist's judgement of an AI finding: agree, disagree, or missed (a finding the
    AI did not report, with the slice), with what the AI said and which model and weights
    said it, as they were when the judgement was made. Kept for retraining; never edited."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    finding: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))  # a FeedbackVerdict
    reader: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    comment: Mapped[str | None] = mapped_column(Text)
    SeriesInstanceUID: Mapped[str | None] = mapped_column(String(64))
    SOPInstanceUID: Mapped[str | None] = mapped_column(String(64))
    InstanceNumber: Mapped[int | None] = mapped_column(Integer)
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    weights_sha256: Mapped[list[str]] = mapped_column(JSON)
    ai_flag: Mapped[bool | None] = mapped_column()
    ai_score: Mapped[float | None] = mapped_column(Float)


class DicomResultRow(Base):
    """A DICOM object the AI made for a study (``triage.dicomout.results``): a Segmentation,
    a TID 1500 report or a saliency Secondary Capture, its UIDs and where its file is kept. A
    new analysis of the study by the same model replaces the model's rows (new objects, new
    UIDs)."""

    __tablename__ = "dicom_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # a DicomResultKind
    SOPInstanceUID: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    SeriesInstanceUID: Mapped[str] = mapped_column(String(64))
    SOPClassUID: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    finding: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ResultExportRow(Base):
    """Sending one DICOM result to one configured destination (``triage.dicomout.send``):
    the state, how many attempts were made, when the next is due, the last failure (how it
    failed, never patient data) and when it was stored there."""

    __tablename__ = "result_exports"
    __table_args__ = (UniqueConstraint("result_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("dicom_results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))  # "AE@host:port"
    state: Mapped[str] = mapped_column(String(16), index=True)  # an ExportState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class QuarantineRow(Base):
    """Rejected input, kept with the reason. No attribute values of the input are stored."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    source: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(512))


class EventRow(Base):
    """The outbox: one change other systems may follow (see ``triage.events``).

    Written in the producer's transaction, read by the SSE stream and the webhook sender.
    Payloads carry no patient name or ID; ``webhook_error`` only says how delivery failed.
    """

    __tablename__ = "events"
    # SQLite: AUTOINCREMENT, so an id is never reused after old events are pruned.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(32), index=True)
    StudyInstanceUID: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    # pending | delivered | failed; None when the event is not for the webhook.
    webhook_state: Mapped[str | None] = mapped_column(String(16), index=True)  # a WebhookState
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    webhook_error: Mapped[str | None] = mapped_column(Text)


class AccountRow(Base):
    """A person or a service that signs in: a radiologist, an admin or an integration.

    ``password_hash`` is an argon2id hash (``triage.auth.passwords``); None for an account
    whose password the hospital's directory checks (``source='ldap'``) or a service account
    that only uses tokens.
    """

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    display_name: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))  # a Role
    source: Mapped[str] = mapped_column(String(16), default="local")  # local | ldap
    password_hash: Mapped[str | None] = mapped_column(String(256))
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Permissions granted beyond the role's, comma-separated (e.g. an integration that may
    # read patient names: "view_patients"); None: the role's only.
    grants: Mapped[str | None] = mapped_column(String(256))


class ApiTokenRow(Base):
    """A bearer token of an account: only its sha256 is kept (the token is shown once)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to tell tokens apart
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SessionRow(Base):
    """A signed-in browser: the cookie's sha256 (the cookie is never stored), its CSRF token,
    and when it was last used; ``ended_at`` once signed out."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    source_address: Mapped[str | None] = mapped_column(String(64))


class OidcLoginRow(Base):
    """An OpenID Connect sign-in under way: the state's sha256 (the browser holds the state),
    the nonce and PKCE verifier to check the provider's answer with, where to go after.
    Used once; older than a few minutes, refused."""

    __tablename__ = "oidc_logins"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    nonce: Mapped[str] = mapped_column(String(64))
    code_verifier: Mapped[str] = mapped_column(String(128))
    return_to: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditRow(Base):
    """One audited action; ``hash`` chains it to the record before (``triage.audit``).

    Identifiers only (a username, a StudyInstanceUID), never patient names.
    """

    __tablename__ = "audit_log"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str | None] = mapped_column(String(64), index=True)
    actor_role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    target_kind: Mapped[str | None] = mapped_column(String(16))
    target: Mapped[str | None] = mapped_column(String(128), index=True)
    source_address: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHeadRow(Base):
    """The end of the audit chain (one row): how many records, the last id and hash. Kept
    in the same transaction as each record, so a record removed from the end is seen."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    last_id: Mapped[int] = mapped_column(Integer, default=0)
    last_hash: Mapped[str] = mapped_column(String(64))
