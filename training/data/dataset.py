"""Reading and writing datasets in the generic format of :mod:`training.format`.

:func:`read_dataset` validates ``dataset.json`` and ``labels.csv`` (every problem is a
:class:`DatasetError` naming the file, the line and the column), indexes the DICOM files under
``dicom/`` by StudyInstanceUID and SeriesInstanceUID from their headers (pixels never read) and
returns one :class:`StudyRecord` per study. :func:`choose_series` picks the series a model reads
exactly as serving does: the analyzer's router (``triage.analysis.analyzer.route_series``) with
the model's spec, unless ``labels.csv`` names the series.

:func:`write_meta` and :func:`write_labels` write the two files (the adapters of
:mod:`training.data.adapters` use them).

Error and log messages name files, line numbers, columns and counts, never patient data (no
PatientID, no UIDs).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import pydicom
from pydicom.errors import InvalidDicomError

from training.format import (
    DICOM_DIR,
    FORMAT,
    LABEL_COLUMNS,
    LABELS_FILE,
    META_FILE,
    SPLITS,
)
from triage.analysis.analyzer import route_series
from triage.analysis.files import SeriesFiles
from triage.models.spec import ModelSpec

__all__ = [
    "Dataset",
    "DatasetError",
    "DicomIds",
    "IndexedStudy",
    "LabelRow",
    "NoSeriesError",
    "StudyRecord",
    "choose_series",
    "index_dicom",
    "read_dicom_ids",
    "read_labels",
    "read_dataset",
    "read_meta",
    "write_labels",
    "write_meta",
]

log = logging.getLogger(__name__)

#: Suffixes a mask may have: NIfTI label maps, or DICOM Segmentation objects.
MASK_SUFFIXES: Final[tuple[str, ...]] = (".nii.gz", ".nii", ".dcm")
_ID_TAGS: Final[list[str]] = ["StudyInstanceUID", "SeriesInstanceUID", "PatientID"]
_INDEX_VERSION: Final = 1


class DatasetError(ValueError):
    """A dataset does not follow the generic format; the message names the file, line and
    column (never patient data)."""


class NoSeriesError(DatasetError):
    """No series of a study is one the model reads (the message is the router's reason)."""


# --------------------------------------------------------------------------------------------
# Rows and records


def _number(value: float) -> str:
    """Shortest text that reads back as the same float (``25`` rather than ``25.0``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class LabelRow:
    """One row of ``labels.csv``: one study and one finding (columns of
    :data:`training.format.LABEL_COLUMNS`; blanks are ``""`` and ``volume_ml`` None)."""

    StudyInstanceUID: str
    PatientID: str
    finding: str
    label: int
    SeriesInstanceUID: str = ""
    mask: str = ""
    subtype: str = ""
    volume_ml: float | None = None
    split: str = ""

    def to_csv(self) -> dict[str, str]:
        """The row as ``labels.csv`` writes it."""
        return {
            "StudyInstanceUID": self.StudyInstanceUID,
            "PatientID": self.PatientID,
            "SeriesInstanceUID": self.SeriesInstanceUID,
            "finding": self.finding,
            "label": str(int(self.label)),
            "mask": self.mask,
            "subtype": self.subtype,
            "volume_ml": "" if self.volume_ml is None else _number(self.volume_ml),
            "split": self.split,
        }


@dataclass
class StudyRecord:
    """One study of a dataset: its labels (all its rows of ``labels.csv``) and its files.

    Attributes:
        study_uid: StudyInstanceUID.
        patient_id: PatientID from ``labels.csv`` (splits group by it).
        labels: finding code -> 1 present / 0 absent.
        mask: absolute path of the mask (NIfTI label map or DICOM Segmentation), or None.
        subtype: lesion type (``"subdural"``, ``"intraparenchymal+subdural"``...), or ``""``.
        volume_ml: true lesion volume in ml, or None.
        split: ``train``, ``val`` or ``test`` when ``labels.csv`` says so, else None.
        series: the study's series under ``dicom/`` (files sorted by path).
        series_uid: the SeriesInstanceUID named by ``labels.csv``, or None (the router
            chooses, as in serving).
        lines: the ``labels.csv`` line numbers of the study's rows (for messages).
    """

    study_uid: str
    patient_id: str
    labels: dict[str, int]
    mask: Path | None = None
    subtype: str = ""
    volume_ml: float | None = None
    split: str | None = None
    series: list[SeriesFiles] = field(default_factory=list)
    series_uid: str | None = None
    lines: tuple[int, ...] = ()

    def label(self, finding: str) -> int | None:
        """The study's label for ``finding``, or None when unlabelled."""
        return self.labels.get(finding)


@dataclass
class Dataset:
    """A dataset folder read by :func:`read_dataset`.

    Attributes:
        root: the dataset folder.
        meta: the content of ``dataset.json``.
        studies: one record per study, in the order of their first row in ``labels.csv``.
    """

    root: Path
    meta: dict[str, Any]
    studies: list[StudyRecord]

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    def study(self, study_uid: str) -> StudyRecord:
        """The record of one study.

        Raises:
            KeyError: the dataset has no such study.
        """
        for record in self.studies:
            if record.study_uid == study_uid:
                return record
        raise KeyError("no such study in the dataset")


# --------------------------------------------------------------------------------------------
# dataset.json


def read_meta(root: Path) -> dict[str, Any]:
    """Read and validate ``dataset.json``.

    Raises:
        DatasetError: the file is missing, not a JSON object, has another ``format`` than
            :data:`training.format.FORMAT`, or lacks ``name`` or ``task`` (strings).
    """
    path = Path(root) / META_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (every dataset folder has a {META_FILE})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: must hold a JSON object")
    if doc.get("format") != FORMAT:
        raise DatasetError(f"{path}: field 'format' must be {FORMAT!r}, got {doc.get('format')!r}")
    for key in ("name", "task"):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            raise DatasetError(f"{path}: field {key!r} must be a non-empty string")
    for key in ("source", "created"):
        if key in doc and not isinstance(doc[key], str):
            raise DatasetError(f"{path}: field {key!r} must be a string")
    return doc


def write_meta(root: Path, *, name: str, task: str, source: str, **extra: Any) -> Path:
    """Write ``dataset.json`` (``created`` is now, UTC, ISO 8601); returns its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "name": name,
        "task": task,
        "source": source,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }
    path = root / META_FILE
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# labels.csv


def _cell_error(path: Path, line: int, column: str, problem: str) -> DatasetError:
    return DatasetError(f"{path}: line {line}, column {column!r}: {problem}")


def _parse_row(root: Path, path: Path, line: int, row: Mapping[str, str]) -> LabelRow:
    def text(column: str) -> str:
        return (row.get(column) or "").strip()

    for column in ("StudyInstanceUID", "finding"):
        if not text(column):
            raise _cell_error(path, line, column, "must not be blank")
    for column in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
        if any(c.isspace() for c in text(column)):
            raise _cell_error(path, line, column, "must not contain spaces")
    label_text = text("label")
    if label_text not in ("0", "1"):
        raise _cell_error(path, line, "label", f"must be 0 or 1, got {label_text!r}")
    mask = text("mask")
    if mask:
        if Path(mask).is_absolute():
            raise _cell_error(path, line, "mask", "must be a path relative to the dataset folder")
        if not mask.lower().endswith(MASK_SUFFIXES):
            raise _cell_error(
                path, line, "mask", f"must end with one of {', '.join(MASK_SUFFIXES)}"
            )
        resolved = (root / mask).resolve()
        if not resolved.is_relative_to(root.resolve()):
            raise _cell_error(path, line, "mask", "must lie inside the dataset folder")
        if not (root / mask).is_file():
            raise _cell_error(path, line, "mask", "names a file that does not exist")
    volume: float | None = None
    volume_text = text("volume_ml")
    if volume_text:
        try:
            volume = float(volume_text)
        except ValueError:
            volume = math.nan
        if not math.isfinite(volume) or volume < 0:
            raise _cell_error(
                path, line, "volume_ml", f"must be a number >= 0 or blank, got {volume_text!r}"
            )
    split = text("split")
    if split and split not in SPLITS:
        raise _cell_error(path, line, "split", f"must be one of {', '.join(SPLITS)} or blank")
    return LabelRow(
        StudyInstanceUID=text("StudyInstanceUID"),
        PatientID=text("PatientID"),
        finding=text("finding"),
        label=int(label_text),
        SeriesInstanceUID=text("SeriesInstanceUID"),
        mask=mask,
        subtype=text("subtype"),
        volume_ml=volume,
        split=split,
    )


def read_labels(root: Path) -> list[tuple[int, LabelRow]]:
    """Read and validate ``labels.csv``.

    Returns:
        (line number, row) for every row, in file order.

    Raises:
        DatasetError: the file is missing or empty, its header lacks a column of
            :data:`training.format.LABEL_COLUMNS` or has another, a cell is invalid, or a
            (study, finding) pair repeats.
    """
    root = Path(root)
    path = root / LABELS_FILE
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (every dataset folder has a {LABELS_FILE})") from None
    rows: list[tuple[int, LabelRow]] = []
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise DatasetError(f"{path}: line 1: empty file (expected a header row)")
        missing = [c for c in LABEL_COLUMNS if c not in header]
        unknown = [c for c in header if c not in LABEL_COLUMNS]
        if missing:
            raise DatasetError(f"{path}: line 1: missing column(s) {', '.join(missing)}")
        if unknown:
            raise DatasetError(f"{path}: line 1: unknown column(s) {', '.join(unknown)}")
        if len(set(header)) != len(header):
            raise DatasetError(f"{path}: line 1: a column is repeated")
        reader.fieldnames = header
        seen: dict[tuple[str, str], int] = {}
        for raw in reader:
            line = reader.line_num
            if None in raw:
                raise DatasetError(f"{path}: line {line}: more cells than columns")
            if all(not (v or "").strip() for v in raw.values()):
                continue  # a blank line
            row = _parse_row(root, path, line, raw)
            key = (row.StudyInstanceUID, row.finding)
            if key in seen:
                raise _cell_error(
                    path, line, "finding", f"the study has this finding already (line {seen[key]})"
                )
            seen[key] = line
            rows.append((line, row))
    return rows


def write_labels(root: Path, rows: Iterable[LabelRow]) -> Path:
    """Write ``labels.csv`` (columns of :data:`training.format.LABEL_COLUMNS`); returns its
    path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LABELS_FILE
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(LABEL_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_csv())
    return path


# --------------------------------------------------------------------------------------------
# DICOM index


@dataclass(frozen=True)
class DicomIds:
    """The identifiers of one DICOM file, from its header."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    PatientID: str


@dataclass
class IndexedStudy:
    """The files of one study found under a folder."""

    patient_id: str
    series: list[SeriesFiles]


def read_dicom_ids(path: Path) -> DicomIds | None:
    """StudyInstanceUID, SeriesInstanceUID and PatientID of a file (only those tags are
    parsed, pixels never); None when it is not DICOM or has no StudyInstanceUID."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_ID_TAGS)
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError):
        return None
    ids = DicomIds(*(str(ds.get(k, "") or "").strip() for k in _ID_TAGS))
    return ids if ids.StudyInstanceUID else None


