"""Study assembly: a series is complete when no instance has arrived for a quiet period.

When every series of a study is complete the study is queued for analysis. Instances that
arrive later put their series back to ``receiving`` (see ``ingest.store``), and the study is
queued again once it is quiet.

Several processes may assemble at once (each ``triage worker``, and ``triage serve`` with
its embedded worker, on one PostgreSQL database). Each study is decided in its own
transaction holding the study's row (:func:`lock_study`), the row that ingest updates first
for every instance it indexes: two assemblers never queue two jobs for one study, and no
instance lands between reading a series as quiet and marking it complete.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from triage.db import Database
from triage.db.tables import JobRow, SeriesRow, StudyRow
from triage.domain import AIStatus, JobState, SeriesState

log = logging.getLogger(__name__)


def _as_utc(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything is stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def lock_study(s: Session, study_id: int) -> bool:
    """Hold the study's row until the session's transaction ends; False if there is none.

    PostgreSQL: ``SELECT ... FOR UPDATE``. SQLite: a write to the row, which takes the
    database's write lock (SQLite has no row locks, and a transaction that has only read
    may see rows older than the writer it waits for); every read after it in the
    transaction sees the latest commit. Take it before anything else in the transaction,
    and before any job row (the order every caller keeps, so two never deadlock).
    """
    if s.get_bind().dialect.name == "sqlite":
        result = s.execute(
            update(StudyRow)
            .where(StudyRow.id == study_id)
            .values(first_received_at=StudyRow.first_received_at)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))
    found = s.scalar(select(StudyRow.id).where(StudyRow.id == study_id).with_for_update())
    return found is not None


def enqueue_study(s: Session, study: StudyRow, *, now: datetime) -> bool:
    """Queue an analysis of the study unless one is already queued. Returns True if queued.

    The caller holds the study's row (:func:`lock_study`), so that two processes do not
    both find no queued job and both queue one.
    """
    queued = s.scalar(
        select(JobRow.id).where(JobRow.study_id == study.id, JobRow.state == JobState.queued)
    )
    if queued is not None:
        return False
    s.add(JobRow(study_id=study.id, state=JobState.queued, created_at=now, stale=0))
    study.ai_status = AIStatus.pending
    return True


def complete_quiet_series(
    db: Database,
    *,
    quiet_seconds: float,
    max_wait_seconds: float | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Mark quiet series complete and queue studies whose series are all complete.

    A study that is still receiving ``max_wait_seconds`` after its first instance (or after
    its last analysis) is queued anyway, so a series that trickles in, or a sender that
    never stops, cannot hold a critical study back; it is analysed again once quiet.

    Returns:
        StudyInstanceUIDs queued by this call.
    """
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(seconds=quiet_seconds)
    with db.engine.connect() as conn:
        # Without a lock: what may need doing (checked again under the study's lock).
        receiving = conn.execute(
            select(SeriesRow.study_id, func.min(SeriesRow.last_received_at))
            .where(SeriesRow.state == SeriesState.receiving)
            .group_by(SeriesRow.study_id)
            .order_by(SeriesRow.study_id)
        ).all()
    queued: list[str] = []
    for study_id, oldest in receiving:
        quiet = _as_utc(oldest) <= cutoff
        if not quiet and (
            max_wait_seconds is None
            or not _waited_too_long(db, study_id, now=now, max_wait_seconds=max_wait_seconds)
        ):
            continue
        uid = _assemble_study(
            db, study_id, cutoff=cutoff, now=now, max_wait_seconds=max_wait_seconds
        )
        if uid is not None:
            queued.append(uid)
    return queued


def _assemble_study(
    db: Database,
    study_id: int,
    *,
    cutoff: datetime,
    now: datetime,
    max_wait_seconds: float | None,
) -> str | None:
    """Under the study's lock: its quiet series complete, and a job queued when all are
    (or when it waited too long). Returns its StudyInstanceUID when queued."""
    with db.session() as s:
        if not lock_study(s, study_id):
            return None
        s.execute(
            update(SeriesRow)
            .where(
                SeriesRow.study_id == study_id,
                SeriesRow.state == SeriesState.receiving,
                SeriesRow.last_received_at <= cutoff,
            )
            .values(state=SeriesState.complete)
        )
        study = s.get(StudyRow, study_id)
        if study is None:
            return None
        states = s.scalars(select(SeriesRow.state).where(SeriesRow.study_id == study_id)).all()
        if all(state == SeriesState.complete for state in states):
            if enqueue_study(s, study, now=now):
                log.info("study #%d complete, queued for analysis", study.id)
                return study.StudyInstanceUID
        elif max_wait_seconds is not None and _waited_too_long_in(
            s, study, now=now, max_wait_seconds=max_wait_seconds
        ):
            if enqueue_study(s, study, now=now):
                log.info(
                    "study #%d still receiving after %.0f s, queued with what arrived",
                    study.id,
                    max_wait_seconds,
                )
                return study.StudyInstanceUID
    return None


def _waited_too_long(
    db: Database, study_id: int, *, now: datetime, max_wait_seconds: float
) -> bool:
    with db.session() as s:
        study = s.get(StudyRow, study_id)
        return study is not None and _waited_too_long_in(
            s, study, now=now, max_wait_seconds=max_wait_seconds
        )


def _waited_too_long_in(
    s: Session, study: StudyRow, *, now: datetime, max_wait_seconds: float
) -> bool:
    """True when neither the first arrival nor the latest job is within the max wait."""
    limit = now - timedelta(seconds=max_wait_seconds)
    if _as_utc(study.first_received_at) > limit:
        return False
    latest_job = s.scalar(
        select(JobRow.created_at)
        .where(JobRow.study_id == study.id)
        .order_by(JobRow.created_at.desc())
        .limit(1)
    )
    return latest_job is None or _as_utc(latest_job) <= limit
