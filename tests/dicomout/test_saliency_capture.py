"""The chest model's saliency as a DICOM Secondary Capture: a real radiograph (SIIM-ACR, CR,
MONOCHROME2 and its MONOCHROME1 relabelling) stored through ingest, the model's heatmap
overlay made by the model's own ``interpret`` from a synthetic Grad-CAM map (the network does
not run); the capture read back by pydicom and highdicom (references, patient and study,
colour where the map is high, the windowed grey elsewhere, the caption), validated by
dicom3tools, indexed as ``sc``, sent by C-STORE; none for a finding not flagged, and a new
analysis that flags nothing removes the earlier one."""

from __future__ import annotations

import logging
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from sqlalchemy import select

from tests.dicomout.builders import dciodvfy, dciodvfy_path
from tests.dicomout.test_results import _Analysed, _run_worker
from tests.dicomout.test_send import Store
from triage.db import Database
from triage.db.tables import DicomResultRow, ResultExportRow
from triage.dicomout.index import results_document
from triage.dicomout.results import SC_SERIES_NUMBER, eligible, make_results
from triage.dicomout.sc import heat_blend_table
from triage.dicomout.send import ExportConfig, ResultSender
from triage.dicomweb.query import study_series
from triage.domain import Finding
from triage.ingest.store import ingest_instance
from triage.models import chest
from triage.models.catalog import builtin_spec
from triage.results import Overlay

pytestmark = pytest.mark.realdata

SPEC = builtin_spec("xrv-densenet121-res224-all")
MODEL = SPEC.name
PATIENT_NAME = "RADIOGRAPH^ROSALIND"
PATIENT_ID = "PID-SC-4711"
ACCESSION = "ACC-SC-1"
DESTINATIONS = ("PACS@pacs.example:104",)
CAPTION_ROWS = 48  # the caption band at the bottom of a 1024-row image, and a margin

# The synthetic Grad-CAM map on the network's 224 x 224 input: a hot block and a warm block.
HOT = (slice(40, 80), slice(30, 90))
WARM = (slice(130, 170), slice(140, 190))
WARM_VALUE = 0.3


def _heat() -> np.ndarray:
    heat = np.zeros((224, 224), dtype=np.float32)
    heat[HOT] = 1.0
    heat[WARM] = WARM_VALUE
    return heat


def _source_box(block: tuple[slice, slice], side: int, inset: int = 12) -> tuple[slice, slice]:
    """A 224-grid block on a square source of ``side`` pixels, shrunk by ``inset`` pixels on
    every side (away from the bilinear edges)."""
    f = side / 224
    rows, cols = block
    return (
        slice(round(rows.start * f) + inset, round(rows.stop * f) - inset),
        slice(round(cols.start * f) + inset, round(cols.stop * f) - inset),
    )


def _cold(shape: tuple[int, int]) -> np.ndarray:
    """Where the map is 0 with room to spare: away from both blocks and above the caption."""
    f = shape[0] / 224
    mask = np.ones(shape, dtype=bool)
    for rows, cols in (HOT, WARM):
        mask[
            max(0, round(rows.start * f) - 16) : round(rows.stop * f) + 16,
            max(0, round(cols.start * f) - 16) : round(cols.stop * f) + 16,
        ] = False
    mask[-CAPTION_ROWS:] = False
    return mask


def _store(db: Database, data_dir: Path, source: Path) -> Path:
    """Ingests the radiograph (with a known patient and accession); its stored path."""
    (data_dir / "incoming").mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    outcome = ingest_instance(
        buf.getvalue(),
        db=db,
        store_dir=data_dir / "dicom",
        tmp_dir=data_dir / "incoming",
        quarantine_dir=data_dir / "quarantine",
        source="test",
    )
    assert outcome.ok, outcome.reason
    return Path(next((data_dir / "dicom").rglob("*.dcm")))


def _model_output(
    path: Path, flagged: dict[str, float]
) -> tuple[list[Finding], dict[str, Overlay]]:
    """The chest model's findings and overlays for the radiograph, through its own
    ``prepare`` and ``interpret``: every finding in ``flagged`` scored as given with the
    synthetic map; pneumothorax (critical) always gets the map, as the model does."""
    model = chest.ChestXrayModel(SPEC, None, device="cpu")
    prepared = model.prepare([path])
    n = len(SPEC.outputs)
    score = np.full((1, n), 0.05, dtype=np.float32)
    saliency = {"pneumothorax": (0, _heat())}
    for code, value in flagged.items():
        score[0, SPEC.outputs.index(SPEC.finding(code).outputs[0])] = value
        saliency[code] = (0, _heat())
    raw = chest.ChestRaw(probability=score.copy(), score=score, saliency=saliency)
    series_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    output = model.interpret(prepared, raw, series_uid)
    return list(output.findings), dict(output.overlays)


