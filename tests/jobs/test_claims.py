"""Job leases on a real database (SQLite, and PostgreSQL when TRIAGE_TEST_POSTGRES_URL is
set): concurrent claimers, lapsed leases, a worker that lost its lease, the attempts limit,
and study assembly run by several processes at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from triage.db import Database
from triage.db.tables import RANK_STALE, JobRow, SeriesRow, StudyRow
from triage.domain import JobState, SeriesState
from triage.ingest.assembly import complete_quiet_series
from triage.jobs import claims

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
LEASE = 30.0


def add_study(db: Database, uid: str, *, series: int = 0, received: datetime = T0) -> int:
    """A study row (and ``series`` receiving series rows, last instance at ``received``)."""
    with db.session() as s:
        study = StudyRow(
            StudyInstanceUID=uid, first_received_at=received, last_received_at=received
        )
        s.add(study)
        s.flush()
        for i in range(series):
            s.add(
                SeriesRow(
                    study_id=study.id,
                    SeriesInstanceUID=f"{uid}.{i}",
                    n_instances=1,
                    last_received_at=received,
                    state=SeriesState.receiving,
                )
            )
        return study.id


def queue_jobs(db: Database, n: int) -> list[int]:
    """``n`` studies, one queued job each; the job ids, oldest first."""
    ids = []
    for i in range(n):
        study_id = add_study(db, f"1.2.826.0.1.3680043.8.498.7.{i}")
        with db.session() as s:
            job = JobRow(study_id=study_id, state=JobState.queued, created_at=T0)
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def job(db: Database, job_id: int) -> JobRow:
    with db.session() as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        return row


def study_of(db: Database, job_id: int) -> StudyRow:
    with db.session() as s:
        row = s.get(StudyRow, job(db, job_id).study_id)
        assert row is not None
        return row


def run_together(n: int, target: Callable[[int], None]) -> None:
    """``target(i)`` on ``n`` threads released at once; re-raises the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            target(i)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_concurrent_claimers_never_get_one_job(database_url: str, db: Database) -> None:
    ids = queue_jobs(db, 24)
    # One Database per claimer, as separate worker processes have.
    dbs = [Database(database_url) for _ in range(4)]
    got: list[list[int]] = [[] for _ in dbs]

    def claim_all(i: int) -> None:
        while (c := claims.claim(dbs[i], worker_id=f"w{i}", lease_seconds=LEASE)) is not None:
            got[i].append(c.job_id)

    try:
        run_together(len(dbs), claim_all)
    finally:
        for d in dbs:
            d.dispose()
    claimed = [j for g in got for j in g]
    assert sorted(claimed) == ids  # every job once, none twice
    for i, g in enumerate(got):
        for job_id in g:
            row = job(db, job_id)
            assert (row.state, row.worker_id, row.attempts) == ("running", f"w{i}", 1)
            assert row.lease_expires_at is not None


def test_the_oldest_job_first_and_the_lease_renewed_only_by_its_worker(db: Database) -> None:
    first, second = queue_jobs(db, 2)
    a = claims.claim(db, worker_id="a", lease_seconds=LEASE, now=T0)
    assert a is not None and a.job_id == first
    assert a.lease_expires_at == T0 + timedelta(seconds=LEASE)
    later = T0 + timedelta(seconds=20)
    assert claims.heartbeat(db, job_id=first, worker_id="a", lease_seconds=LEASE, now=later)
    assert not claims.heartbeat(db, job_id=first, worker_id="b", lease_seconds=LEASE, now=later)
    assert not claims.heartbeat(db, job_id=second, worker_id="a", lease_seconds=LEASE, now=later)
    row = job(db, first)
    assert row.lease_expires_at is not None
    assert row.lease_expires_at.replace(tzinfo=UTC) == later + timedelta(seconds=LEASE)
    # Renewed: not lapsed at the first lease's end.
    assert not claims.requeue_expired(
        db, max_attempts=3, now=a.lease_expires_at + timedelta(seconds=1)
    )
    assert job(db, first).state == "running"


