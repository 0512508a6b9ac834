"""The worker: completes quiet series, claims queued jobs, runs the analysis.

Runs as threads inside ``triage serve`` (``TRIAGE_EMBEDDED_WORKER``, the default) or alone
in ``triage worker`` processes, any number of them on one database. Jobs live in the
database and are leased (:mod:`triage.jobs.claims`): the worker renews its lease every
third of ``TRIAGE_JOB_LEASE_SECONDS`` while it analyses, and every worker queues again the
jobs whose lease lapsed (a worker or a serve that died), so a crash loses nothing and a
study is finished by whichever worker claims it next.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from sqlalchemy import delete, select

from triage.analysis import Analyzer, SeriesFiles, StudyAnalysis
from triage.config import Settings
from triage.db import Database
from triage.db.tables import RANK_STALE, FindingRow, InstanceRow, JobRow, SeriesRow, StudyRow
from triage.domain import AIStatus, Finding, JobState, SeriesState
from triage.events import outbox
from triage.ingest.assembly import complete_quiet_series, lock_study
from triage.jobs import claims
from triage.jobs.claims import Claim
from triage.results import overlay_path, save_overlay
from triage.worklist.priority import DEFAULT_POLICY, PolicyConfig

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    """``<host name>:<process id>``: unique among the processes sharing a database."""
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


class _Lease:
    """Renews a claim's lease every third of its length on its own thread while the block
    runs; :attr:`lost` is set once a renewal finds the job no longer this worker's."""

    def __init__(self, db: Database, claim: Claim, *, worker_id: str, lease_seconds: float):
        self.db = db
        self.claim = claim
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"triage-heartbeat-{claim.job_id}", daemon=True
        )

    def renew(self) -> bool:
        """Renew now; False (and :attr:`lost` set) when the job is no longer ours."""
        if self.lost.is_set():
            return False
        if claims.heartbeat(
            self.db,
            job_id=self.claim.job_id,
            worker_id=self.worker_id,
            lease_seconds=self.lease_seconds,
        ):
            return True
        self.lost.set()
        log.warning(
            "job %d: the lease was lost (it lapsed and the job went back to the queue or was"
            " failed); this worker will not record it",
            self.claim.job_id,
        )
        return False

    def _beat(self) -> None:
        while not self._done.wait(self.lease_seconds / 3):
            try:
                if not self.renew():
                    return
            except Exception:  # the database away for a moment: try again next beat
                log.exception("job %d: lease renewal failed", self.claim.job_id)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()