def _make(
    db: Database, tmp_path: Path, study_uid: str, findings: list[Finding], overlays: dict
) -> list:
    return make_results(
        db,
        study_uid,
        findings=findings,
        overlays=overlays,
        results_dir=tmp_path / "results",
        destinations=DESTINATIONS,
    )


def _rows(db: Database) -> list[DicomResultRow]:
    with db.session() as s:
        return list(s.scalars(select(DicomResultRow).order_by(DicomResultRow.id)))


def _exports(db: Database) -> list[ResultExportRow]:
    with db.session() as s:
        return list(s.scalars(select(ResultExportRow).order_by(ResultExportRow.id)))


@pytest.mark.parametrize("name", ["siim-cr-chest.dcm", "siim-cr-chest-monochrome1.dcm"])
def test_a_flagged_findings_saliency_becomes_a_secondary_capture(
    db: Database, tmp_path: Path, xray_dir: Path, name: str
) -> None:
    stored = _store(db, tmp_path / "data", xray_dir / name)
    source = pydicom.dcmread(stored)
    findings, overlays = _model_output(stored, {"pneumothorax": 0.91})
    (outcome,) = _make(db, tmp_path, str(source.StudyInstanceUID), findings, overlays)
    assert (outcome.model, outcome.finding, outcome.error) == (MODEL, "pneumothorax", None)
    assert [r.kind.value for r in outcome.made] == ["sc"]

    (row,) = _rows(db)
    assert (row.kind, row.finding, row.model_name) == ("sc", "pneumothorax", MODEL)
    assert row.SOPClassUID == SecondaryCaptureImageStorage == "1.2.840.10008.5.1.4.1.1.7"
    path = Path(row.path)
    assert path.is_relative_to(tmp_path / "results") and path.name.startswith("sc-")
    assert row.SOPInstanceUID not in str(path)
    assert [e.destination for e in _exports(db)] == list(DESTINATIONS)
    assert {(e.state, e.attempts) for e in _exports(db)} == {("pending", 0)}
    doc = results_document(db, str(source.StudyInstanceUID))
    assert doc is not None
    assert [(r["kind"], r["SOPInstanceUID"]) for r in doc["results"]] == [
        ("sc", row.SOPInstanceUID)
    ]
    assert [(o["status"], o["model"]) for o in doc["outcomes"]] == [("made", MODEL)]
    series = study_series(db, str(source.StudyInstanceUID))  # what DICOMweb lists
    assert series is not None
    assert [(e.Modality, e.SeriesNumber) for e in series if e.paths == (path,)] == [("OT", 9903)]

    # Read back by pydicom: the study and patient of the source, a new AI series, references.
    sc = pydicom.dcmread(path)
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (sc.SOPClassUID, sc.SOPInstanceUID) == (SecondaryCaptureImageStorage, row.SOPInstanceUID)
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "AccessionNumber"):
        assert sc[keyword].value == source[keyword].value, keyword
    assert (str(sc.PatientName), sc.AccessionNumber) == (PATIENT_NAME, ACCESSION)
    assert sc.SeriesInstanceUID == row.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SeriesNumber == SC_SERIES_NUMBER == 9903 and sc.InstanceNumber == 1
    assert "AI" in sc.SeriesDescription and "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
    assert sc.BurnedInAnnotation == "YES"
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert f"{MODEL} {SPEC.version}" in sc.ImageComments
    assert "score 0.9100" in sc.ImageComments and "pneumothorax" in sc.ImageComments
    (derived,) = sc.SourceImageSequence
    (related,) = sc.ReferencedImageSequence
    for item in (derived, related):
        assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert item.ReferencedSOPClassUID == source.SOPClassUID
    assert derived.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert sc.PixelSpacing == source.PixelSpacing
    assert sc.LossyImageCompression == "01"  # the source was JPEG baseline
    assert "PatientAge" not in sc and "PatientAge" in source  # SIIM's "62" is no age string

    # ... and by highdicom.
    image = hd.imread(path)
    assert (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID) in (
        image.get_source_image_uids()
    )

    # The pixels: the radiograph at its size, windowed (no VOI in the file: the stored range)
    # and inverted for MONOCHROME1, the saliency coloured where the map is high.
    rgb = sc.pixel_array
    assert sc.PhotometricInterpretation == "RGB" and rgb.shape == (source.Rows, source.Columns, 3)
    stored_values = pixel_array(source)
    grey = 255 - stored_values if name.endswith("monochrome1.dcm") else stored_values
    cold = _cold(grey.shape)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel][cold], grey[cold])
    table = heat_blend_table()
    hot = _source_box(HOT, source.Rows)
    assert np.array_equal(rgb[hot], table[255][grey[hot]])  # yellow, half over the grey
    assert np.all(rgb[hot][..., 0] == rgb[hot][..., 1])
    assert np.all(rgb[hot][..., 0].astype(int) - rgb[hot][..., 2] >= 127)
    warm = _source_box(WARM, source.Rows)
    r, g, b = (rgb[warm][..., c].astype(int) for c in range(3))
    assert np.all(r > g) and np.array_equal(g, b)  # red, below the yellow half of the scale
    # The caption: white letters on a black band along the bottom.
    band = rgb[-20:]
    assert (band == 0).all(axis=-1).mean() > 0.5 and (band == 255).all(axis=-1).any()

    if dciodvfy_path() is not None:  # dicom3tools installed: no Error lines
        assert dciodvfy(path).errors == []


