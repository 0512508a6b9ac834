"""The worker on a real database: routing without a model, fail-open, crash recovery."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from tests.conftest import make_analyzer, pydicom_file
from triage.analysis import StudyAnalysis
from triage.db import Database
from triage.db.tables import JobRow, StudyRow
from triage.domain import AIStatus
from triage.ingest.assembly import complete_quiet_series
from triage.ingest.store import ingest_instance
from triage.jobs.worker import Worker


@pytest.fixture()
def worker(tmp_path: Path, db: Database) -> Worker:
    # An empty mirror and no downloads: any attempt to load weights fails loudly.
    analyzer = make_analyzer(tmp_path / "models", tmp_path / "none")
    return Worker(db=db, analyzer=analyzer, results_dir=tmp_path / "results", quiet_seconds=1)


def receive(
    worker: Worker, tmp_path: Path, name: str, complete: bool = True, **changes: object
) -> None:
    ds = pydicom.dcmread(pydicom_file(name))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    receive_dataset(worker, tmp_path, ds, complete)


def receive_dataset(
    worker: Worker, tmp_path: Path, ds: pydicom.Dataset, complete: bool = True
) -> None:
    (tmp_path / "incoming").mkdir(exist_ok=True)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    t0 = datetime.now(UTC) - timedelta(seconds=5)
    outcome = ingest_instance(
        data,
        db=worker.db,
        store_dir=tmp_path / "dicom",
        tmp_dir=tmp_path / "incoming",
        quarantine_dir=tmp_path / "quarantine",
        source="test",
        now=t0,
    )
    assert outcome.ok, outcome.reason
    if complete:
        assert complete_quiet_series(worker.db, quiet_seconds=1)


def test_extremity_radiograph_gets_no_applicable_model(worker: Worker, tmp_path: Path) -> None:
    receive(worker, tmp_path, "RG3_UNCR.dcm")  # an AP knee: no model reads extremities
    assert worker.run_one()
    assert not worker.run_one()  # nothing else queued
    with worker.db.session() as s:
        study = s.scalars(select(StudyRow)).one()
        assert study.ai_status == "no_applicable_model"
        assert study.routing and "reads CR/DX CHEST" in study.routing["reason"]
        assert "EXTREMITY" in study.routing["reason"]
        assert s.scalars(select(JobRow.state)).one() == "done"


def test_chest_radiograph_without_weights_fails_naming_the_file(
    worker: Worker, tmp_path: Path
) -> None:
    receive(worker, tmp_path, "RG1_UNCR.dcm")  # a PA chest: the chest model reads it
    assert worker.run_one()
    with worker.db.session() as s:
        study = s.scalars(select(StudyRow)).one()
        assert study.ai_status == "failed"
        assert study.ai_error
        assert "xrv-densenet121-res224-all/nih-pc-chex-mimic" in study.ai_error
        assert "TRIAGE_MODEL_MIRROR" in study.ai_error
        assert study.routing and study.routing["model"] == "xrv-densenet121-res224-all"
        (chest,) = [m for m in study.routing["models"] if m["run"]]
        assert chest["status"] == "failed" and "TRIAGE_MODEL_MIRROR" in chest["error"]
        assert s.scalars(select(JobRow.state)).one() == "failed"


def test_a_single_head_ct_slice_is_an_incomplete_series(worker: Worker, tmp_path: Path) -> None:
    # One head CT slice: the haemorrhage model would read the study, but not one slice.
    receive(worker, tmp_path, "CT_small.dcm", BodyPartExamined="HEAD", ContrastBolusAgent="")
    assert worker.run_one()
    with worker.db.session() as s:
        study = s.scalars(select(StudyRow)).one()
        job = s.scalars(select(JobRow)).one()
        assert study.ai_status == "incomplete_series"
        assert job.state == "done"
        assert study.ai_error and study.ai_error.startswith("incomplete series")
        assert study.routing and study.routing["models"][0]["incomplete"] is True


def test_head_ct_that_cannot_be_analysed_fails_open(worker: Worker, tmp_path: Path) -> None:
    # A head CT series the router accepts whose pixels cannot be read: failed, with reason.
    for i in range(12):
        receive(
            worker,
            tmp_path,
            "CT_small.dcm",
            BodyPartExamined="HEAD",
            SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.99.{i}",
            ImagePositionPatient=[0.0, 0.0, 10.0 * i],
            SliceThickness=5.0,
            ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
            ContrastBolusAgent="",
            BitsStored=17,  # more bits than allocated: undecodable
            complete=i == 11,
        )
    assert worker.run_one()
    with worker.db.session() as s:
        study = s.scalars(select(StudyRow)).one()
        job = s.scalars(select(JobRow)).one()
        assert study.ai_status == "failed", study.ai_error
        assert job.state == "failed"
        assert study.ai_error
        assert study.routing and study.routing["model"] == "blast-ct-v1"


def test_a_job_whose_worker_died_is_finished_by_another(
    worker: Worker, tmp_path: Path, db: Database
) -> None:
    receive(worker, tmp_path, "RG3_UNCR.dcm")
    dead = Worker(
        db=db,
        analyzer=worker.analyzer,
        results_dir=tmp_path / "results",
        quiet_seconds=1,
        worker_id="dead:1",
        lease_seconds=1,
    )
    claimed = dead.claim()  # claimed, then never renewed (a process killed with SIGKILL)
    assert claimed is not None and claimed.attempts == 1
    assert worker.claim() is None  # running jobs are not handed out twice
    assert not worker.requeue_expired()  # its lease has not lapsed yet
    with db.session() as s:  # time passes: the lease lapses
        s.execute(update(JobRow).values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert worker.requeue_expired().queued == (claimed.job_id,)
    assert worker.run_one()
    with worker.db.session() as s:
        job = s.scalars(select(JobRow)).one()
        assert (job.state, job.worker_id, job.attempts) == ("done", worker.worker_id, 2)
        assert job.lease_expires_at is None
    # The dead worker, had it come back, records nothing: the job is no longer its own.
    assert not dead._record(claimed, StudyAnalysis(claimed.StudyInstanceUID, AIStatus.failed))
    with worker.db.session() as s:
        assert s.scalars(select(JobRow.state)).one() == "done"
        assert s.scalars(select(StudyRow.ai_status)).one() == "no_applicable_model"


def test_a_stopping_worker_gives_its_job_back(worker: Worker, tmp_path: Path) -> None:
    receive(worker, tmp_path, "RG3_UNCR.dcm")
    claimed = worker.claim()
    assert claimed is not None
    worker._current = claimed  # as run_one holds it while the analysis runs
    worker.stop(timeout=0)
    with worker.db.session() as s:
        job = s.scalars(select(JobRow)).one()
        assert (job.state, job.worker_id, job.lease_expires_at, job.attempts) == (
            "queued",
            None,
            None,
            0,  # a job given back does not count against its attempts
        )


def test_one_model_raising_leaves_the_others_findings_and_the_study_ranked(
    tmp_path: Path, db: Database
) -> None:
    """A head CT and a chest radiograph in one study; BLAST-CT raises (a bug, a driver
    crash), the chest model still reports, and the study is ranked with its findings."""
    from tests.conftest import write_chest_weights
    from tests.fake_models import exploding
    from triage.demo.phantom import PhantomSpec, write_head_ct_series
    from triage.worklist.service import worklist

    mirror = tmp_path / "mirror"
    write_chest_weights(mirror)
    analyzer = make_analyzer(tmp_path / "models", mirror, factories={"blast-ct": exploding})
    worker = Worker(db=db, analyzer=analyzer, results_dir=tmp_path / "results", quiet_seconds=1)
    head = write_head_ct_series(tmp_path / "ct", PhantomSpec(seed=8))
    study_uid = str(pydicom.dcmread(head[0], stop_before_pixels=True).StudyInstanceUID)
    for path in head:
        ds = pydicom.dcmread(path)
        receive_dataset(worker, tmp_path, ds, complete=False)
    receive(worker, tmp_path, "RG1_UNCR.dcm", StudyInstanceUID=study_uid)
    assert worker.run_one()

    doc = worklist(db)
    (item,) = doc["items"]
    assert item["StudyInstanceUID"] == study_uid and item["rank"] == 1
    assert item["ai_status"] == "partial"
    assert item["ai_error"] == "blast-ct-v1: internal error (RuntimeError)"
    models = {f["model"]["name"] for f in item["findings"]}
    assert models == {"xrv-densenet121-res224-all"}
    pneumothorax = next(f for f in item["findings"] if f["finding"] == "pneumothorax")
    if pneumothorax["flag"]:  # random weights: the policy follows whatever they say
        assert item["priority_class"] == "critical"
        assert "ai:pneumothorax" in item["reasons"]
    with db.session() as s:
        assert s.scalars(select(JobRow.state)).one() == "done"