def test_a_lapsed_lease_is_requeued_and_taken_by_another(db: Database) -> None:
    (job_id,) = queue_jobs(db, 1)
    a = claims.claim(db, worker_id="a", lease_seconds=LEASE, now=T0)
    assert a is not None
    assert claims.claim(db, worker_id="b", lease_seconds=LEASE, now=T0) is None
    # Not lapsed yet: nothing to requeue.
    assert not claims.requeue_expired(db, max_attempts=3, now=T0 + timedelta(seconds=LEASE - 1))
    lapsed = T0 + timedelta(seconds=LEASE + 1)
    assert claims.requeue_expired(db, max_attempts=3, now=lapsed).queued == (job_id,)
    row = job(db, job_id)
    assert (row.state, row.worker_id, row.lease_expires_at) == ("queued", None, None)
    b = claims.claim(db, worker_id="b", lease_seconds=LEASE, now=lapsed)
    assert b is not None and b.job_id == job_id and b.attempts == 2
    # Worker a comes back: its heartbeat and its finish find the job no longer its own.
    assert not claims.heartbeat(db, job_id=job_id, worker_id="a", lease_seconds=LEASE)
    with db.session() as s:
        assert not claims.finish(s, job_id=job_id, worker_id="a", state=JobState.done, error=None)
    assert job(db, job_id).state == "running"
    with db.session() as s:
        assert claims.finish(s, job_id=job_id, worker_id="b", state=JobState.done, error=None)
    row = job(db, job_id)
    assert (row.state, row.worker_id, row.attempts) == ("done", "b", 2)
    # Done once: a second finish (by anyone) changes nothing.
    with db.session() as s:
        assert not claims.finish(s, job_id=job_id, worker_id="b", state=JobState.failed, error="x")
    assert job(db, job_id).state == "done" and job(db, job_id).error is None


def test_a_finish_that_lost_its_lease_rolls_back_with_what_it_recorded(db: Database) -> None:
    """The worker records in the transaction of its finish: when finish says False the
    worker returns before writing, and nothing of a late worker reaches the study."""
    (job_id,) = queue_jobs(db, 1)
    assert claims.claim(db, worker_id="a", lease_seconds=LEASE, now=T0) is not None
    claims.requeue_expired(db, max_attempts=3, now=T0 + timedelta(seconds=LEASE + 1))
    with db.session() as s:
        if claims.finish(s, job_id=job_id, worker_id="a", state=JobState.done, error=None):
            study = s.get(StudyRow, job(db, job_id).study_id)
            assert study is not None
            study.ai_status = "ok"
    assert study_of(db, job_id).ai_status == "pending"
    assert job(db, job_id).state == "queued"


def test_a_job_that_keeps_killing_workers_fails_after_the_attempts(db: Database) -> None:
    (job_id,) = queue_jobs(db, 1)
    now = T0
    for attempt in (1, 2):
        c = claims.claim(db, worker_id=f"w{attempt}", lease_seconds=LEASE, now=now)
        assert c is not None and c.attempts == attempt
        now += timedelta(seconds=LEASE + 1)  # the worker died: no heartbeat
        result = claims.requeue_expired(db, max_attempts=2, now=now)
        if attempt == 1:
            assert result.queued == (job_id,) and not result.failed
    assert result.failed == (job_id,) and not result.queued
    row = job(db, job_id)
    assert (row.state, row.attempts, row.worker_id) == ("failed", 2, None)
    assert row.error and "did not finish in 2 attempt(s)" in row.error
    study = study_of(db, job_id)
    assert study.ai_status == "failed"
    assert study.ai_error and "TRIAGE_JOB_MAX_ATTEMPTS" in study.ai_error
    assert study.rank_valid_until.replace(tzinfo=UTC) == RANK_STALE  # ranked again
    assert claims.claim(db, worker_id="w3", lease_seconds=LEASE, now=now) is None


def test_a_running_job_without_a_lease_from_before_leases_is_requeued(db: Database) -> None:
    (job_id,) = queue_jobs(db, 1)
    with db.session() as s:  # as the version before leases left it when it was killed
        row = s.get(JobRow, job_id)
        assert row is not None
        row.state = JobState.running
    assert claims.requeue_expired(db, max_attempts=3, now=T0).queued == (job_id,)
    assert job(db, job_id).state == "queued"