def test_an_unflagged_finding_makes_none(db: Database, tmp_path: Path, xray_dir: Path) -> None:
    stored = _store(db, tmp_path / "data", xray_dir / "siim-cr-chest.dcm")
    findings, overlays = _model_output(stored, {"pneumothorax": 0.2})
    (pneumothorax,) = [f for f in findings if f.finding == "pneumothorax"]
    assert not pneumothorax.flag and overlays["pneumothorax"].kind == "heatmap"
    assert eligible(pneumothorax, overlays) is None
    study_uid = str(pydicom.dcmread(stored, stop_before_pixels=True).StudyInstanceUID)
    assert _make(db, tmp_path, study_uid, findings, overlays) == []
    assert _rows(db) == [] and _exports(db) == []
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.dcm"))


def test_captures_of_one_analysis_share_a_series_and_a_new_analysis_replaces_them(
    db: Database, tmp_path: Path, xray_dir: Path
) -> None:
    stored = _store(db, tmp_path / "data", xray_dir / "siim-cr-chest.dcm")
    study_uid = str(pydicom.dcmread(stored, stop_before_pixels=True).StudyInstanceUID)
    findings, overlays = _model_output(stored, {"pneumothorax": 0.8, "pleural_effusion": 0.7})
    outcomes = _make(db, tmp_path, study_uid, findings, overlays)
    assert [(o.finding, o.error) for o in outcomes] == [
        ("pneumothorax", None),
        ("pleural_effusion", None),
    ]
    first = _rows(db)
    captures = [pydicom.dcmread(r.path, stop_before_pixels=True) for r in first]
    assert len({c.SeriesInstanceUID for c in captures}) == 1
    assert [c.InstanceNumber for c in captures] == [1, 2]

    # The next analysis flags nothing: the captures of the replaced one go, with their exports.
    findings, overlays = _model_output(stored, {})
    assert _make(db, tmp_path, study_uid, findings, overlays) == []
    assert _rows(db) == [] and _exports(db) == []
    assert not any(Path(r.path).exists() for r in first)
    doc = results_document(db, study_uid)
    assert doc is not None and doc["results"] == [] and doc["outcomes"] == []


def test_a_failure_is_recorded_and_logs_no_patient_data(
    db: Database, tmp_path: Path, xray_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stored = _store(db, tmp_path / "data", xray_dir / "siim-cr-chest.dcm")
    study_uid = str(pydicom.dcmread(stored, stop_before_pixels=True).StudyInstanceUID)
    findings, overlays = _model_output(stored, {"pneumothorax": 0.9})
    elsewhere = replace(overlays["pneumothorax"], SOPInstanceUID="1.2.3.4.5")
    (outcome,) = _make(db, tmp_path, study_uid, findings, {"pneumothorax": elsewhere})
    assert outcome.made == () and outcome.error and "not stored" in outcome.error
    assert _rows(db) == []
    doc = results_document(db, study_uid)
    assert doc is not None
    (recorded,) = doc["outcomes"]
    assert (recorded["status"], recorded["model"]) == ("failed", MODEL)
    assert PATIENT_NAME not in caplog.text and "ROSALIND" not in caplog.text
    assert PATIENT_ID not in caplog.text


def test_the_worker_makes_it_and_the_sender_stores_it(
    db: Database, tmp_path: Path, xray_dir: Path
) -> None:
    stored = _store(db, tmp_path / "data", xray_dir / "siim-cr-chest.dcm")
    study_uid = str(pydicom.dcmread(stored, stop_before_pixels=True).StudyInstanceUID)
    findings, overlays = _model_output(stored, {"pneumothorax": 0.9})
    (pneumothorax,) = [f for f in findings if f.finding == "pneumothorax"]
    with Store() as store:
        analysed = _Analysed(study_uid, pneumothorax, overlays["pneumothorax"])
        _run_worker(db, tmp_path, analysed, result_destinations=[store.destination.name])
        (row,) = _rows(db)
        assert row.kind == "sc"
        config = ExportConfig(timeout_seconds=5)
        assert ResultSender(db, [store.destination], config).send_due() == 1
    assert [uid for uid, _, _ in store.received] == [row.SOPInstanceUID]
    assert {(e.state, e.attempts) for e in _exports(db)} == {("sent", 1)}
