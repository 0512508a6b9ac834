"""The worker emits ``critical_finding`` in the transaction that records the findings.

The analyzer here is a test double returning a fixed :class:`StudyAnalysis` with a flagged
finding: the models themselves are tested in tests/models and tests/e2e; what is tested here
is what the worker does with a flagged finding (real database, real ingest and assembly).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from tests.jobs.test_worker import receive
from triage.analysis import SeriesFiles, StudyAnalysis
from triage.db import Database
from triage.db.tables import EventRow, FindingRow, JobRow
from triage.domain import AIStatus, Finding, ModelRef
from triage.events import outbox
from triage.jobs.worker import Worker
from triage.worklist.priority import FindingRule, PolicyConfig


class FakeAnalyzer:
    """Returns one haemorrhage finding with the given flag and score for every study."""

    def __init__(self, flag: bool = True, score: float = 0.95) -> None:
        self.flag = flag
        self.score = score

    def analyze(self, study_uid: str, series: list[SeriesFiles]) -> StudyAnalysis:
        finding = Finding(
            finding="intracranial_haemorrhage",
            flag=self.flag,
            score=self.score,
            volumes_ml={"IPH": 14.2, "EAH": 0.0, "IVH": 1.1},
            model=ModelRef("blast-ct-v1", "1.0"),
        )
        return StudyAnalysis(
            StudyInstanceUID=study_uid,
            ai_status=AIStatus.ok,
            findings=[finding],
            routing={"reason": "test double"},
        )


def make_worker(tmp_path: Path, analyzer: FakeAnalyzer, **opts: object) -> Worker:
    db = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    db.migrate()
    return Worker(
        db=db,
        analyzer=analyzer,  # type: ignore[arg-type]
        results_dir=tmp_path / "results",
        quiet_seconds=1,
        **opts,  # type: ignore[arg-type]
    )


def events(db: Database) -> list[EventRow]:
    with db.session() as s:
        return list(s.scalars(select(EventRow).order_by(EventRow.id)).all())


def test_flagged_critical_finding_is_alerted_once(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, FakeAnalyzer(), webhook_kinds={"critical_finding"})
    receive(worker, tmp_path, "CT_small.dcm", AccessionNumber="ACC-42")
    assert worker.run_one()
    (event,) = events(worker.db)
    assert event.kind == outbox.CRITICAL_FINDING
    assert event.webhook_state == "pending"
    with worker.db.session() as s:  # the findings committed with the event
        assert s.scalars(select(FindingRow.flag)).one() == 1
    payload = event.payload
    assert payload["StudyInstanceUID"] == event.StudyInstanceUID
    assert payload["AccessionNumber"] == "ACC-42"
    assert payload["finding"] == "intracranial_haemorrhage" and payload["score"] == 0.95
    assert payload["volumes_ml"]["IPH"] == 14.2
    assert payload["model"] == {"name": "blast-ct-v1", "version": "1.0", "weights_sha256": []}
    assert payload["time"] and payload["priority_class"] == "critical"
    text = str(payload)  # CT_small.dcm's patient: CompressedSamples^CT1, ID 1CT1
    assert "CompressedSamples" not in text and "1CT1" not in text

    # Analysed again (more instances arrived): the finding is still flagged, no new alert.
    with worker.db.session() as s:
        job = s.scalars(select(JobRow)).one()
        s.add(JobRow(study_id=job.study_id, state="queued", created_at=job.created_at))
    assert worker.run_one()
    assert len(events(worker.db)) == 1


def test_no_webhook_configured_means_not_queued_for_it(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, FakeAnalyzer())
    receive(worker, tmp_path, "CT_small.dcm")
    assert worker.run_one()
    (event,) = events(worker.db)
    assert event.kind == "critical_finding" and event.webhook_state is None


@pytest.mark.parametrize(
    ("analyzer", "policy"),
    [
        (FakeAnalyzer(flag=False), PolicyConfig()),
        # Below the configured confidence: the policy does not escalate.
        (
            FakeAnalyzer(score=0.4),
            PolicyConfig(findings={"intracranial_haemorrhage": FindingRule(min_score=0.5)}),
        ),
        # Escalated, but only to urgent: not a critical finding.
        (
            FakeAnalyzer(),
            PolicyConfig(findings={"intracranial_haemorrhage": FindingRule(escalate_to="urgent")}),
        ),
    ],
)
def test_findings_the_policy_does_not_make_critical_raise_no_alert(
    tmp_path: Path, analyzer: FakeAnalyzer, policy: PolicyConfig
) -> None:
    worker = make_worker(tmp_path, analyzer, policy=policy)
    receive(worker, tmp_path, "CT_small.dcm")
    assert worker.run_one()
    assert events(worker.db) == []