def test_a_released_job_is_claimable_at_once_and_costs_no_attempt(db: Database) -> None:
    (job_id,) = queue_jobs(db, 1)
    assert claims.claim(db, worker_id="a", lease_seconds=LEASE, now=T0) is not None
    assert not claims.release(db, job_id=job_id, worker_id="b")  # not b's to give back
    assert claims.release(db, job_id=job_id, worker_id="a")
    row = job(db, job_id)
    assert (row.state, row.worker_id, row.attempts) == ("queued", None, 0)
    b = claims.claim(db, worker_id="b", lease_seconds=LEASE, now=T0)
    assert b is not None and b.job_id == job_id and b.attempts == 1


def test_a_study_is_not_analysed_by_two_workers_at_once(db: Database) -> None:
    """A late instance queues a second job while the first runs: it waits for the first."""
    (first,) = queue_jobs(db, 1)
    study_id = job(db, first).study_id
    assert claims.claim(db, worker_id="a", lease_seconds=LEASE, now=T0) is not None
    with db.session() as s:
        second = JobRow(study_id=study_id, state=JobState.queued, created_at=T0)
        s.add(second)
        s.flush()
        second_id = second.id
    assert claims.claim(db, worker_id="b", lease_seconds=LEASE, now=T0) is None
    summary = claims.queue_summary(db, now=T0 + timedelta(seconds=5))
    assert (summary.queued, summary.running, summary.live_leases, summary.workers) == (1, 1, 1, 1)
    assert summary.oldest_queued_seconds == 5.0
    with db.session() as s:
        assert claims.finish(s, job_id=first, worker_id="a", state=JobState.done, error=None)
    b = claims.claim(db, worker_id="b", lease_seconds=LEASE, now=T0)
    assert b is not None and b.job_id == second_id


def test_a_lapsed_job_whose_study_was_queued_again_is_superseded(db: Database) -> None:
    (first,) = queue_jobs(db, 1)
    study_id = job(db, first).study_id
    assert claims.claim(db, worker_id="a", lease_seconds=LEASE, now=T0) is not None
    with db.session() as s:
        s.add(JobRow(study_id=study_id, state=JobState.queued, created_at=T0))
    result = claims.requeue_expired(db, max_attempts=3, now=T0 + timedelta(seconds=LEASE + 1))
    assert result.failed == (first,)
    row = job(db, first)
    assert row.state == "failed" and row.error and row.error.startswith("superseded")
    assert study_of(db, first).ai_status == "pending"  # the newer job will analyse it
    with db.session() as s:
        states = s.scalars(select(JobRow.state).where(JobRow.study_id == study_id)).all()
    assert sorted(states) == ["failed", "queued"]  # one job queued for the study, not two


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "max-wait"])
def test_assembly_run_by_several_processes_at_once_queues_one_job_per_study(
    database_url: str, db: Database, quiet: bool
) -> None:
    """Four assemblers at once: quiet studies, or studies still receiving past the maximum
    wait (queued with what arrived; no series is marked complete there)."""
    uids = [f"1.2.826.0.1.3680043.8.498.8.{i}" for i in range(16)]
    studies = [add_study(db, uid, series=2) for uid in uids]
    if quiet:
        options = {"quiet_seconds": 2.0, "now": T0 + timedelta(seconds=10)}
    else:
        options = {
            "quiet_seconds": 60.0,
            "max_wait_seconds": 5.0,
            "now": T0 + timedelta(seconds=10),
        }
    dbs = [Database(database_url) for _ in range(4)]
    queued: list[list[str]] = [[] for _ in dbs]

    def assemble(i: int) -> None:
        queued[i] = complete_quiet_series(dbs[i], **options)

    try:
        run_together(len(dbs), assemble)
    finally:
        for d in dbs:
            d.dispose()
    assert sorted(u for q in queued for u in q) == sorted(uids)
    with db.session() as s:
        per_study = s.execute(select(JobRow.study_id, JobRow.state)).all()
        states = s.scalars(select(SeriesRow.state)).all()
    assert sorted(study for study, _ in per_study) == sorted(studies)  # exactly one each
    assert {state for _, state in per_study} == {"queued"}
    assert set(states) == {"complete" if quiet else "receiving"}
    assert complete_quiet_series(db, **options) == []
