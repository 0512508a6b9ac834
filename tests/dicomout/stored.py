"""A synthetic head CT study stored in a data folder (files and index, through ingest) with the
haemorrhage model's overlay and finding for it, made from a label map without running the
network: what the worker holds after an analysis."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom

from tests.dicomout.builders import BLEED_HU, BRAIN_HU, model_output, write_cube_series
from triage.db import Database
from triage.domain import Finding, ModelRef
from triage.ingest.store import ingest_instance
from triage.preprocess.ct import prepare_head_ct
from triage.results import Overlay

WEIGHTS = ("0" * 63 + "1", "0" * 63 + "2")
MODEL = ModelRef("blast-ct-v1", "1.0.0", WEIGHTS)
PATIENT_NAME = "QUIXOTE^ZEBEDIAH"
PATIENT_ID = "PID-RESULTS-913"


@dataclass(frozen=True)
class StoredStudy:
    StudyInstanceUID: str
    SeriesInstanceUID: str
    source_uids: frozenset[str]
    overlay: Overlay
    finding: Finding

    @property
    def overlays(self) -> dict[str, Overlay]:
        return {self.finding.finding: self.overlay}


def store_cube_study(
    db: Database,
    data_dir: Path,
    *,
    bleed: bool = True,
    name: str = "study",
    patient_name: str = PATIENT_NAME,
) -> StoredStudy:
    """A 40-slice axial head CT holding a 1 ml cube of blood, stored under ``data_dir``
    (``dicom/``, ``incoming/``, ``quarantine/``) and indexed in ``db``; its overlay labels the
    blood (class IPH) when ``bleed``, nothing otherwise (a negative finding)."""
    series = write_cube_series(data_dir / "sources" / name, "axial", size=64, n=40)
    (data_dir / "incoming").mkdir(parents=True, exist_ok=True)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = patient_name
        ds.PatientID = PATIENT_ID
        ds.BodyPartExamined = "HEAD"
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
    prepared = prepare_head_ct(series.paths, min_coverage_mm=None)
    labels = prepared.head_mask & (prepared.hu > (BRAIN_HU + BLEED_HU) / 2)
    if not bleed:
        labels[:] = False
    overlay, finding = model_output(prepared, labels.astype(np.uint8), prepared.SeriesInstanceUID)
    finding = Finding(**{**vars(finding), "model": MODEL})
    first = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    return StoredStudy(
        StudyInstanceUID=str(first.StudyInstanceUID),
        SeriesInstanceUID=str(first.SeriesInstanceUID),
        source_uids=frozenset(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series.paths
        ),
        overlay=overlay,
        finding=finding,
    )
