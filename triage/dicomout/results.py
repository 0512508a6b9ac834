"""The DICOM results of an analysis, written to the results folder and indexed, each queued
for every configured destination:

* for every finding whose model left a label overlay with its grid geometry, a Segmentation
  (when any class has a pixel on the source images) and a TID 1500 Comprehensive 3D SR
  (always: a negative finding is reported too);
* for every flagged finding whose model left a saliency ``heatmap`` (the chest radiograph
  model), a Secondary Capture of the radiograph with the saliency laid on it
  (:mod:`~triage.dicomout.sc`); the captures of one model and analysis share a series. A
  finding the model did not flag gets none: its map would be noise to a reader.

Files: ``<results_dir>/<sha256(StudyInstanceUID)[:24]>/dicom/<seg|sr|sc>-<sha256(
SOPInstanceUID)[:24]>.dcm``, Explicit VR Little Endian Part 10 files written durably
(temporary file, fsync, rename, fsync of the folder). Each call makes new objects with new
UIDs and replaces the earlier results of the study of each model it has findings of (their
files are deleted once the new index has committed; their pending exports go with them), also
when it makes none for the model (no finding flagged any more).

Making results never fails the analysis: a finding whose results cannot be made is logged
(the model and the error's type, no patient data) and recorded on the study's routing
document (``dicom_output``: ``failed`` with the reason), and the model's earlier results are
removed so that nothing describes an analysis that has been replaced.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from triage.db import Database
from triage.db.tables import DicomResultRow, InstanceRow, SeriesRow, StudyRow
from triage.dicomout.geometry import labels_on_source
from triage.dicomout.index import NewResult, replace_results
from triage.dicomout.patient import complete_type2
from triage.dicomout.sc import make_saliency_capture
from triage.dicomout.seg import make_segmentation
from triage.dicomout.sr import make_measurement_report
from triage.domain import DicomResultKind, Finding
from triage.ingest.files import (
    hashed_name,
    make_dirs_durably,
    remove_stale_parts,
    write_durably,
)
from triage.preprocess.ct_headers import read_headers
from triage.preprocess.errors import PreprocessError
from triage.results import Overlay

__all__ = [
    "SC_SERIES_NUMBER",
    "SEG_SERIES_NUMBER",
    "SR_SERIES_NUMBER",
    "FindingResults",
    "eligible",
    "make_results",
    "result_path",
]

log = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 9901
"""SeriesNumber of the Segmentation series (high, to sort after the scanner's series)."""
SR_SERIES_NUMBER = 9902
"""SeriesNumber of the measurement report series."""
SC_SERIES_NUMBER = 9903
"""SeriesNumber of the saliency Secondary Capture series."""

# Errors with messages written for users (no patient data): kept as the reason. Anything else
# is recorded by its type only.
_EXPECTED_ERRORS = (PreprocessError, InvalidDicomError, ValueError, OSError)


@dataclass(frozen=True)
class FindingResults:
    """What became of one finding's results.

    Attributes:
        model: the model's name.
        finding: the finding code.
        made: the objects written and indexed (SEG first when there is one, then the SR; or
            the saliency Secondary Capture).
        error: why none were made (no patient data); None when they were.
    """

    model: str
    finding: str
    made: tuple[NewResult, ...] = ()
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "finding": self.finding,
            "status": "failed" if self.error else "made",
            "error": self.error,
            "SOPInstanceUIDs": [r.SOPInstanceUID for r in self.made],
        }


def eligible(finding: Finding, overlays: Mapping[str, Overlay]) -> Overlay | None:
    """The finding's overlay when DICOM results are made of it: a ``labels`` overlay with its
    grid geometry (SEG and SR), or the ``heatmap`` of a flagged finding (a Secondary
    Capture); None otherwise (no overlay, the heatmap of a finding not flagged, or a label
    overlay written before the geometry was kept)."""
    overlay = overlays.get(finding.finding)
    if overlay is None:
        return None
    if overlay.kind == "heatmap":
        return overlay if finding.flag else None
    if overlay.kind != "labels" or not overlay.has_geometry:
        return None
    return overlay


def result_path(results_dir: Path, study_uid: str, kind: DicomResultKind, sop_uid: str) -> Path:
    """Where a result's file is kept (hashes of the UIDs, never attribute text)."""
    return (
        results_dir / hashed_name(study_uid) / "dicom" / f"{kind.value}-{hashed_name(sop_uid)}.dcm"
    )


