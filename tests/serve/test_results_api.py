"""A study's DICOM results over the API: the list with export states, the download (a DICOM
file pydicom reads, audited as an export), the study document, and who may call them."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.dicomout.stored import StoredStudy, store_cube_study
from tests.signin import token_for
from triage.audit.chain import listing
from triage.auth.roles import Role
from triage.db import Database
from triage.db.tables import ResultExportRow
from triage.dicomout.results import make_results
from triage.serve.app import create_app

DESTINATION = "PACS@192.0.2.10:104"


@pytest.fixture()
def study(db: Database, tmp_path: Path) -> StoredStudy:
    study = store_cube_study(db, tmp_path)
    make_results(
        db,
        study.StudyInstanceUID,
        findings=[study.finding],
        overlays=study.overlays,
        results_dir=tmp_path / "results",
        destinations=[DESTINATION],
    )
    return study


def client(db: Database, role: Role = Role.radiologist) -> TestClient:
    token = token_for(db, f"test-{role.value}", role)
    return TestClient(create_app(db), headers={"Authorization": f"Bearer {token}"})


def test_the_list_shows_each_result_with_its_export_state(db: Database, study: StoredStudy) -> None:
    uid = study.StudyInstanceUID
    with db.session() as s:  # as the sender leaves a failed attempt
        s.execute(
            update(ResultExportRow)
            .where(ResultExportRow.id == 1)
            .values(attempts=1, last_error="no association (connection refused)")
        )
    res = client(db).get(f"/api/studies/{uid}/results")
    assert res.status_code == 200, res.text
    doc = res.json()
    assert doc["StudyInstanceUID"] == uid
    seg, sr = doc["results"]
    assert (seg["kind"], sr["kind"]) == ("seg", "sr")
    assert seg["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.66.4"
    assert sr["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"
    assert seg["download"] == f"/api/studies/{uid}/results/{seg['SOPInstanceUID']}"
    assert "path" not in seg
    (export,) = seg["exports"]
    assert export["destination"] == DESTINATION and export["state"] == "pending"
    assert export["attempts"] == 1 and "refused" in export["last_error"]
    assert sr["exports"][0]["attempts"] == 0
    (outcome,) = doc["outcomes"]
    assert outcome["status"] == "made" and outcome["model"] == "blast-ct-v1"
    # The study document carries the same list.
    detail = client(db).get(f"/api/studies/{uid}").json()
    assert detail["dicom_results"] == doc["results"]


def test_a_download_is_the_dicom_object_and_is_audited(db: Database, study: StoredStudy) -> None:
    uid = study.StudyInstanceUID
    reader = client(db)
    results = reader.get(f"/api/studies/{uid}/results").json()["results"]
    for result in results:
        res = reader.get(result["download"])
        assert res.status_code == 200, res.text
        assert res.headers["content-type"] == "application/dicom"
        assert result["SOPInstanceUID"] in res.headers["content-disposition"]
        ds = pydicom.dcmread(BytesIO(res.content))
        assert ds.SOPInstanceUID == result["SOPInstanceUID"]
        assert ds.SOPClassUID == result["SOPClassUID"]
        assert ds.StudyInstanceUID == uid
    records = listing(db, action="export")[::-1]
    assert [r["detail"]["SOPInstanceUID"] for r in records] == [
        r["SOPInstanceUID"] for r in results
    ]
    for record, result in zip(records, results, strict=True):
        assert record["actor"] == "test-radiologist" and record["outcome"] == "success"
        assert (record["target_kind"], record["target"]) == ("study", uid)
        assert record["detail"]["kind"] == result["kind"]


def test_unknown_studies_and_objects_are_404_and_not_audited(
    db: Database, study: StoredStudy
) -> None:
    uid = study.StudyInstanceUID
    reader = client(db)
    sop = reader.get(f"/api/studies/{uid}/results").json()["results"][0]["SOPInstanceUID"]
    assert reader.get("/api/studies/1.2.3.999/results").status_code == 404
    assert reader.get(f"/api/studies/1.2.3.999/results/{sop}").status_code == 404  # not its study
    assert reader.get(f"/api/studies/{uid}/results/1.2.3.4.5").status_code == 404
    assert listing(db, action="export") == []


def test_a_missing_file_is_404(db: Database, study: StoredStudy, tmp_path: Path) -> None:
    uid = study.StudyInstanceUID
    reader = client(db)
    result = reader.get(f"/api/studies/{uid}/results").json()["results"][0]
    for path in (tmp_path / "results").rglob("seg-*.dcm"):
        path.unlink()
    res = reader.get(result["download"])
    assert res.status_code == 404 and "missing" in res.json()["detail"]


def test_only_accounts_that_see_patients_get_results(db: Database, study: StoredStudy) -> None:
    uid = study.StudyInstanceUID
    integration = client(db, Role.integration)
    sop = client(db).get(f"/api/studies/{uid}/results").json()["results"][0]["SOPInstanceUID"]
    assert integration.get(f"/api/studies/{uid}/results").status_code == 403
    assert integration.get(f"/api/studies/{uid}/results/{sop}").status_code == 403
    anonymous = TestClient(create_app(db))
    assert anonymous.get(f"/api/studies/{uid}/results/{sop}").status_code == 401
    assert listing(db, action="export") == []