def _walk(folder: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in sorted(filenames))
    return files


def _load_index_cache(cache: Path | None) -> dict[str, list[Any]]:
    if cache is None or not cache.is_file():
        return {}
    try:
        doc = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != _INDEX_VERSION:
        return {}
    files = doc.get("files")
    return files if isinstance(files, dict) else {}


def index_dicom(folder: Path, *, cache: Path | None = None) -> dict[str, IndexedStudy]:
    """Index the DICOM files below ``folder`` (symbolic links followed) by study and series.

    Only StudyInstanceUID, SeriesInstanceUID and PatientID are read from each header; files
    that are not DICOM are skipped. With ``cache``, a JSON file remembers each file's
    identifiers by its path, size and modification time, so a second index of a large
    dataset reads no header again.

    Returns:
        StudyInstanceUID -> its patient and series (series in order of their first file;
        files sorted by path).
    """
    folder = Path(folder)
    known = _load_index_cache(cache)
    fresh: dict[str, list[Any]] = {}
    series: dict[tuple[str, str], SeriesFiles] = {}
    patients: dict[str, str] = {}
    skipped = 0
    for path in _walk(folder):
        rel = path.relative_to(folder).as_posix()
        try:
            st = path.stat()
        except OSError:
            skipped += 1
            continue
        entry = known.get(rel)
        if entry is not None and entry[:2] == [st.st_size, st.st_mtime_ns]:
            ids = None if entry[2] is None else DicomIds(*entry[2:5])
        else:
            ids = read_dicom_ids(path)
        fresh[rel] = [st.st_size, st.st_mtime_ns] + (
            [None, None, None]
            if ids is None
            else [ids.StudyInstanceUID, ids.SeriesInstanceUID, ids.PatientID]
        )
        if ids is None:
            skipped += 1
            continue
        key = (ids.StudyInstanceUID, ids.SeriesInstanceUID)
        if key not in series:
            series[key] = SeriesFiles(ids.SeriesInstanceUID, [])
        series[key].paths.append(path)
        patients.setdefault(ids.StudyInstanceUID, ids.PatientID)
    if skipped:
        log.info("indexing DICOM: skipped %d file(s) that are not DICOM or lack a study", skipped)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"version": _INDEX_VERSION, "files": fresh}), "utf-8")
        except OSError as exc:
            log.warning("could not write the DICOM index cache (%s)", type(exc).__name__)
    studies: dict[str, IndexedStudy] = {}
    for (study_uid, _), se in series.items():
        studies.setdefault(study_uid, IndexedStudy(patients[study_uid], [])).series.append(se)
    return studies


