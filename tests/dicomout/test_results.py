"""The DICOM results of an analysis, made from a stored study: files in the results folder,
rows in the index, an export queued per destination; a negative finding gets its report; a
new analysis replaces the model's results; a failure is recorded and never raised; the worker
makes them after recording the findings."""

from __future__ import annotations

import logging
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select, update

from tests.dicomout.builders import dciodvfy, dciodvfy_path
from tests.dicomout.stored import PATIENT_ID, PATIENT_NAME, StoredStudy, store_cube_study
from triage.analysis import SeriesFiles, StudyAnalysis
from triage.db import Database
from triage.db.tables import DicomResultRow, JobRow, ResultExportRow, SeriesRow, StudyRow
from triage.dicomout.index import results_document
from triage.dicomout.results import SEG_SERIES_NUMBER, SR_SERIES_NUMBER, make_results
from triage.domain import AIStatus, Finding, JobState, SeriesState
from triage.jobs.worker import Worker
from triage.results import Overlay
from triage.worklist.service import study_detail

DESTINATIONS = ("PACS@pacs.example:104", "VIEWER@10.0.0.9:11112")


def _make(db: Database, tmp_path: Path, study: StoredStudy, **kwargs: Any) -> Any:
    return make_results(
        db,
        study.StudyInstanceUID,
        findings=[study.finding],
        overlays=study.overlays,
        results_dir=tmp_path / "results",
        destinations=DESTINATIONS,
        **kwargs,
    )


def _rows(db: Database) -> list[DicomResultRow]:
    with db.session() as s:
        return list(s.scalars(select(DicomResultRow).order_by(DicomResultRow.id)))


def _exports(db: Database) -> list[ResultExportRow]:
    with db.session() as s:
        return list(s.scalars(select(ResultExportRow).order_by(ResultExportRow.id)))


def _items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item of an SR, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _validate(path: Path) -> None:
    if dciodvfy_path() is None:
        return  # dicom3tools not installed: the content checks still ran
    result = dciodvfy(path)
    assert result.errors == [], result.errors


def test_a_positive_finding_gets_a_segmentation_and_a_report(db: Database, tmp_path: Path) -> None:
    study = store_cube_study(db, tmp_path)
    (outcome,) = _make(db, tmp_path, study)
    assert outcome.error is None and [r.kind.value for r in outcome.made] == ["seg", "sr"]

    seg_row, sr_row = _rows(db)
    assert (seg_row.kind, sr_row.kind) == ("seg", "sr")
    assert seg_row.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert sr_row.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    for row in (seg_row, sr_row):
        path = Path(row.path)
        assert path.is_file() and path.is_relative_to(tmp_path / "results")
        assert row.SOPInstanceUID not in str(path)  # stored under hashes, not UIDs
        assert (row.finding, row.model_name) == ("intracranial_haemorrhage", "blast-ct-v1")
    assert not list((tmp_path / "results").rglob("*.part"))

    seg = hd.seg.segread(seg_row.path)
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert seg.SOPInstanceUID == seg_row.SOPInstanceUID
    assert seg.SeriesNumber == SEG_SERIES_NUMBER
    assert seg.StudyInstanceUID == study.StudyInstanceUID
    assert {uid for _, _, uid in seg.get_source_image_uids()} <= study.source_uids
    assert [s.TrackingID for s in seg.SegmentSequence] == ["IPH"]  # one segment: the cube
    assert str(seg.PatientName) == PATIENT_NAME and seg.PatientID == PATIENT_ID

    sr = hd.sr.srread(sr_row.path)
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.SeriesNumber == SR_SERIES_NUMBER
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for series in sr.CurrentRequestedProcedureEvidenceSequence
        for item in series.ReferencedSeriesSequence
        for i in item.ReferencedSOPSequence
    }
    assert seg_row.SOPInstanceUID in evidence and study.source_uids <= evidence
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.reference_type == codes.DCM.ReferencedSegment
    assert group.referenced_segment is not None
    (volume,) = group.get_measurements()
    assert volume.value == pytest.approx(study.finding.volumes_ml["IPH"])
    _validate(Path(seg_row.path))
    _validate(Path(sr_row.path))

    # One pending export per destination and result.
    exports = _exports(db)
    assert sorted((e.result_id, e.destination) for e in exports) == sorted(
        (row.id, d) for row in (seg_row, sr_row) for d in DESTINATIONS
    )
    assert {(e.state, e.attempts, e.next_at, e.sent_at) for e in exports} == {
        ("pending", 0, None, None)
    }


