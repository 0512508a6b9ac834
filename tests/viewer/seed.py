"""Studies for the viewer tests: files stored through ingest into a data folder (files and
index), then what an analysis records (routing, findings, overlay files)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from sqlalchemy import select

from tests.dicomout.builders import BLEED_HU, BRAIN_HU, model_output
from triage.db import Database
from triage.db.tables import FindingRow, InstanceRow, StudyRow
from triage.ingest.store import ingest_instance
from triage.preprocess.ct import prepare_head_ct
from triage.results import Overlay, overlay_path, save_overlay

PATIENT_NAME = "VIEWER^VALENTINE"
PATIENT_ID = "PID-VIEW-2718"


def store_files(
    db: Database,
    data_dir: Path,
    paths: Sequence[Path],
    *,
    edit: Callable[[pydicom.Dataset], None] | None = None,
) -> None:
    """Ingests the files (each edited first when ``edit`` is given) into ``data_dir``."""
    (data_dir / "incoming").mkdir(parents=True, exist_ok=True)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        if edit is not None:
            edit(ds)
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        outcome = ingest_instance(
            buf.getvalue(),
            db=db,
            store_dir=data_dir / "dicom",
            tmp_dir=data_dir / "incoming",
            quarantine_dir=data_dir / "quarantine",
            source="viewer-test",
        )
        assert outcome.ok, outcome.reason


def stored_path(db: Database, sop_uid: str) -> Path:
    """The stored file of an instance."""
    with db.session() as s:
        path = s.scalar(select(InstanceRow.path).where(InstanceRow.SOPInstanceUID == sop_uid))
    assert path is not None
    return Path(path)


def bleed_overlay(paths: Sequence[Path]) -> Overlay:
    """The haemorrhage model's label overlay of a cube series: the blood thresholded on the
    model's grid, through the model's own ``interpret`` (class IPH)."""
    prepared = prepare_head_ct(list(paths), min_coverage_mm=None)
    labels = (prepared.head_mask & (prepared.hu > (BRAIN_HU + BLEED_HU) / 2)).astype(np.uint8)
    assert labels.sum() > 500
    overlay, _ = model_output(prepared, labels, prepared.SeriesInstanceUID)
    return overlay


def record_finding(
    db: Database,
    results_dir: Path,
    study_uid: str,
    series_uid: str | None,
    finding: str,
    *,
    overlay: Overlay | None = None,
    model: tuple[str, str] = ("blast-ct-v1", "1.0.0"),
    details: dict[str, Any] | None = None,
    route: bool = True,
) -> None:
    """What the worker records for one finding: the row (with its overlay file when given)
    and, with ``route``, the model's routing entry for the series."""
    mask_path = None
    if overlay is not None:
        path = overlay_path(results_dir, study_uid, finding)
        save_overlay(path, overlay)
        mask_path = str(path)
    now = datetime.now(UTC)
    payload = {
        "finding": finding,
        "flag": True,
        "score": 0.9,
        "volumes_ml": {},
        "max_probability": {},
        "model": {"name": model[0], "version": model[1], "weights_sha256": []},
        "details": {"SeriesInstanceUID": series_uid, **(details or {})},
        "severity": None,
    }
    with db.session() as s:
        study = s.scalar(select(StudyRow).where(StudyRow.StudyInstanceUID == study_uid))
        assert study is not None
        if route:
            routing = dict(study.routing or {"models": []})
            routing["models"] = [
                *routing["models"],
                {"model": model[0], "run": True, "SeriesInstanceUID": series_uid},
            ]
            study.routing = routing
        study.ai_status = "ok"
        s.add(
            FindingRow(
                study_id=study.id,
                finding=finding,
                flag=1,
                score=0.9,
                model_name=model[0],
                model_version=model[1],
                SeriesInstanceUID=series_uid,
                payload=payload,
                mask_path=mask_path,
                created_at=now,
            )
        )