class Worker:
    """Assembles studies and analyses them, one at a time, in background threads.

    Args:
        db: the database (shared with other workers).
        analyzer: the models.
        results_dir: where overlays and DICOM results are written (shared file store).
        quiet_seconds: a series is complete after this long without an instance.
        poll_seconds: how often assembly runs and an idle worker looks for a job.
        max_wait_seconds: a study still receiving after this long is analysed anyway.
        policy: which flagged findings raise a critical_finding event.
        webhook_kinds: the event kinds the webhook delivers.
        result_destinations: the destinations each new DICOM result is queued for.
        worker_id: who claims jobs (default ``host:pid``); unique per process.
        lease_seconds: a claimed job goes back to the queue this long after the last
            renewal (renewed every third of it while the analysis runs).
        max_attempts: claims of one job before it is failed (a study that kills workers).
    """

    def __init__(
        self,
        *,
        db: Database,
        analyzer: Analyzer,
        results_dir: Path,
        quiet_seconds: float,
        poll_seconds: float = 0.5,
        max_wait_seconds: float | None = None,
        policy: PolicyConfig = DEFAULT_POLICY,
        webhook_kinds: Collection[str] = (),
        result_destinations: Sequence[str] = (),
        worker_id: str | None = None,
        lease_seconds: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        self.db = db
        self.worker_id = worker_id or default_worker_id()
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        # Names (AE@host:port) of the destinations each new DICOM result is queued for.
        self.result_destinations = tuple(result_destinations)
        # Which flagged findings raise a critical_finding event, and which kinds the webhook
        # is to deliver (empty: no webhook).
        self.policy = policy
        self.webhook_kinds = frozenset(webhook_kinds)
        self.analyzer = analyzer
        self.results_dir = results_dir
        self.quiet_seconds = quiet_seconds
        self.poll_seconds = poll_seconds
        self.max_wait_seconds = max_wait_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        # The job being analysed, given back when the worker stops before it is done.
        self._current: Claim | None = None
        self._current_lock = threading.Lock()
        self._busy = threading.Event()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        db: Database,
        analyzer: Analyzer,
        *,
        policy: PolicyConfig = DEFAULT_POLICY,
        worker_id: str | None = None,
    ) -> Worker:
        """The worker as the settings configure it (``triage serve`` and ``triage worker``)."""
        return cls(
            db=db,
            analyzer=analyzer,
            results_dir=settings.results_dir,
            quiet_seconds=settings.series_quiet_seconds,
            poll_seconds=settings.worker_poll_seconds,
            max_wait_seconds=settings.study_max_wait_seconds,
            policy=policy,
            # Events are queued for the webhook only when one is configured.
            webhook_kinds=settings.webhook_kinds if settings.webhook_url else (),
            result_destinations=[d.name for d in settings.result_destinations],
            worker_id=worker_id,
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
        )

    @property
    def busy(self) -> bool:
        """True while a job is being analysed, recorded or its DICOM results made."""
        return self._busy.is_set()

    def requeue_expired(self) -> claims.Requeued:
        """Jobs whose worker stopped renewing their lease are queued again (or failed after
        ``max_attempts``); run by every worker, so any live one picks up a dead one's job."""
        result = claims.requeue_expired(self.db, max_attempts=self.max_attempts)
        if result.queued:
            log.info("re-queued %d job(s) whose worker stopped", len(result.queued))
        if result.failed:
            log.warning(
                "failed %d job(s) whose worker stopped %d time(s) or that a newer job replaces",
                len(result.failed),
                self.max_attempts,
            )
        if result.queued:
            self._wake.set()
        return result

    def start(self) -> None:
        log.info(
            "worker %s: job lease %g s, %d attempt(s) per job",
            self.worker_id,
            self.lease_seconds,
            self.max_attempts,
        )
        # Assembly (and requeueing lapsed jobs) runs on its own thread so that studies
        # complete (and are queued) on time while a long inference is running.
        for target, name in (
            (self._assemble_loop, "triage-assembly"),
            (self._run, "triage-worker"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def threads(self) -> list[threading.Thread]:
        """The worker's threads (assembly and analysis), for the health check."""
        return list(self._threads)

    def stop_claiming(self) -> None:
        """Claim no new job (the one being analysed goes on)."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; wait up to ``timeout`` seconds for the job being analysed, then
        give it back to the queue if it is not done (another worker takes it at once)."""
        self.stop_claiming()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.release_current()

    def release_current(self) -> bool:
        """Give the job being analysed back to the queue. Returns True if there was one."""
        with self._current_lock:
            current, self._current = self._current, None
        if current is None:
            return False
        try:
            released = claims.release(self.db, job_id=current.job_id, worker_id=self.worker_id)
        except Exception:  # the lease lapses on its own
            log.exception("job %d could not be given back", current.job_id)
            return False
        if released:
            log.info("job %d given back to the queue (worker stopping)", current.job_id)
        return released

    def _assemble_loop(self) -> None:
        next_requeue = 0.0  # at once: jobs a dead process left are picked up at start
        while True:
            if time.monotonic() >= next_requeue:
                try:
                    self.requeue_expired()
                except Exception:
                    log.exception("requeueing lapsed jobs failed")
                next_requeue = time.monotonic() + self.lease_seconds / 3
            try:
                if complete_quiet_series(
                    self.db,
                    quiet_seconds=self.quiet_seconds,
                    max_wait_seconds=self.max_wait_seconds,
                ):
                    self._wake.set()
            except Exception:
                log.exception("study assembly failed")
            if self._stop.wait(self.poll_seconds):
                return

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_one():
                    continue
            except Exception:
                log.exception("worker iteration failed")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def claim(self) -> Claim | None:
        """Lease the oldest claimable queued job to this worker, or None."""
        return claims.claim(self.db, worker_id=self.worker_id, lease_seconds=self.lease_seconds)

    def _series_files(self, study_id: int) -> list[SeriesFiles]:
        with self.db.session() as s:
            rows = s.execute(
                select(SeriesRow.SeriesInstanceUID, InstanceRow.path)
                .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
                .where(SeriesRow.study_id == study_id)
                .order_by(SeriesRow.id, InstanceRow.id)
            ).all()
        grouped: dict[str, SeriesFiles] = {}
        for series_uid, path in rows:
            grouped.setdefault(series_uid, SeriesFiles(series_uid, [])).paths.append(Path(path))
        return list(grouped.values())

    def run_one(self) -> bool:
        """Claim and run one job. Returns False when nothing was queued.

        The lease is renewed while the job runs; the findings are recorded only if the job
        is still this worker's when they are (see :func:`triage.jobs.claims.finish`). An
        error leaves the job to its lease: it is queued again when that lapses, and failed
        after ``max_attempts``.
        """
        self._busy.set()
        try:
            return self._run_one()
        finally:
            self._busy.clear()

    def _run_one(self) -> bool:
        claimed = self.claim()
        if claimed is None:
            return False
        with self._current_lock:
            self._current = claimed
        if self._stop.is_set():  # stopped while claiming: give it back at once
            self.release_current()
            return False
        study_id = claimed.study_id
        log.info(
            "analysing study #%d (job %d, attempt %d)", study_id, claimed.job_id, claimed.attempts
        )
        try:
            with _Lease(
                self.db, claimed, worker_id=self.worker_id, lease_seconds=self.lease_seconds
            ) as lease:
                analysis = self.analyzer.analyze(
                    claimed.StudyInstanceUID, self._series_files(study_id)
                )
                recorded = lease.renew() and self._record(claimed, analysis)
        finally:
            with self._current_lock:
                if self._current is claimed:
                    self._current = None
        if not recorded:
            log.warning(
                "study #%d: job %d was not recorded by this worker", study_id, claimed.job_id
            )
            return True
        log.info("study #%d: ai_status=%s", study_id, analysis.ai_status.value)
        self._make_dicom_results(study_id, analysis)
        return True

    def _make_dicom_results(self, study_id: int, analysis: StudyAnalysis) -> None:
        """The DICOM SEG and SR, or saliency Secondary Captures, of the findings, after the
        findings are recorded (the worklist does not wait for them); a failure never fails
        the analysis. Called for every analysis with findings, also when none is eligible:
        the models' earlier results of the study then go."""
        if not analysis.findings:
            return
        # Imported here: it brings highdicom, MONAI and torch, which a process that only
        # serves (TRIAGE_EMBEDDED_WORKER=false) never needs.
        from triage.dicomout.results import make_results

        try:
            make_results(
                self.db,
                analysis.StudyInstanceUID,
                findings=analysis.findings,
                overlays=analysis.overlays,
                results_dir=self.results_dir,
                destinations=self.result_destinations,
            )
        except Exception:
            log.exception("study #%d: DICOM results could not be recorded", study_id)

    def _escalates_to_critical(self, f: Finding) -> bool:
        rule = self.policy.findings.get(str(f.finding))
        return bool(
            rule is not None
            and f.flag
            and f.score >= rule.min_score
            and rule.escalate_to == "critical"
        )

    def _record(self, claimed: Claim, analysis: StudyAnalysis) -> bool:
        """Record the analysis and close the job in one transaction, if the job is still
        this worker's. Returns False (nothing recorded) when it is not."""
        job_id, study_id = claimed.job_id, claimed.study_id
        now = datetime.now(UTC)
        mask_paths: dict[str, str] = {}
        for name, overlay in analysis.overlays.items():
            path = overlay_path(self.results_dir, analysis.StudyInstanceUID, name)
            save_overlay(path, overlay)
            mask_paths[name] = str(path)
        failed = analysis.ai_status == AIStatus.failed
        with self.db.session() as s:
            # The study's row first (the order assembly and requeueing keep), then the job:
            # a worker whose lease was taken over finds no job to close and records nothing.
            lock_study(s, study_id)
            if not claims.finish(
                s,
                job_id=job_id,
                worker_id=self.worker_id,
                state=JobState.failed if failed else JobState.done,
                error=analysis.error,
                now=now,
            ):
                return False
            # Findings flagged by an earlier analysis of this study were alerted already.
            alerted: set[tuple[str, str]] = {
                (finding, model)
                for finding, model in s.execute(
                    select(FindingRow.finding, FindingRow.model_name).where(
                        FindingRow.study_id == study_id, FindingRow.flag != 0
                    )
                )
            }
            s.execute(delete(FindingRow).where(FindingRow.study_id == study_id))
            for f in analysis.findings:
                s.add(
                    FindingRow(
                        study_id=study_id,
                        finding=f.finding,
                        flag=int(f.flag),
                        score=f.score,
                        model_name=f.model.name,
                        model_version=f.model.version,
                        SeriesInstanceUID=f.details.get("SeriesInstanceUID"),
                        payload=f.to_json(),
                        mask_path=mask_paths.get(f.finding),
                        created_at=now,
                    )
                )
            study = s.get(StudyRow, study_id)
            assert study is not None
            newer = s.scalar(
                select(JobRow.id).where(
                    JobRow.study_id == study_id, JobRow.state == JobState.queued
                )
            )
            receiving = any(se.state == SeriesState.receiving for se in study.series)
            # Instances arrived meanwhile: the study stays pending until analysed again.
            study.ai_status = (
                AIStatus.pending.value if (newer or receiving) else analysis.ai_status.value
            )
            study.ai_error = analysis.error
            study.ai_updated_at = now
            study.routing = analysis.routing
            # The worklist ranks the study again (its rank is kept on the row).
            study.rank_valid_until = RANK_STALE
            # Critical-finding alerts, in the transaction that records the findings: one per
            # finding the policy escalates to critical, once per study and model.
            for f in analysis.findings:
                if not self._escalates_to_critical(f) or (f.finding, f.model.name) in alerted:
                    continue
                payload = {
                    "StudyInstanceUID": analysis.StudyInstanceUID,
                    "AccessionNumber": study.AccessionNumber,
                    "finding": f.finding,
                    "flag": bool(f.flag),
                    "score": f.score,
                    "volumes_ml": dict(f.volumes_ml),
                    "severity": f.severity,
                    "model": f.model.to_json(),
                    "priority_class": "critical",
                    "time": now.isoformat(),
                }
                kind = outbox.CRITICAL_FINDING
                outbox.emit(
                    s,
                    kind,
                    analysis.StudyInstanceUID,
                    payload,
                    webhook=kind in self.webhook_kinds,
                    now=now,
                )
        return True