def test_a_negative_finding_is_reported_without_a_segmentation(
    db: Database, tmp_path: Path
) -> None:
    study = store_cube_study(db, tmp_path, bleed=False)
    assert study.finding.flag is False
    (outcome,) = _make(db, tmp_path, study)
    assert outcome.error is None and [r.kind.value for r in outcome.made] == ["sr"]
    (row,) = _rows(db)
    sr = hd.sr.srread(row.path)
    assert not sr.content.get_volumetric_roi_measurement_groups()
    codes = [c for item in _items(sr) for c in item.get("ConceptCodeSequence", [])]
    assert "272519000" in {c.CodeValue for c in codes}  # SCT Absent
    assert "52101004" not in {c.CodeValue for c in codes}  # not Present
    assert len(_exports(db)) == len(DESTINATIONS)


def test_a_new_analysis_replaces_the_models_results(db: Database, tmp_path: Path) -> None:
    study = store_cube_study(db, tmp_path)
    _make(db, tmp_path, study)
    first = _rows(db)
    _make(db, tmp_path, study)
    second = _rows(db)
    assert len(second) == 2
    assert {r.SOPInstanceUID for r in first}.isdisjoint(r.SOPInstanceUID for r in second)
    assert {r.SeriesInstanceUID for r in first}.isdisjoint(r.SeriesInstanceUID for r in second)
    assert not any(Path(r.path).exists() for r in first)
    assert all(Path(r.path).is_file() for r in second)
    ids = {r.id for r in second}
    assert {e.result_id for e in _exports(db)} == ids and len(_exports(db)) == 4
    assert len(list((tmp_path / "results").rglob("*.dcm"))) == 2


