"""The background worker: completes quiet series, claims queued jobs, runs the analysis.

Runs as a thread inside ``triage serve``. Jobs live in the database, so a restart loses
nothing: jobs left ``running`` by a crash are queued again at start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, select, update

from triage.analysis import Analyzer, SeriesFiles, StudyAnalysis
from triage.db import Database
from triage.db.tables import FindingRow, InstanceRow, JobRow, SeriesRow, StudyRow
from triage.dicomout.results import make_results
from triage.domain import AIStatus, Finding, JobState, SeriesState
from triage.events import outbox
from triage.ingest.assembly import complete_quiet_series
from triage.results import overlay_path, save_overlay
from triage.worklist.priority import DEFAULT_POLICY, PolicyConfig

log = logging.getLogger(__name__)


class Worker:
    """Assembles studies and analyses them, one at a time, in a background thread."""

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
    ) -> None:
        self.db = db
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

    def requeue_interrupted(self) -> int:
        """Jobs that were running when the process died are queued again."""
        with self.db.session() as s:
            result = s.execute(
                update(JobRow).where(JobRow.state == JobState.running).values(state=JobState.queued)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def start(self) -> None:
        n = self.requeue_interrupted()
        if n:
            log.info("re-queued %d interrupted job(s)", n)
        # Assembly runs on its own thread so that studies complete (and are queued) on time
        # while a long inference is running.
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

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    def _assemble_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                if complete_quiet_series(
                    self.db,
                    quiet_seconds=self.quiet_seconds,
                    max_wait_seconds=self.max_wait_seconds,
                ):
                    self._wake.set()
            except Exception:
                log.exception("study assembly failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_one():
                    continue
            except Exception:
                log.exception("worker iteration failed")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def claim(self) -> tuple[int, int, str] | None:
        """Claim the oldest queued job: (job id, study id, StudyInstanceUID) or None."""
        with self.db.session() as s:
            row = s.execute(
                select(JobRow.id, JobRow.study_id)
                .where(JobRow.state == JobState.queued)
                .order_by(JobRow.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            job_id, study_id = row
            claimed = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == JobState.queued)
                .values(state=JobState.running, started_at=datetime.now(UTC))
            )
            if not getattr(claimed, "rowcount", 0):
                return None
            study = s.get(StudyRow, study_id)
            assert study is not None
            return job_id, study_id, study.StudyInstanceUID

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
        """Claim and run one job. Returns False when nothing was queued."""
        claimed = self.claim()
        if claimed is None:
            return False
        job_id, study_id, study_uid = claimed
        log.info("analysing study #%d (job %d)", study_id, job_id)
        analysis = self.analyzer.analyze(study_uid, self._series_files(study_id))
        self._record(job_id, study_id, analysis)
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

    def _record(self, job_id: int, study_id: int, analysis: StudyAnalysis) -> None:
        now = datetime.now(UTC)
        mask_paths: dict[str, str] = {}
        for name, overlay in analysis.overlays.items():
            path = overlay_path(self.results_dir, analysis.StudyInstanceUID, name)
            save_overlay(path, overlay)
            mask_paths[name] = str(path)
        with self.db.session() as s:
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
            job = s.get(JobRow, job_id)
            study = s.get(StudyRow, study_id)
            assert job is not None and study is not None
            failed = analysis.ai_status == AIStatus.failed
            job.state = JobState.failed if failed else JobState.done
            job.error = analysis.error
            job.finished_at = now
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