def _encode(ds: pydicom.Dataset) -> bytes:
    """The object as a Part 10 file in Explicit VR Little Endian (what the sender proposes)."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax != ExplicitVRLittleEndian:
        raise ValueError(f"result encoded in {syntax}, not Explicit VR Little Endian")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _source_paths(db: Database, study_id: int, series_uid: str) -> list[Path]:
    with db.session() as s:
        paths = s.scalars(
            select(InstanceRow.path)
            .join(SeriesRow, SeriesRow.id == InstanceRow.series_id)
            .where(SeriesRow.study_id == study_id, SeriesRow.SeriesInstanceUID == series_uid)
            .order_by(InstanceRow.id)
        ).all()
    return [Path(p) for p in paths]


def _source_image(db: Database, study_id: int, overlay: Overlay) -> Path:
    """The stored file of the image a heatmap explains."""
    if not overlay.SOPInstanceUID:
        raise ValueError("the saliency map names no source image")
    with db.session() as s:
        path = s.scalar(
            select(InstanceRow.path)
            .join(SeriesRow, SeriesRow.id == InstanceRow.series_id)
            .where(
                SeriesRow.study_id == study_id,
                SeriesRow.SeriesInstanceUID == overlay.SeriesInstanceUID,
                InstanceRow.SOPInstanceUID == overlay.SOPInstanceUID,
            )
        )
    if path is None:
        raise ValueError("the image the saliency map explains is not stored in this study")
    return Path(path)


@dataclass(frozen=True)
class _Placement:
    """Where a Secondary Capture goes: the series shared by a model's captures of one
    analysis, and its number in it."""

    series_instance_uid: str
    instance_number: int


# highdicom warns about a person name of one component with the name in the message, which
# would put patient data in the log (stderr): that warning is kept out.
_PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"


def _objects(
    db: Database, study_id: int, finding: Finding, overlay: Overlay, placement: _Placement | None
) -> list[tuple[DicomResultKind, pydicom.Dataset]]:
    """The Segmentation (when any class has a pixel on the sources) and the report; or the
    saliency Secondary Capture."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING, category=UserWarning)
        if overlay.kind == "heatmap":
            placement = placement or _Placement(generate_uid(), 1)
            return [(DicomResultKind.sc, _capture(db, study_id, finding, overlay, placement))]
        return _build(db, study_id, finding, overlay)


def _capture(
    db: Database, study_id: int, finding: Finding, overlay: Overlay, placement: _Placement
) -> pydicom.Dataset:
    path = _source_image(db, study_id, overlay)
    source = pydicom.dcmread(path, stop_before_pixels=True)  # this call's own copy
    complete_type2(source)
    return make_saliency_capture(
        finding,
        overlay,
        source,
        path,
        series_number=SC_SERIES_NUMBER,
        series_instance_uid=placement.series_instance_uid,
        instance_number=placement.instance_number,
    )


def _build(
    db: Database, study_id: int, finding: Finding, overlay: Overlay
) -> list[tuple[DicomResultKind, pydicom.Dataset]]:
    paths = _source_paths(db, study_id, overlay.SeriesInstanceUID)
    if not paths:
        raise ValueError("the overlay's series has no stored instances in this study")
    sources = read_headers(paths)  # this call's own objects: completed in place
    for ds in sources:
        complete_type2(ds)
    on_source = labels_on_source(overlay, sources)
    seg = None
    if any(on_source.voxel_counts().values()):
        seg = make_segmentation(on_source, finding.model, series_number=SEG_SERIES_NUMBER)
    sr = make_measurement_report(finding, sources, seg, series_number=SR_SERIES_NUMBER)
    objects: list[tuple[DicomResultKind, pydicom.Dataset]] = []
    if seg is not None:
        objects.append((DicomResultKind.seg, seg))
    objects.append((DicomResultKind.sr, sr))
    return objects


def _write(
    objects: Sequence[tuple[DicomResultKind, pydicom.Dataset]],
    *,
    results_dir: Path,
    study_uid: str,
    finding: Finding,
) -> list[NewResult]:
    """Each object's file, written durably; on a failure the ones already written go."""
    written: list[NewResult] = []
    try:
        for kind, ds in objects:
            sop_uid = str(ds.SOPInstanceUID)
            path = result_path(results_dir, study_uid, kind, sop_uid)
            make_dirs_durably(path.parent)
            write_durably(_encode(ds), path, path.parent)  # the temporary file beside it
            written.append(
                NewResult(
                    kind=kind,
                    SOPInstanceUID=sop_uid,
                    SeriesInstanceUID=str(ds.SeriesInstanceUID),
                    SOPClassUID=str(ds.SOPClassUID),
                    path=path,
                    finding=finding.finding,
                    model_name=finding.model.name,
                )
            )
    except BaseException:
        _remove(r.path for r in written)
        raise
    return written


