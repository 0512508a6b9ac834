"""The AI's DICOM results through DICOMweb: QIDO-RS lists the Segmentation and the SR as
series of their study, and WADO-RS returns the Segmentation as a file highdicom reads."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient

from tests.dicomout.stored import StoredStudy, store_cube_study
from tests.signin import token_for
from triage.auth.roles import Role
from triage.db import Database
from triage.dicomout.results import make_results
from triage.serve.app import create_app
from triage.serve.multipart import parse_media_type, split_multipart


@pytest.fixture()
def study(db: Database, tmp_path: Path) -> StoredStudy:
    study = store_cube_study(db, tmp_path)
    make_results(
        db,
        study.StudyInstanceUID,
        findings=[study.finding],
        overlays=study.overlays,
        results_dir=tmp_path / "results",
        destinations=[],
    )
    return study


def reader(db: Database) -> TestClient:
    token = token_for(db, "test-radiologist", Role.radiologist)
    return TestClient(create_app(db), headers={"Authorization": f"Bearer {token}"})


def value(doc: dict, keyword: str):  # type: ignore[no-untyped-def,type-arg]
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    return doc.get(tag, {}).get("Value", [None])[0]


def test_qido_lists_the_results_as_series(db: Database, study: StoredStudy) -> None:
    client = reader(db)
    res = client.get(f"/dicomweb/studies/{study.StudyInstanceUID}/series")
    assert res.status_code == 200 and res.headers["content-type"] == "application/dicom+json"
    modalities = sorted(value(d, "Modality") for d in res.json())
    assert modalities == ["CT", "SEG", "SR"]
    studies = client.get("/dicomweb/studies", params={"ModalitiesInStudy": "SEG"}).json()
    assert [value(d, "StudyInstanceUID") for d in studies] == [study.StudyInstanceUID]


def test_wado_returns_the_segmentation(db: Database, study: StoredStudy) -> None:
    client = reader(db)
    series = client.get(
        f"/dicomweb/studies/{study.StudyInstanceUID}/series", params={"Modality": "SEG"}
    ).json()
    (seg_series,) = [value(d, "SeriesInstanceUID") for d in series]
    res = client.get(f"/dicomweb/studies/{study.StudyInstanceUID}/series/{seg_series}")
    assert res.status_code == 200
    media, params = parse_media_type(res.headers["content-type"])
    assert media == "multipart/related" and params["type"] == "application/dicom"
    body = res.content
    (part,) = split_multipart(body, params["boundary"])
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(body[part.start : part.end]))
    seg = hd.seg.Segmentation.from_dataset(ds)
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced <= study.source_uids
    meta = client.get(
        f"/dicomweb/studies/{study.StudyInstanceUID}/series/{seg_series}/metadata"
    ).json()
    assert value(meta[0], "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation
