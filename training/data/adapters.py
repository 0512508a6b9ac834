"""Public data sets converted into the generic dataset format (:mod:`training.format`).

Each adapter writes ``dataset.json`` and ``labels.csv`` and places the source DICOM files under
``dicom/`` as relative symbolic links (``copy=True`` copies them instead), keeping the layout
below the source folder. Study, series and patient come from each file's header.

* :func:`convert_rsna_ich`: RSNA 2019 Intracranial Haemorrhage Detection (``stage_2_train.csv``,
  per-slice labels; one folder of ``ID_<hex>.dcm`` slices). Study label: the largest ``any``
  over its slices; subtype: every subtype any slice has, sorted and joined with ``+``.
* :func:`convert_cq500`: CQ500 (``reads.csv``, three readers). Label: the readers' majority for
  ICH; subtype: the majority for each of IPH, IVH, SDH, EDH, SAH.
* :func:`convert_siim_pneumothorax`: SIIM-ACR Pneumothorax Segmentation (``train-rle.csv``,
  one row per region; ``<ImageId>.dcm`` below a folder). Label: any region; the regions,
  decoded from SIIM's run-length encoding (:func:`rle_decode`), become a 2D NIfTI mask on the
  radiograph's pixel grid under ``masks/``.

Log messages give counts only (no identifiers).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from training.data.dataset import (
    DatasetError,
    DicomIds,
    LabelRow,
    read_dicom_ids,
    write_labels,
    write_meta,
)
from training.format import (
    DICOM_DIR,
    HAEMORRHAGE,
    HAEMORRHAGE_SUBTYPES,
    LABELS_FILE,
    MASKS_DIR,
    PNEUMOTHORAX,
)
from triage.models.spec import ModelSpec

__all__ = [
    "CQ500_SUBTYPES",
    "RSNA_SUBTYPES",
    "convert_cq500",
    "convert_rsna_ich",
    "convert_siim_pneumothorax",
    "place_file",
    "rle_decode",
    "rle_encode",
]

log = logging.getLogger(__name__)

#: RSNA 2019 label names that are haemorrhage subtypes (the other one is ``any``).
RSNA_SUBTYPES: Final[tuple[str, ...]] = tuple(sorted(HAEMORRHAGE_SUBTYPES))
#: CQ500 reader columns (``R<k>:<code>``) and the subtype each names.
CQ500_SUBTYPES: Final[dict[str, str]] = {
    "IPH": "intraparenchymal",
    "IVH": "intraventricular",
    "SDH": "subdural",
    "EDH": "epidural",
    "SAH": "subarachnoid",
}
#: The side of SIIM's radiographs when a file does not say (its RLE runs over 1024 x 1024).
SIIM_SIZE: Final[int] = 1024
#: The chest model whose output index the pneumothorax masks carry.
CHEST_MODEL: Final = "xrv-densenet121-res224-all"

_ID_KEYWORDS: Final[tuple[str, str, str]] = ("StudyInstanceUID", "SeriesInstanceUID", "PatientID")
_RSNA_ID = re.compile(r"^(ID_[0-9A-Za-z]+)_(any|" + "|".join(RSNA_SUBTYPES) + r")$")
_CQ500_NUMBER = re.compile(r"CQ500\W*CT\W*(\d+)", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Shared helpers


def place_file(source: Path, target: Path, *, copy: bool = False) -> None:
    """Put ``source`` at ``target``: a relative symbolic link (absolute where no relative path
    exists), or a copy with ``copy``. An existing ``target`` is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if copy:
        shutil.copy2(source, target)
        return
    source = source.absolute()
    try:
        link = os.path.relpath(source, target.parent.absolute())
    except ValueError:  # another drive
        link = str(source)
    target.symlink_to(link)


def _start(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if (out / LABELS_FILE).exists() and not overwrite:
        raise DatasetError(f"{out / LABELS_FILE}: exists already (pass overwrite=True)")
    (out / DICOM_DIR).mkdir(parents=True, exist_ok=True)
    return out


def _dicom_files(folder: Path) -> dict[str, Path]:
    """``*.dcm`` files below a folder by file name without the suffix (first in path order)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(".dcm"):
                found.setdefault(name[:-4], Path(dirpath) / name)
    return found


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file, header names and cells stripped."""
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise DatasetError(f"{path}: line 1: empty file (expected a header row)")
        reader.fieldnames = [h.strip() for h in reader.fieldnames]
        for raw in reader:
            yield reader.line_num, {k: (v or "").strip() for k, v in raw.items() if k is not None}


def _require(path: Path, header: Iterable[str], columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in set(header)]
    if missing:
        raise DatasetError(f"{path}: line 1: missing column(s) {', '.join(missing)}")


def _binary(path: Path, line: int, column: str, value: str) -> int:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number not in (0.0, 1.0):
        raise DatasetError(f"{path}: line {line}, column {column!r}: must be 0 or 1, got {value!r}")
    return int(number)


# --------------------------------------------------------------------------------------------
# RSNA 2019 Intracranial Haemorrhage Detection


def read_rsna_labels(labels_csv: Path) -> dict[str, dict[str, int]]:
    """Per-slice labels of RSNA's ``stage_2_train.csv`` (``ID`` = ``ID_<hex>_<label>``,
    ``Label`` 0/1): image ID -> {label name -> 0/1}; a repeated row keeps the larger value.

    Raises:
        DatasetError: a column is missing, an ID has another form, a label is not 0 or 1.
    """
    images: dict[str, dict[str, int]] = {}
    checked = False
    for line, row in _rows(labels_csv):
        if not checked:
            _require(labels_csv, row, ("ID", "Label"))
            checked = True
        match = _RSNA_ID.match(row["ID"])
        if match is None:
            raise DatasetError(
                f"{labels_csv}: line {line}, column 'ID': expected ID_<hex>_<label> with label "
                f"any or one of {', '.join(RSNA_SUBTYPES)}"
            )
        image, name = match.groups()
        value = _binary(labels_csv, line, "Label", row["Label"])
        slot = images.setdefault(image, {})
        slot[name] = max(value, slot.get(name, 0))
    return images


@dataclass
class _Study:
    patient_id: str = ""
    series: set[str] = field(default_factory=set)
    files: list[Path] = field(default_factory=list)
    label: int = 0
    subtypes: set[str] = field(default_factory=set)


def _add_file(
    studies: dict[str, _Study], ids: DicomIds, path: Path, *, patient_id: str = ""
) -> _Study:
    study = studies.setdefault(ids.StudyInstanceUID, _Study(patient_id or ids.PatientID))
    study.series.add(ids.SeriesInstanceUID)
    study.files.append(path)
    return study


def _link_all(studies: Iterable[_Study], images_dir: Path, out: Path, copy: bool) -> int:
    n = 0
    for study in studies:
        for path in study.files:
            place_file(path, out / DICOM_DIR / path.relative_to(images_dir), copy=copy)
            n += 1
    return n


def convert_rsna_ich(
    labels_csv: Path,
    images_dir: Path,
    out: Path,
    *,
    name: str = "rsna-ich-2019",
    copy: bool = False,
    overwrite: bool = False,
) -> list[LabelRow]:
    """Convert the RSNA 2019 Intracranial Haemorrhage Detection training set.

    Args:
        labels_csv: ``stage_2_train.csv`` (or stage 1's ``stage_1_train.csv``).
        images_dir: the folder holding the slices ``ID_<hex>.dcm`` (searched recursively).
        out: the dataset folder to write.
        name: the dataset's name in ``dataset.json``.
        copy: copy the DICOM files instead of linking them.
        overwrite: replace an existing ``labels.csv``.

    Returns:
        The rows written: one per study, finding ``intracranial_haemorrhage``; label the
        largest ``any`` over the study's slices; subtype the subtypes of any slice, sorted and
        joined with ``+`` (blank when none); SeriesInstanceUID the slices' series when they
        all belong to one.

    Raises:
        DatasetError: ``labels_csv`` is malformed, or ``out`` has a ``labels.csv`` already.
    """
    out = _start(out, overwrite)
    images_dir = Path(images_dir)
    labels = read_rsna_labels(labels_csv)
    files = _dicom_files(images_dir)
    studies: dict[str, _Study] = {}
    absent = unreadable = 0
    for image, values in labels.items():
        path = files.get(image)
        if path is None:
            absent += 1
            continue
        ids = read_dicom_ids(path)
        if ids is None:
            unreadable += 1
            continue
        study = _add_file(studies, ids, path)
        subtypes = {s for s in RSNA_SUBTYPES if values.get(s, 0)}
        study.subtypes |= subtypes
        study.label = max(study.label, values.get("any", 0), int(bool(subtypes)))
    if absent or unreadable:
        log.warning(
            "RSNA: %d labelled slice(s) have no file, %d file(s) are not readable DICOM",
            absent,
            unreadable,
        )
    rows = [
        LabelRow(
            StudyInstanceUID=uid,
            PatientID=s.patient_id,
            SeriesInstanceUID=next(iter(s.series)) if len(s.series) == 1 else "",
            finding=HAEMORRHAGE,
            label=s.label,
            subtype="+".join(sorted(s.subtypes)),
        )
        for uid, s in studies.items()
    ]
    n_files = _link_all(studies.values(), images_dir, out, copy)
    write_meta(
        out,
        name=name,
        task=HAEMORRHAGE,
        source=f"RSNA 2019 Intracranial Hemorrhage Detection (Kaggle), {Path(labels_csv).name}",
    )
    write_labels(out, rows)
    log.info("RSNA: %d studies, %d positive, %d files", len(rows), _positives(rows), n_files)
    return rows


def _positives(rows: Iterable[LabelRow]) -> int:
    return sum(r.label for r in rows)


# --------------------------------------------------------------------------------------------
# CQ500


@dataclass(frozen=True)
class _Read:
    name: str
    label: int
    subtypes: tuple[str, ...]


def _cq500_number(text: str) -> int | None:
    match = _CQ500_NUMBER.search(text)
    return None if match is None else int(match.group(1))


def _majority(
    path: Path, line: int, row: dict[str, str], readers: list[str], code: str
) -> int | None:
    """1 when more than half of the readers marked ``code``, None when a reader's column is
    absent."""
    columns = [f"{r}:{code}" for r in readers]
    if any(c not in row for c in columns):
        return None
    votes = sum(_binary(path, line, c, row[c]) for c in columns)
    return int(2 * votes > len(columns))


def read_cq500_reads(reads_csv: Path) -> dict[int, _Read]:
    """The readers' majority of CQ500's ``reads.csv``: scan number -> (name, ICH label,
    subtypes with a majority).

    Raises:
        DatasetError: ``name`` or the readers' ICH columns are missing, a name has another
            form, or a read is not 0 or 1.
    """
    reads: dict[int, _Read] = {}
    readers: list[str] = []
    for line, row in _rows(reads_csv):
        if not readers:
            _require(reads_csv, row, ("name",))
            readers = sorted(
                {m.group(1) for c in row if (m := re.fullmatch(r"(R\d+):ICH", c)) is not None}
            )
            if not readers:
                raise DatasetError(f"{reads_csv}: line 1: no reader column R<k>:ICH")
        number = _cq500_number(row["name"])
        if number is None:
            raise DatasetError(f"{reads_csv}: line {line}, column 'name': expected CQ500-CT-<n>")
        label = _majority(reads_csv, line, row, readers, "ICH")
        assert label is not None
        subtypes = tuple(
            sorted(
                name
                for code, name in CQ500_SUBTYPES.items()
                if _majority(reads_csv, line, row, readers, code) == 1
            )
        )
        reads[number] = _Read(row["name"], label, subtypes)
    return reads


def convert_cq500(
    reads_csv: Path,
    images_dir: Path,
    out: Path,
    *,
    name: str = "cq500",
    copy: bool = False,
    overwrite: bool = False,
) -> list[LabelRow]:
    """Convert CQ500 (qure.ai's head CT set with three radiologists' reads).

    A study belongs to the read whose ``name`` (``CQ500-CT-<n>``) has the number of its
    PatientID, or else of its top folder below ``images_dir`` (``CQ500CT<n> CQ500CT<n>``).

    Args:
        reads_csv: ``reads.csv`` (columns ``name``, ``R1:ICH`` ... ``R3:SAH``).
        images_dir: the folder holding the unzipped ``CQ500CT<n> CQ500CT<n>`` folders.
        out: the dataset folder to write.
        name: the dataset's name in ``dataset.json``.
        copy: copy the DICOM files instead of linking them.
        overwrite: replace an existing ``labels.csv``.

    Returns:
        The rows written: one per study, PatientID the read's ``name``, label the readers'
        majority for ICH, subtype the subtypes with a majority (sorted, joined with ``+``),
        SeriesInstanceUID blank (the router picks the series, as in serving).

    Raises:
        DatasetError: ``reads_csv`` is malformed, or ``out`` has a ``labels.csv`` already.
    """
    out = _start(out, overwrite)
    images_dir = Path(images_dir)
    reads = read_cq500_reads(reads_csv)
    studies: dict[str, _Study] = {}
    numbers: dict[str, int] = {}
    unmatched = 0
    for dirpath, dirnames, filenames in os.walk(images_dir, followlinks=True):
        dirnames.sort()
        for file_name in sorted(filenames):
            path = Path(dirpath) / file_name
            ids = read_dicom_ids(path)
            if ids is None:
                continue
            top = path.relative_to(images_dir).parts[0]
            number = _cq500_number(ids.PatientID)
            if number is None or number not in reads:
                number = _cq500_number(top)
            if number is None or number not in reads:
                unmatched += 1
                continue
            _add_file(studies, ids, path, patient_id=reads[number].name)
            numbers.setdefault(ids.StudyInstanceUID, number)
    if unmatched:
        log.warning("CQ500: %d DICOM file(s) match no read and were left out", unmatched)
    rows = []
    for uid in studies:
        read = reads[numbers[uid]]
        rows.append(
            LabelRow(
                StudyInstanceUID=uid,
                PatientID=read.name,
                finding=HAEMORRHAGE,
                label=read.label,
                subtype="+".join(read.subtypes),
            )
        )
    n_files = _link_all(studies.values(), images_dir, out, copy)
    write_meta(
        out,
        name=name,
        task=HAEMORRHAGE,
        source=f"CQ500 (qure.ai), majority of three readers from {Path(reads_csv).name}",
    )
    write_labels(out, rows)
    log.info("CQ500: %d studies, %d positive, %d files", len(rows), _positives(rows), n_files)
    return rows


# --------------------------------------------------------------------------------------------
# SIIM-ACR Pneumothorax


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode SIIM-ACR's run-length encoding into a mask.

    The format (SIIM's ``mask_functions.py``, ``rle2mask``): space-separated pairs
    ``offset length``; each offset counts from the end of the previous run (the first from
    pixel 0); pixels are numbered down the columns (column-major, Fortran order: pixel ``p``
    is row ``p % rows``, column ``p // rows``). ``-1`` or a blank string is an empty mask.

    Args:
        rle: the encoded runs.
        shape: (rows, columns) of the image.

    Returns:
        bool (rows, columns), True inside the runs.

    Raises:
        ValueError: the text is not pairs of non-negative integers or runs past the image.
    """
    rows, columns = shape
    text = rle.strip()
    if text in ("", "-1"):
        return np.zeros(shape, dtype=bool)
    try:
        numbers = np.array([int(t) for t in text.split()], dtype=np.int64)
    except ValueError:
        raise ValueError("RLE must be integers separated by spaces") from None
    if numbers.size % 2 or (numbers < 0).any():
        raise ValueError("RLE must be pairs of non-negative integers (offset length)")
    offsets, lengths = numbers[0::2], numbers[1::2]
    ends = np.cumsum(offsets + lengths)
    starts = ends - lengths
    if ends[-1] > rows * columns:
        raise ValueError(f"RLE runs past the end of a {rows} x {columns} image")
    edges = np.zeros(rows * columns + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:-1]) > 0
    return flat.reshape((rows, columns), order="F")


def rle_encode(mask: np.ndarray) -> str:
    """Encode a mask in SIIM-ACR's run-length encoding (the inverse of :func:`rle_decode`).

    Args:
        mask: bool or 0/1 (rows, columns).

    Returns:
        ``offset length`` pairs (see :func:`rle_decode`), ``-1`` for an empty mask.
    """
    flat = np.asarray(mask, dtype=bool).ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    starts, ends = changes[0::2], changes[1::2]
    if starts.size == 0:
        return "-1"
    offsets = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{o} {n}" for o, n in zip(offsets, ends - starts, strict=True))


@dataclass
class _Radiograph:
    ids: DicomIds
    rows: int
    columns: int
    spacing: tuple[float, float]  # (row, column) mm


def _read_radiograph(path: Path) -> _Radiograph | None:
    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=[
                *_ID_KEYWORDS,
                "Rows",
                "Columns",
                "PixelSpacing",
                "ImagerPixelSpacing",
            ],
        )
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError):
        return None
    ids = DicomIds(
        *(str(ds.get(k, "") or "").strip() for k in _ID_KEYWORDS),
    )
    if not ids.StudyInstanceUID:
        return None
    spacing = (1.0, 1.0)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = [float(v) for v in ds.get(keyword) or []]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(v > 0 for v in values):
            spacing = (values[0], values[1])
            break
    rows = int(ds.get("Rows") or SIIM_SIZE)
    columns = int(ds.get("Columns") or SIIM_SIZE)
    return _Radiograph(ids, rows, columns, spacing)


def write_mask_2d(path: Path, mask: np.ndarray, spacing: tuple[float, float]) -> None:
    """Write a 2D label map on a radiograph's pixel grid as NIfTI.

    Args:
        path: the ``.nii.gz`` file.
        mask: uint8 (rows, columns).
        spacing: (row, column) pixel spacing in mm.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    image.SetSpacing((float(spacing[1]), float(spacing[0])))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def convert_siim_pneumothorax(
    rle_csv: Path,
    images_dir: Path,
    out: Path,
    *,
    spec: ModelSpec | None = None,
    name: str = "siim-acr-pneumothorax",
    copy: bool = False,
    overwrite: bool = False,
) -> list[LabelRow]:
    """Convert the SIIM-ACR Pneumothorax Segmentation training set.

    Args:
        rle_csv: ``train-rle.csv`` (columns ``ImageId``, ``EncodedPixels``; ``-1`` for no
            pneumothorax; one row per region).
        images_dir: the folder below which the ``<ImageId>.dcm`` files lie.
        out: the dataset folder to write.
        spec: the chest model whose output index of ``Pneumothorax`` the masks carry
            (default: the shipped ``xrv-densenet121-res224-all``).
        name: the dataset's name in ``dataset.json``.
        copy: copy the DICOM files instead of linking them.
        overwrite: replace an existing ``labels.csv``.

    Returns:
        The rows written: one per study, finding ``pneumothorax``, label 1 when any region
        is given; for a positive study with one positive image, ``mask`` is
        ``masks/<ImageId>.nii.gz``: uint8 on the radiograph's pixel grid (spacing from
        PixelSpacing or ImagerPixelSpacing), the model's output index inside the regions and
        0 elsewhere; SeriesInstanceUID the images' series when they all belong to one.

    Raises:
        DatasetError: the CSV is malformed (an RLE that is not pairs of integers or runs past
            the image is named by its line), or ``out`` has a ``labels.csv`` already.
    """
    from triage.models.catalog import builtin_spec

    spec = spec or builtin_spec(CHEST_MODEL)
    value = spec.outputs.index(spec.finding(PNEUMOTHORAX).outputs[0])
    out = _start(out, overwrite)
    images_dir = Path(images_dir)
    regions: dict[str, list[tuple[int, str]]] = {}
    checked = False
    for line, row in _rows(rle_csv):
        if not checked:
            _require(rle_csv, row, ("ImageId", "EncodedPixels"))
            checked = True
        if not row["ImageId"]:
            raise DatasetError(f"{rle_csv}: line {line}, column 'ImageId': must not be blank")
        slot = regions.setdefault(row["ImageId"], [])
        if row["EncodedPixels"] not in ("", "-1"):
            slot.append((line, row["EncodedPixels"]))
    files = _dicom_files(images_dir)
    studies: dict[str, _Study] = {}
    positive_images: dict[str, list[str]] = {}
    absent = unreadable = 0
    for image_id, runs in regions.items():
        path = files.get(image_id)
        if path is None:
            absent += 1
            continue
        info = _read_radiograph(path)
        if info is None:
            unreadable += 1
            continue
        study = _add_file(studies, info.ids, path)
        if not runs:
            continue
        study.label = 1
        mask = np.zeros((info.rows, info.columns), dtype=bool)
        for line, rle in runs:
            try:
                mask |= rle_decode(rle, (info.rows, info.columns))
            except ValueError as exc:
                where = f"{rle_csv}: line {line}, column 'EncodedPixels'"
                raise DatasetError(f"{where}: {exc}") from None
        write_mask_2d(
            out / MASKS_DIR / f"{image_id}.nii.gz",
            mask.astype(np.uint8) * np.uint8(value),
            info.spacing,
        )
        positive_images.setdefault(info.ids.StudyInstanceUID, []).append(image_id)
    if absent or unreadable:
        log.warning(
            "SIIM: %d labelled image(s) have no file, %d file(s) are not readable DICOM",
            absent,
            unreadable,
        )
    several = 0
    rows = []
    for uid, study in studies.items():
        positives = positive_images.get(uid, [])
        several += len(positives) > 1
        rows.append(
            LabelRow(
                StudyInstanceUID=uid,
                PatientID=study.patient_id,
                SeriesInstanceUID=next(iter(study.series)) if len(study.series) == 1 else "",
                finding=PNEUMOTHORAX,
                label=study.label,
                mask=f"{MASKS_DIR}/{positives[0]}.nii.gz" if len(positives) == 1 else "",
            )
        )
    if several:
        log.warning("SIIM: %d study(ies) have several positive images: no mask given", several)
    n_files = _link_all(studies.values(), images_dir, out, copy)
    write_meta(
        out,
        name=name,
        task=PNEUMOTHORAX,
        source=f"SIIM-ACR Pneumothorax Segmentation (Kaggle), {Path(rle_csv).name}",
    )
    write_labels(out, rows)
    log.info("SIIM: %d studies, %d positive, %d files", len(rows), _positives(rows), n_files)
    return rows