def test_a_failure_is_recorded_not_raised_and_logs_no_patient_data(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    study = store_cube_study(db, tmp_path)
    _make(db, tmp_path, study)
    old = _rows(db)
    # The overlay names classes beyond its labels' range: the mapping refuses it.
    bad = Overlay(**{**vars(study.overlay), "classes": ()})
    (outcome,) = make_results(
        db,
        study.StudyInstanceUID,
        findings=[study.finding],
        overlays={study.finding.finding: bad},
        results_dir=tmp_path / "results",
        destinations=DESTINATIONS,
    )
    assert outcome.made == () and outcome.error and "classes" in outcome.error
    # The earlier results describe an analysis that was replaced: they go.
    assert _rows(db) == [] and _exports(db) == []
    assert not any(Path(r.path).exists() for r in old)
    doc = results_document(db, study.StudyInstanceUID)
    assert doc is not None and doc["results"] == []
    (recorded,) = doc["outcomes"]
    assert recorded["status"] == "failed" and recorded["model"] == "blast-ct-v1"
    assert "classes" in recorded["error"]
    assert "not made: ValueError" in caplog.text
    assert PATIENT_NAME not in caplog.text and "QUIXOTE" not in caplog.text
    assert PATIENT_ID not in caplog.text


def test_no_warning_or_log_line_carries_the_patient_name(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """highdicom warns about a one-component person name, quoting it: kept out."""
    caplog.set_level(logging.DEBUG)
    study = store_cube_study(db, tmp_path, patient_name="ZEBEDIAHONLY")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (outcome,) = _make(db, tmp_path, study)
    assert outcome.error is None
    assert not [w for w in caught if "ZEBEDIAHONLY" in str(w.message)]
    assert "ZEBEDIAHONLY" not in caplog.text


def test_findings_without_a_label_overlay_with_geometry_get_none(
    db: Database, tmp_path: Path
) -> None:
    study = store_cube_study(db, tmp_path)
    old_style = Overlay(
        **{**vars(study.overlay), "grid_origin": None, "grid_spacing": None, "grid_direction": None}
    )
    out = make_results(
        db,
        study.StudyInstanceUID,
        findings=[study.finding],
        overlays={study.finding.finding: old_style},
        results_dir=tmp_path / "results",
    )
    assert out == [] and _rows(db) == []


class _Analysed:
    """Stands in for the analyzer: the study's analysis with a given finding and overlay (the
    network does not run)."""

    def __init__(self, study_uid: str, finding: Finding, overlay: Overlay) -> None:
        self.study_uid, self.finding, self.overlay = study_uid, finding, overlay

    def analyze(self, study_uid: str, series: list[SeriesFiles]) -> StudyAnalysis:
        assert study_uid == self.study_uid
        return StudyAnalysis(
            study_uid,
            AIStatus.ok,
            findings=[self.finding],
            overlays={self.finding.finding: self.overlay},
            routing={"models": [{"model": "blast-ct-v1", "run": True}]},
        )


def _run_worker(db: Database, tmp_path: Path, analysed: _Analysed, **kwargs: Any) -> None:
    worker = Worker(
        db=db,
        analyzer=analysed,  # type: ignore[arg-type]
        results_dir=tmp_path / "results",
        quiet_seconds=1,
        **kwargs,
    )
    with db.session() as s:
        study_id = s.scalars(select(StudyRow.id)).one()
        s.execute(update(SeriesRow).values(state=SeriesState.complete))  # assembled
        s.add(JobRow(study_id=study_id, state=JobState.queued, created_at=datetime.now(UTC)))
    assert worker.run_one()


def test_the_worker_makes_the_results_after_an_analysis(db: Database, tmp_path: Path) -> None:
    study = store_cube_study(db, tmp_path)
    analysed = _Analysed(study.StudyInstanceUID, study.finding, study.overlay)
    _run_worker(db, tmp_path, analysed, result_destinations=DESTINATIONS[:1])
    rows = _rows(db)
    assert [r.kind for r in rows] == ["seg", "sr"]
    assert [e.destination for e in _exports(db)] == [DESTINATIONS[0]] * 2
    doc = study_detail(db, study.StudyInstanceUID)
    assert doc is not None and doc["ai_status"] == "ok"
    assert [r["kind"] for r in doc["dicom_results"]] == ["seg", "sr"]
    assert doc["dicom_results"][0]["exports"][0]["state"] == "pending"
    assert doc["routing"]["models"][0]["model"] == "blast-ct-v1"  # the analysis's routing kept
    assert doc["routing"]["dicom_output"][0]["status"] == "made"


def test_the_worker_fails_open_when_results_cannot_be_made(db: Database, tmp_path: Path) -> None:
    study = store_cube_study(db, tmp_path)
    # A finding the report has no code for: the analysis stands, the failure is recorded.
    odd = Finding(**{**vars(study.finding), "finding": "unknown_finding"})
    _run_worker(db, tmp_path, _Analysed(study.StudyInstanceUID, odd, study.overlay))
    with db.session() as s:
        row = s.scalars(select(StudyRow)).one()
        job = s.scalars(select(JobRow)).one()
        assert row.ai_status == "ok" and job.state == "done"
        (outcome,) = (row.routing or {})["dicom_output"]
    assert outcome["status"] == "failed" and "no DICOM code" in outcome["error"]
    assert _rows(db) == [] and not list((tmp_path / "results").rglob("*.dcm"))


def test_results_document_of_an_unknown_study_is_none(db: Database) -> None:
    assert results_document(db, "1.2.3.4.5") is None


def test_the_files_are_part10_with_the_right_meta(db: Database, tmp_path: Path) -> None:
    study = store_cube_study(db, tmp_path)
    _make(db, tmp_path, study)
    for row in _rows(db):
        ds = pydicom.dcmread(row.path)
        assert ds.file_meta.MediaStorageSOPInstanceUID == row.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == row.SOPClassUID
        assert ds.SeriesInstanceUID == row.SeriesInstanceUID