# --------------------------------------------------------------------------------------------
# The dataset


def _merge(path: Path, field_name: str, values: Sequence[tuple[int, str]]) -> str:
    """The one non-blank value of a column over a study's rows (``""`` when all blank)."""
    distinct = {v for _, v in values if v}
    if len(distinct) > 1:
        lines = ", ".join(str(line) for line, v in values if v)
        raise DatasetError(
            f"{path}: lines {lines}, column {field_name!r}: the rows of one study disagree"
        )
    return distinct.pop() if distinct else ""


def read_dataset(
    root: Path,
    *,
    on_missing: Literal["error", "skip"] = "error",
    index_cache: Path | None = None,
) -> Dataset:
    """Read a dataset folder in the generic format (:mod:`training.format`).

    Args:
        root: the dataset folder.
        on_missing: what to do with a study of ``labels.csv`` that has no DICOM file under
            ``dicom/``: ``"error"`` raises, ``"skip"`` leaves it out (the count is logged).
        index_cache: a JSON file that remembers the DICOM headers read (see
            :func:`index_dicom`), or None.

    Returns:
        The :class:`Dataset`, one :class:`StudyRecord` per study of ``labels.csv``.

    Raises:
        DatasetError: ``dataset.json`` or ``labels.csv`` is invalid, the rows of one study
            disagree on PatientID, SeriesInstanceUID, mask, subtype, volume_ml or split,
            PatientID is blank and no file of the study names one, or (with
            ``on_missing="error"``) a study has no files.
    """
    root = Path(root)
    meta = read_meta(root)
    rows = read_labels(root)
    labels_path = root / LABELS_FILE
    dicom_dir = root / DICOM_DIR
    if not dicom_dir.is_dir():
        raise DatasetError(f"{dicom_dir}: missing (the studies' DICOM files go there)")
    index = index_dicom(dicom_dir, cache=index_cache)

    by_study: dict[str, list[tuple[int, LabelRow]]] = {}
    for line, row in rows:
        by_study.setdefault(row.StudyInstanceUID, []).append((line, row))
    studies: list[StudyRecord] = []
    missing = 0
    for study_uid, study_rows in by_study.items():
        lines = tuple(line for line, _ in study_rows)

        def merged(name: str, rows_: list[tuple[int, LabelRow]] = study_rows) -> str:
            return _merge(labels_path, name, [(line, getattr(r, name)) for line, r in rows_])

        indexed = index.get(study_uid)
        if indexed is None:
            if on_missing == "error":
                raise DatasetError(
                    f"{labels_path}: line {lines[0]}, column 'StudyInstanceUID': no DICOM file "
                    f"under {DICOM_DIR}/ belongs to this study"
                )
            missing += 1
            continue
        patient_id = merged("PatientID") or indexed.patient_id
        if not patient_id:
            raise _cell_error(
                labels_path,
                lines[0],
                "PatientID",
                "blank, and the study's DICOM files have no PatientID either",
            )
        series_uid = merged("SeriesInstanceUID") or None
        if series_uid is not None and series_uid not in {
            se.SeriesInstanceUID for se in indexed.series
        }:
            raise _cell_error(
                labels_path,
                lines[0],
                "SeriesInstanceUID",
                f"no DICOM file under {DICOM_DIR}/ belongs to this series of the study",
            )
        mask = merged("mask")
        volumes = {r.volume_ml for _, r in study_rows if r.volume_ml is not None}
        if len(volumes) > 1:
            raise DatasetError(
                f"{labels_path}: lines {', '.join(map(str, lines))}, column 'volume_ml': the "
                "rows of one study disagree"
            )
        studies.append(
            StudyRecord(
                study_uid=study_uid,
                patient_id=patient_id,
                labels={r.finding: r.label for _, r in study_rows},
                mask=(root / mask).resolve() if mask else None,
                subtype=merged("subtype"),
                volume_ml=volumes.pop() if volumes else None,
                split=merged("split") or None,
                series=indexed.series,
                series_uid=series_uid,
                lines=lines,
            )
        )
    if missing:
        log.warning("%d study(ies) of %s have no DICOM files and were skipped", missing, root.name)
    return Dataset(root=root, meta=meta, studies=studies)


# --------------------------------------------------------------------------------------------
# The series a model reads


@dataclass(frozen=True)
class _SpecRegistry:
    """What ``route_series`` reads of a registry: the installed specs."""

    specs: tuple[ModelSpec, ...]


def choose_series(record: StudyRecord, spec: ModelSpec) -> SeriesFiles:
    """The series of a study the model reads, chosen as serving chooses it.

    The SeriesInstanceUID named in ``labels.csv`` wins; otherwise the analyzer's router
    (``triage.analysis.analyzer.route_series``, the model's ``accepts``) picks it.

    Raises:
        NoSeriesError: the named series has no files, or no series is one the model reads
            (the message is the router's reason).
    """
    if record.series_uid:
        for se in record.series:
            if se.SeriesInstanceUID == record.series_uid:
                return se
        raise NoSeriesError("the series named in labels.csv has no files under dicom/")
    decision, files = route_series(record.series, _SpecRegistry((spec,)))  # type: ignore[arg-type]
    (route,) = decision.routes
    if route.series is None:
        raise NoSeriesError(f"{spec.name}: {route.reason}")
    return files[route.series.SeriesInstanceUID]
