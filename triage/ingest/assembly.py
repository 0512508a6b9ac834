"""Study assembly: a series is complete when no instance has arrived for a quiet period.

When every series of a study is complete the study is queued for analysis. Instances that
arrive later put their series back to ``receiving`` (see ``ingest.store``), and the study is
queued again once it is quiet.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.db import Database
from triage.db.tables import JobRow, SeriesRow, StudyRow
from triage.domain import AIStatus, JobState, SeriesState

log = logging.getLogger(__name__)


def _as_utc(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything is stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def enqueue_study(s: Session, study: StudyRow, *, now: datetime) -> bool:
    """Queue an analysis of the study unless one is already queued. Returns True if queued."""
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
    queued: list[str] = []
    with db.session() as s:
        receiving = s.scalars(
            select(SeriesRow).where(SeriesRow.state == SeriesState.receiving)
        ).all()
        touched: set[int] = set()
        waiting: set[int] = set()
        for series in receiving:
            if _as_utc(series.last_received_at) <= cutoff:
                series.state = SeriesState.complete
                touched.add(series.study_id)
            else:
                waiting.add(series.study_id)
        for study_id in sorted(touched | waiting):
            study = s.get(StudyRow, study_id)
            if study is None:
                continue
            if all(se.state == SeriesState.complete for se in study.series):
                if enqueue_study(s, study, now=now):
                    queued.append(study.StudyInstanceUID)
                    log.info("study #%d complete, queued for analysis", study.id)
            elif max_wait_seconds is not None and _waited_too_long(
                s, study, now=now, max_wait_seconds=max_wait_seconds
            ):
                if enqueue_study(s, study, now=now):
                    queued.append(study.StudyInstanceUID)
                    log.info(
                        "study #%d still receiving after %.0f s, queued with what arrived",
                        study.id,
                        max_wait_seconds,
                    )
    return queued


def _waited_too_long(
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
