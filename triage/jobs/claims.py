"""Analysis jobs leased to worker processes: claim, heartbeat, give back, requeue, finish.

Every function here is a few SQL statements whose ``WHERE`` decides who wins, so that
several worker processes (``triage worker``, or the worker threads of ``triage serve``)
can share one database:

* :func:`claim` hands the oldest queued job to one worker, with a lease (on PostgreSQL the
  row is picked with ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent claimers do not
  queue on one row; on SQLite, whose writers are serialised, a conditional UPDATE). A job
  whose study has another job running waits, so one study is never analysed by two workers
  at once (a late instance queues a second job while the first runs).
* :func:`heartbeat` renews the lease while the job is still this worker's and running.
* :func:`release` gives a job back at once (a worker asked to stop).
* :func:`requeue_expired` queues again the jobs whose lease lapsed (a worker that died, or
  a job left ``running`` with no lease by a version before leases), and fails those that
  used up their attempts, so a study that kills its worker cannot kill them all in turn.
* :func:`finish` closes a job, in the caller's transaction that records the findings: a
  worker whose lease was taken over finds no row to update and must record nothing, so no
  job is done twice to completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from triage.db import Database
from triage.db.tables import RANK_STALE, JobRow, StudyRow
from triage.domain import AIStatus, JobState
from triage.ingest.assembly import lock_study

__all__ = [
    "Claim",
    "QueueSummary",
    "Requeued",
    "claim",
    "finish",
    "heartbeat",
    "queue_summary",
    "release",
    "requeue_expired",
]


@dataclass(frozen=True)
class Claim:
    """A job leased to a worker.

    Attributes:
        job_id: the job.
        study_id: its study's row id.
        StudyInstanceUID: its study.
        attempts: how many times the job has been claimed, this claim included.
        lease_expires_at: when the lease lapses unless renewed (UTC).
    """

    job_id: int
    study_id: int
    StudyInstanceUID: str
    attempts: int
    lease_expires_at: datetime


@dataclass(frozen=True)
class Requeued:
    """What :func:`requeue_expired` did: job ids queued again, and failed."""

    queued: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.queued or self.failed)


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _is_postgresql(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


def claim(
    db: Database, *, worker_id: str, lease_seconds: float, now: datetime | None = None
) -> Claim | None:
    """Lease the oldest queued job whose study has no job running to ``worker_id``.

    Args:
        db: the database.
        worker_id: who claims (unique per process, e.g. ``host:pid``).
        lease_seconds: how long the lease lasts without a heartbeat.
        now: the time (tests); default the clock.

    Returns:
        The claim, or None when no job can be claimed now.
    """
    now = _now(now)
    other = aliased(JobRow)
    study_busy = exists().where(other.study_id == JobRow.study_id, other.state == JobState.running)
    claimable = select(JobRow.id).where(JobRow.state == JobState.queued, ~study_busy)
    expires = now + timedelta(seconds=lease_seconds)
    values: dict[str, Any] = {
        "state": JobState.running,
        "worker_id": worker_id,
        "started_at": now,
        "heartbeat_at": now,
        "lease_expires_at": expires,
        "attempts": JobRow.attempts + 1,
    }
    with db.session() as s:
        if _is_postgresql(s):
            # The row stays locked to this transaction: a concurrent claimer skips it.
            job_id = s.scalar(
                claimable.order_by(JobRow.id).limit(1).with_for_update(skip_locked=True, of=JobRow)
            )
            if job_id is None:
                return None
            s.execute(update(JobRow).where(JobRow.id == job_id).values(**values))
        else:
            # SQLite serialises writers; the UPDATE's WHERE is evaluated under the write lock,
            # so of two claimers of one job one updates a row and the other none.
            for job_id in s.scalars(claimable.order_by(JobRow.id).limit(8)).all():
                won = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.state == JobState.queued, ~study_busy)
                    .values(**values)
                )
                if getattr(won, "rowcount", 0):
                    break
            else:
                return None
        row = s.execute(
            select(JobRow.study_id, StudyRow.StudyInstanceUID, JobRow.attempts)
            .join(StudyRow, StudyRow.id == JobRow.study_id)
            .where(JobRow.id == job_id)
        ).one()
        return Claim(job_id, int(row[0]), str(row[1]), int(row[2]), expires)


def _held(job_id: int, worker_id: str) -> ColumnElement[bool]:
    """WHERE the job is running under this worker's lease."""
    return and_(
        JobRow.id == job_id, JobRow.worker_id == worker_id, JobRow.state == JobState.running
    )