def _remove(paths: Any) -> None:
    for path in paths:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            log.warning("could not delete a replaced DICOM result file")


def _make_one(
    db: Database,
    *,
    study_id: int,
    study_uid: str,
    finding: Finding,
    overlay: Overlay,
    placement: _Placement | None,
    results_dir: Path,
) -> FindingResults:
    name = finding.model.name
    try:
        objects = _objects(db, study_id, finding, overlay, placement)
        made = _write(objects, results_dir=results_dir, study_uid=study_uid, finding=finding)
    except _EXPECTED_ERRORS as exc:
        log.warning(
            "study #%d: DICOM results of %s (%s) not made: %s",
            study_id,
            name,
            finding.finding,
            type(exc).__name__,
        )
        return FindingResults(name, finding.finding, error=str(exc)[:1000] or type(exc).__name__)
    except Exception as exc:  # fail open: the analysis stands without its DICOM results
        log.exception("study #%d: DICOM results of %s failed unexpectedly", study_id, name)
        return FindingResults(name, finding.finding, error=f"internal error ({type(exc).__name__})")
    return FindingResults(name, finding.finding, made=tuple(made))


def _models_with_results(db: Database, study_id: int) -> set[str]:
    with db.session() as s:
        return set(
            s.scalars(
                select(DicomResultRow.model_name)
                .where(DicomResultRow.study_id == study_id)
                .distinct()
            )
        )


def make_results(
    db: Database,
    study_uid: str,
    *,
    findings: Sequence[Finding],
    overlays: Mapping[str, Overlay],
    results_dir: Path,
    destinations: Sequence[str] = (),
    now: datetime | None = None,
) -> list[FindingResults]:
    """Make, store and index the DICOM results of an analysis's findings.

    Args:
        db: the database holding the study and its instances (the source images are read
            from the paths indexed there: headers only, but the pixels of a radiograph
            whose saliency is captured).
        study_uid: the study analysed.
        findings: the analysis's findings; those whose overlay is :func:`eligible` get
            results. A model with findings here whose earlier results of the study no
            finding replaces loses them (they describe an analysis that was replaced); the
            results of models without findings here are left alone.
        overlays: finding code -> overlay, as the analysis left them.
        results_dir: the results folder (``TRIAGE_DATA_DIR/results``).
        destinations: names (``AE@host:port``) of the destinations each new result is queued
            for.
        now: the time recorded (default: now).

    Returns:
        One entry per eligible finding: its results, or why none were made. Never raises for
        a finding's failure (see the module doc); a database error indexing them does raise,
        after removing the files just written.
    """
    now = now or datetime.now(UTC)
    with db.session() as s:
        study_id = s.scalar(select(StudyRow.id).where(StudyRow.StudyInstanceUID == study_uid))
    if study_id is None:
        raise ValueError("unknown study")
    by_model: dict[str, list[FindingResults]] = {}
    captures: dict[str, list[_Placement]] = {}  # model -> its captures' places
    for finding in findings:
        overlay = eligible(finding, overlays)
        if overlay is None:
            continue
        name = finding.model.name
        placement = None
        if overlay.kind == "heatmap":
            placed = captures.setdefault(name, [])
            series_uid = placed[0].series_instance_uid if placed else generate_uid()
            placement = _Placement(series_uid, len(placed) + 1)
            placed.append(placement)
        outcome = _make_one(
            db,
            study_id=study_id,
            study_uid=study_uid,
            finding=finding,
            overlay=overlay,
            placement=placement,
            results_dir=results_dir,
        )
        by_model.setdefault(name, []).append(outcome)
    for name in sorted(_models_with_results(db, study_id) & {f.model.name for f in findings}):
        by_model.setdefault(name, [])  # nothing made now: the earlier results go
    for model_name, outcomes in by_model.items():
        made = [r for o in outcomes for r in o.made]
        try:
            with db.session() as s:
                replaced = replace_results(
                    s,
                    study_id=study_id,
                    model_name=model_name,
                    results=made,
                    destinations=destinations,
                    outcomes=[o.to_json() for o in outcomes],
                    now=now,
                )
        except BaseException:
            _remove(r.path for r in made)
            raise
        _remove(replaced)
        log.info(
            "study #%d: %d DICOM result(s) of %s, queued for %d destination(s)",
            study_id,
            len(made),
            model_name,
            len(destinations),
        )
    folder = results_dir / hashed_name(study_uid) / "dicom"
    if by_model and folder.is_dir():
        remove_stale_parts(folder)  # left by a crash in the middle of a write
    return [o for outcomes in by_model.values() for o in outcomes]
