"""Writing synthetic studies: DICOM series, NIfTI masks and the dataset's own files.

Everything here is deterministic: UIDs come from ``pydicom.uid.generate_uid`` with entropy
sources (a key naming the generator's parameters, plus the study and instance numbers), dates
from the study number, so the same call writes byte-identical DICOM and NIfTI files.

Geometry conventions (as in ``triage.preprocess.ct``): arrays are indexed (z, y, x); origins are
LPS millimetres (x, y, z) of the centre of voxel ``[0, 0, 0]``; images are axial
(ImageOrientationPatient ``1\\0\\0\\0\\1\\0``) with z increasing from slice to slice.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from training.format import FORMAT, LABEL_COLUMNS, LABELS_FILE, META_FILE

__all__ = [
    "CT_RESCALE_INTERCEPT",
    "MANUFACTURER",
    "NOT_FOR_DIAGNOSIS",
    "StudyIds",
    "SynthReport",
    "SynthStudy",
    "default_shared_dir",
    "params_key",
    "study_ids",
    "synth_uid",
    "write_ct_series",
    "write_dataset_files",
    "write_label_map",
    "write_radiograph",
]

MANUFACTURER: Final = "triage-synth"
NOT_FOR_DIAGNOSIS: Final = "SYNTHETIC IMAGE - NOT FOR DIAGNOSTIC USE"
CT_RESCALE_INTERCEPT: Final[int] = -1024
"""HU = stored value + this (RescaleSlope 1), as on most scanners and in the demo phantom."""

_HU_MIN: Final[int] = -1024
_HU_MAX: Final[int] = 3071  # 12 bits stored
_FIRST_DATE: Final = date(2024, 1, 1)


def default_shared_dir() -> Path:
    """``../shared`` beside the repository checkout (absent in a user's fresh clone)."""
    return Path(__file__).resolve().parents[2].parent / "shared"


def synth_uid(*parts: object) -> str:
    """A UID derived only from ``parts`` (pydicom's root, SHA-512 of the parts)."""
    return str(
        generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["triage-synth", *map(str, parts)])
    )


def params_key(params: Mapping[str, Any]) -> str:
    """A short digest of a generator's parameters (enters every UID and patient ID, so two
    datasets made with different parameters never share UIDs)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class StudyIds:
    """Identifiers of one synthetic study (one series).

    Attributes:
        StudyInstanceUID: Study UID.
        SeriesInstanceUID: Series UID.
        FrameOfReferenceUID: Frame of reference UID of the series.
        PatientID: Synthetic patient ID, ``SYNTH-<key>-<n>``.
        PatientName: ``SYNTH^<n>``.
        AccessionNumber: Derived from the study UID.
        StudyDate: ``YYYYMMDD``.
        StudyTime: ``HHMMSS``.
        key: The generator's parameter digest (entropy of the instance UIDs).
    """

    StudyInstanceUID: str
    SeriesInstanceUID: str
    FrameOfReferenceUID: str
    PatientID: str
    PatientName: str
    AccessionNumber: str
    StudyDate: str
    StudyTime: str
    key: str

    def sop_uid(self, index: int) -> str:
        """The SOP Instance UID of instance ``index`` (0-based) of the series."""
        return synth_uid(self.key, self.SeriesInstanceUID, "sop", index)


def study_ids(key: str, study: int, patient: int, *, visit: int = 0) -> StudyIds:
    """Deterministic identifiers of study ``study`` of synthetic patient ``patient``.

    Args:
        key: The generator's parameter digest (:func:`params_key`).
        study: 0-based study number in the dataset.
        patient: 0-based patient number in the dataset.
        visit: 0-based number of the study among the patient's studies (later visits get
            later dates).
    """
    study_uid = synth_uid(key, "study", study)
    when = _FIRST_DATE + timedelta(days=7 * patient + 3 * visit)
    minutes = (study * 37) % (12 * 60)
    return StudyIds(
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=synth_uid(key, study_uid, "series"),
        FrameOfReferenceUID=synth_uid(key, study_uid, "frame"),
        PatientID=f"SYNTH-{key[:6].upper()}-{patient + 1:04d}",
        PatientName=f"SYNTH^{patient + 1}",
        AccessionNumber="SY" + hashlib.sha256(study_uid.encode()).hexdigest()[:10].upper(),
        StudyDate=when.strftime("%Y%m%d"),
        StudyTime=f"{8 + minutes // 60:02d}{minutes % 60:02d}00",
        key=key,
    )


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(PYDICOM_ROOT_UID + "2")
    meta.ImplementationVersionName = "TRIAGE_SYNTH"
    return meta


def _common(ds: pydicom.Dataset, ids: StudyIds, sop_class: str, sop_uid: str) -> None:
    """Patient, study and equipment attributes shared by CT and radiographs."""
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = ids.StudyDate
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = ids.StudyTime
    ds.AccessionNumber = ids.AccessionNumber
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "training.synth"
    ds.InstitutionName = "triage synthetic data"
    ds.ReferringPhysicianName = ""
    ds.PatientName = ids.PatientName
    ds.PatientID = ids.PatientID
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.StudyInstanceUID = ids.StudyInstanceUID
    ds.SeriesInstanceUID = ids.SeriesInstanceUID
    ds.StudyID = "1"
    ds.BurnedInAnnotation = "NO"


def write_ct_series(
    out_dir: Path,
    hu: np.ndarray,
    *,
    spacing_mm: Sequence[float],
    origin_mm: Sequence[float],
    ids: StudyIds,
    comment: str = NOT_FOR_DIAGNOSIS,
) -> list[Path]:
    """Write an axial head CT volume as a CT Image Storage series, one file per slice.

    The attributes follow ``triage.demo.phantom.write_head_ct_series`` (which builds its own
    phantom and cannot write a given volume): Explicit VR Little Endian, stored values
    HU + 1024 as uint16 (12 bits stored), RescaleIntercept -1024, RescaleSlope 1, ImageType
    ORIGINAL\\PRIMARY\\AXIAL, BodyPartExamined HEAD, StudyDescription ``CT HEAD``,
    SeriesDescription ``HEAD WO``, kernel STANDARD, so the series flows through ingest and is
    routed to ``blast-ct-v1``.

    Args:
        out_dir: Folder to write into (created if missing); files ``CT0001.dcm``... in slice
            order (inferior to superior).
        hu: int16 or float array (z, y, x) in HU; rounded and clipped to [-1024, 3071].
        spacing_mm: (z, y, x) spacing in mm; z is the slice thickness and spacing.
        origin_mm: LPS (x, y, z) in mm of the centre of voxel ``[0, 0, 0]``.
        ids: The study's identifiers.
        comment: ImageComments of every slice.

    Returns:
        The written paths, in slice order.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D volume (z, y, x), got shape {hu.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st, sy, sx = (float(v) for v in spacing_mm)
    ox, oy, oz = (float(v) for v in origin_mm)
    n, rows, columns = hu.shape
    stored = (
        np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int32) - CT_RESCALE_INTERCEPT
    ).astype(np.uint16)
    paths: list[Path] = []
    for i in range(n):
        ds = pydicom.Dataset()
        _common(ds, ids, CTImageStorage, ids.sop_uid(i))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.StudyDescription = "CT HEAD"
        ds.SeriesDescription = "HEAD WO"
        ds.BodyPartExamined = "HEAD"
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = f"{st:g}"
        ds.SpacingBetweenSlices = f"{st:g}"
        ds.KVP = "120"
        ds.XRayTubeCurrent = 300
        ds.ConvolutionKernel = "STANDARD"
        ds.ReconstructionDiameter = f"{sx * columns:.1f}"
        ds.GantryDetectorTilt = "0"
        ds.PatientPosition = "HFS"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        z_mm = oz + i * st
        ds.ImagePositionPatient = [f"{ox:.4f}", f"{oy:.4f}", f"{z_mm:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = ids.FrameOfReferenceUID
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z_mm:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        ds.RescaleIntercept = str(CT_RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.ImageComments = comment[:10240]
        ds.PixelData = np.ascontiguousarray(stored[i]).astype("<u2").tobytes()
        path = out_dir / f"CT{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_radiograph(
    path: Path,
    pixels: np.ndarray,
    *,
    pixel_spacing_mm: float,
    ids: StudyIds,
    comment: str = NOT_FOR_DIAGNOSIS,
    bits_stored: int = 12,
) -> Path:
    """Write a chest PA radiograph as a CR Image Storage object (MONOCHROME2).

    Args:
        path: File to write (its folder is created if missing).
        pixels: float array (rows, columns) in [0, 1], 1 = brightest (bone, MONOCHROME2);
            stored as ``round(pixels * (2**bits_stored - 1))`` in uint16.
        pixel_spacing_mm: Square pixel spacing in mm (written as ImagerPixelSpacing and
            PixelSpacing).
        ids: The study's identifiers.
        comment: ImageComments.
        bits_stored: Bits stored (8..16).

    Returns:
        ``path``.
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2D image (rows, columns), got shape {pixels.shape}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must lie in [8, 16], got {bits_stored}")
    top = (1 << bits_stored) - 1
    stored = np.rint(np.clip(pixels, 0.0, 1.0) * top).astype(np.uint16)
    ds = pydicom.Dataset()
    _common(ds, ids, ComputedRadiographyImageStorage, ids.sop_uid(0))
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Modality = "CR"
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(v) for v in stored.shape)
    spacing = [f"{pixel_spacing_mm:.6g}", f"{pixel_spacing_mm:.6g}"]
    ds.ImagerPixelSpacing = spacing
    ds.PixelSpacing = spacing
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = f"{(top + 1) // 2}"
    ds.WindowWidth = f"{top + 1}"
    ds.ImageComments = comment[:10240]
    ds.PixelData = np.ascontiguousarray(stored).astype("<u2").tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_label_map(
    path: Path,
    labels: np.ndarray,
    *,
    spacing_mm: Sequence[float],
    origin_mm: Sequence[float],
) -> Path:
    """Write a label map as NIfTI on the grid of an axial series (SimpleITK: LPS → RAS).

    Args:
        path: ``.nii.gz`` file to write (its folder is created if missing).
        labels: uint8 array (z, y, x) (a CT series' grid) or (rows, columns) (a radiograph,
            written as a 2D image) of class indices.
        spacing_mm: (z, y, x) or (row, column) spacing in mm.
        origin_mm: LPS (x, y, z) of the centre of voxel ``[0, 0, 0]``, or (x, y) for 2D.

    Returns:
        ``path``.
    """
    if labels.ndim not in (2, 3) or len(spacing_mm) != labels.ndim:
        raise ValueError(f"labels {labels.shape} and spacing {spacing_mm} do not match")
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(np.uint8)))
    image.SetSpacing(tuple(float(v) for v in reversed(tuple(spacing_mm))))
    image.SetOrigin(tuple(float(v) for v in origin_mm))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


@dataclass(frozen=True)
class SynthStudy:
    """One study written by a generator.

    Attributes:
        StudyInstanceUID: Its study UID.
        SeriesInstanceUID: Its (only) series' UID.
        PatientID: Its synthetic patient.
        finding: The finding code it is labelled for (``training.format``).
        label: 1 lesion present, 0 absent.
        subtype: Lesion type (a ``HAEMORRHAGE_SUBTYPES`` key, ``pneumothorax``) or
            ``normal``.
        volume_ml: True lesion volume in ml (voxels labelled with the finding's class ×
            voxel volume); 0 for a normal CT; None for radiographs.
        requested_ml: The volume asked for (None for normals and radiographs).
        mask: Label map path relative to the dataset folder, or None.
        files: The DICOM files written (absolute paths).
        extra: Generator-specific facts (blood HU, side, base image...), no patient data.
    """

    StudyInstanceUID: str
    SeriesInstanceUID: str
    PatientID: str
    finding: str
    label: int
    subtype: str
    volume_ml: float | None
    requested_ml: float | None
    mask: Path | None
    files: tuple[Path, ...] = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def uid(self) -> str:
        """The study UID (short name)."""
        return self.StudyInstanceUID

    def label_row(self) -> dict[str, str]:
        """This study's ``labels.csv`` row (columns ``LABEL_COLUMNS``)."""
        return {
            "StudyInstanceUID": self.StudyInstanceUID,
            "PatientID": self.PatientID,
            "SeriesInstanceUID": self.SeriesInstanceUID,
            "finding": self.finding,
            "label": str(self.label),
            "mask": self.mask.as_posix() if self.mask is not None else "",
            "subtype": self.subtype,
            "volume_ml": "" if self.volume_ml is None else f"{self.volume_ml:.4f}",
            "split": "",
        }


@dataclass(frozen=True)
class SynthReport:
    """What a generator wrote.

    Attributes:
        dataset: The dataset folder (``training.format`` layout).
        studies: The studies, in the order of ``labels.csv``.
        base: Which base images were used (``cq500``, ``phantom``, ``siim+nih``, ...).
    """

    dataset: Path
    studies: list[SynthStudy]
    base: str

    @property
    def positives(self) -> list[SynthStudy]:
        """The studies with a lesion."""
        return [s for s in self.studies if s.label == 1]


def write_dataset_files(
    out: Path,
    *,
    task: str,
    studies: Sequence[SynthStudy],
    meta: Mapping[str, Any],
) -> None:
    """Write ``dataset.json`` and ``labels.csv`` of a synthetic dataset.

    Args:
        out: The dataset folder.
        task: The dataset's task (``haemorrhage``, ``chest``...).
        studies: One ``labels.csv`` row each.
        meta: Further ``dataset.json`` entries (generator parameters, base image attribution).
    """
    doc: dict[str, Any] = {
        "format": FORMAT,
        "name": out.name,
        "task": task,
        "source": "synth",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "not_for_diagnostic_use": True,
        **meta,
    }
    (out / META_FILE).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    with (out / LABELS_FILE).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(LABEL_COLUMNS))
        writer.writeheader()
        for study in studies:
            writer.writerow(study.label_row())