def heartbeat(
    db: Database,
    *,
    job_id: int,
    worker_id: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> bool:
    """Extend the lease of a job this worker runs.

    Returns:
        False when the job is no longer this worker's (its lease lapsed and it was queued
        again, taken by another worker, or failed): the worker must not record it.
    """
    now = _now(now)
    with db.session() as s:
        result = s.execute(
            update(JobRow)
            .where(_held(job_id, worker_id))
            .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
        )
        return bool(getattr(result, "rowcount", 0))


def release(db: Database, *, job_id: int, worker_id: str) -> bool:
    """Give a running job back to the queue at once (the worker stops before finishing it);
    the attempt does not count towards the job's limit.

    Returns:
        False when the job was no longer this worker's.
    """
    with db.session() as s:
        result = s.execute(
            update(JobRow)
            .where(_held(job_id, worker_id))
            .values(
                state=JobState.queued,
                worker_id=None,
                lease_expires_at=None,
                heartbeat_at=None,
                attempts=case((JobRow.attempts > 0, JobRow.attempts - 1), else_=0),
            )
        )
        return bool(getattr(result, "rowcount", 0))


def finish(
    s: Session,
    *,
    job_id: int,
    worker_id: str,
    state: JobState,
    error: str | None,
    now: datetime | None = None,
) -> bool:
    """Close a job this worker runs, in the caller's transaction (the one that records its
    findings). Call it first in that transaction: the UPDATE then holds the job's row (and
    on SQLite the write lock) while the rest is written.

    Args:
        s: the session whose transaction records the analysis.
        job_id: the job.
        worker_id: the worker that claimed it.
        state: ``done`` or ``failed``.
        error: why it failed, or None.
        now: the time (tests); default the clock.

    Returns:
        False when the job is no longer this worker's: record nothing (roll back).
    """
    result = s.execute(
        update(JobRow)
        .where(_held(job_id, worker_id))
        .values(
            state=state,
            error=error,
            finished_at=_now(now),
            lease_expires_at=None,
        )
    )
    return bool(getattr(result, "rowcount", 0))


def _exhausted_reason(attempts: int) -> str:
    return (
        f"the analysis did not finish in {attempts} attempt(s): the worker running it stopped"
        " each time (TRIAGE_JOB_MAX_ATTEMPTS)"
    )


def requeue_expired(db: Database, *, max_attempts: int, now: datetime | None = None) -> Requeued:
    """Running jobs whose lease lapsed (or that have none: left by a version before leases)
    are queued again; those claimed ``max_attempts`` times already fail instead, with a
    reason on their study. A lapsed job whose study has another job queued meanwhile is
    closed as superseded (that job analyses the study again).

    Args:
        db: the database.
        max_attempts: claims a job gets before it is failed.
        now: the time (tests); default the clock.

    Returns:
        The ids of the jobs queued again and of those failed.
    """
    now = _now(now)
    lapsed = and_(
        JobRow.state == JobState.running,
        or_(JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < now),
    )
    queued: list[int] = []
    failed: list[int] = []
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(JobRow.id, JobRow.study_id).where(lapsed).order_by(JobRow.id)
        ).all()
    for job_id, study_id in rows:
        # One transaction per job, the study's row held first (as assembly holds it to queue
        # a job, and a worker to record one), then the job's, still lapsed.
        with db.session() as s:
            lock_study(s, study_id)
            attempts = s.scalar(select(JobRow.attempts).where(JobRow.id == job_id, lapsed))
            if attempts is None:  # finished, renewed or requeued meanwhile
                continue
            newer = s.scalar(
                select(JobRow.id).where(
                    JobRow.study_id == study_id, JobRow.state == JobState.queued
                )
            )
            if newer is not None:
                error = f"superseded by job {newer}: its worker stopped before finishing"
            elif attempts >= max_attempts:
                error = _exhausted_reason(attempts)
            else:
                # Still lapsed: a heartbeat that came late renews and wins.
                requeued = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, lapsed)
                    .values(state=JobState.queued, worker_id=None, lease_expires_at=None)
                )
                if getattr(requeued, "rowcount", 0):
                    queued.append(job_id)
                continue
            closed = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, lapsed)
                .values(
                    state=JobState.failed,
                    error=error,
                    worker_id=None,
                    lease_expires_at=None,
                    finished_at=now,
                )
            )
            if not getattr(closed, "rowcount", 0):
                continue
            failed.append(job_id)
            if newer is None:  # the study's own status says why (a newer job will set it)
                s.execute(
                    update(StudyRow)
                    .where(StudyRow.id == study_id)
                    .values(
                        ai_status=AIStatus.failed.value,
                        ai_error=error,
                        ai_updated_at=now,
                        rank_valid_until=RANK_STALE,
                    )
                    .execution_options(synchronize_session=False)
                )
    return Requeued(tuple(queued), tuple(failed))


@dataclass(frozen=True)
class QueueSummary:
    """The job queue as the health check shows it when workers run elsewhere."""

    queued: int
    running: int
    live_leases: int
    workers: int
    oldest_queued_seconds: float | None


def queue_summary(db: Database, *, now: datetime | None = None) -> QueueSummary:
    """Counts of queued and running jobs, live leases and the workers holding them, and how
    long the oldest queued job has waited."""
    now = _now(now)
    with db.engine.connect() as conn:
        queued, oldest = conn.execute(
            select(func.count(JobRow.id), func.min(JobRow.created_at)).where(
                JobRow.state == JobState.queued
            )
        ).one()
        running, live, workers = conn.execute(
            select(
                func.count(JobRow.id),
                func.count(JobRow.id).filter(JobRow.lease_expires_at >= now),
                func.count(func.distinct(JobRow.worker_id)).filter(JobRow.lease_expires_at >= now),
            ).where(JobRow.state == JobState.running)
        ).one()
    waited = None
    if oldest is not None:
        oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
        waited = max(0.0, (now - oldest).total_seconds())
    return QueueSummary(int(queued), int(running), int(live), int(workers), waited)
