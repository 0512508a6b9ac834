"""A real chest radiograph for the demo, taken from the ``pydicom-data`` package.

The file is David Clunie's public CR test image ``RG1_*`` (a PA chest radiograph, Philips
THORAVISION, MONOCHROME1), shipped by ``pydicom-data`` and reachable through
``pydicom.data.get_testdata_file`` without a network. ``write_demo_radiograph`` copies it with
fresh UIDs and a synthetic, de-identified patient so that repeated demos never collide with
each other or with the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Final

import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, generate_uid

__all__ = [
    "DEMO_RADIOGRAPH_CANDIDATES",
    "demo_radiograph_paths",
    "write_demo_radiograph",
]

DEMO_RADIOGRAPH_CANDIDATES: Final[tuple[str, ...]] = (
    "RG1_J2KI.dcm",  # JPEG 2000 (lossy 10:1), 0.7 MB
    "RG1_UNCR.dcm",  # uncompressed, 7.2 MB: used when no JPEG 2000 decoder is installed
)
"""``pydicom-data`` file names of the CR chest PA, in order of preference."""

_UID_ROOT: Final[str] = "1.2.826.0.1.3680043.8.498."

# Attributes that identify the original patient, institution or people: removed from the copy
# (in addition to every private tag and every other patient-module attribute set below).
_REMOVE: Final[tuple[str, ...]] = (
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientAge",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "OperatorsName",
    "PerformingPhysicianName",
    "RequestingPhysician",
    "ImageComments",
    "InstanceCreatorUID",
    "SourceImageSequence",
    "ReferencedStudySequence",
    "ReferencedPatientSequence",
    "IrradiationEventUID",
)


def _usable(ds: Dataset) -> bool:
    """Whether pydicom can decode the pixel data of ``ds`` here."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None:
        return False
    tsyntax = UID(tsyntax)
    if not tsyntax.is_compressed:
        return True
    try:
        return bool(get_decoder(tsyntax).is_available)
    except NotImplementedError:
        return False


def demo_radiograph_paths(candidates: Sequence[str] = DEMO_RADIOGRAPH_CANDIDATES) -> list[Path]:
    """The real chest radiograph used by the demo.

    Args:
        candidates: ``pydicom-data`` file names to try, in order of preference; the first one
            that is installed and whose transfer syntax pydicom can decode here is used.

    Returns:
        A list holding the path of one CR chest PA DICOM file.

    Raises:
        RuntimeError: ``pydicom-data`` is not installed, or none of the candidates can be
            decoded here; the message says what to install.
    """
    from pydicom.data import get_testdata_file

    found: list[str] = []
    for name in candidates:
        path = get_testdata_file(name, download=False)
        if not isinstance(path, str):
            continue
        found.append(name)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if _usable(ds):
            return [Path(path)]
    if not found:
        raise RuntimeError(
            "the demo chest radiograph comes from the 'pydicom-data' package, which is not "
            f"installed (looked for {', '.join(candidates)}); install it with "
            "'pip install pydicom-data'"
        )
    raise RuntimeError(
        f"the demo chest radiographs {', '.join(found)} use transfer syntaxes pydicom cannot "
        "decode here; install 'pylibjpeg pylibjpeg-openjpeg' (JPEG 2000)"
    )


def write_demo_radiograph(
    out_dir: Path,
    *,
    StudyInstanceUID: str | None = None,
    patient_name: str = "DEMO^CHEST XRAY",
    patient_id: str = "DEMO-CR-0001",
    accession: str | None = None,
    study_datetime: datetime | None = None,
) -> list[Path]:
    """Copy the demo radiograph into ``out_dir`` with fresh UIDs and a synthetic patient.

    The pixel data (and its transfer syntax) are kept byte for byte. Study, Series and SOP
    Instance UIDs are new on every call (the study UID is ``StudyInstanceUID`` when given),
    identifying attributes and private tags are removed, the patient is synthetic, and an
    invalid zero PixelSpacing is dropped.

    Args:
        out_dir: Folder to write into (created if missing).
        StudyInstanceUID: Put the image in this study; default a new UID.
        patient_name: PatientName of the copy.
        patient_id: PatientID of the copy.
        accession: AccessionNumber; default derived from the new study UID.
        study_datetime: StudyDate/StudyTime; default now.

    Returns:
        The path of the written file, in a list.

    Raises:
        RuntimeError: See :func:`demo_radiograph_paths`.
    """
    source = demo_radiograph_paths()[0]
    ds = pydicom.dcmread(source)
    study_uid = StudyInstanceUID or str(generate_uid(prefix=_UID_ROOT))
    series_uid = str(generate_uid(prefix=_UID_ROOT))
    sop_uid = str(generate_uid(prefix=_UID_ROOT))
    when = study_datetime or datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    ds.remove_private_tags()
    for keyword in _REMOVE:
        if keyword in ds:
            delattr(ds, keyword)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "triage demo: synthetic patient, new UIDs"
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = accession if accession is not None else f"CR{study_uid[-10:]}"[-16:]
    ds.StudyID = "1"
    ds.StudyDescription = "XR CHEST PA"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    if "InstanceCreationDate" in ds:
        ds.InstanceCreationDate = date
        ds.InstanceCreationTime = time
    # The source's PixelSpacing is 0\0, which DICOM does not allow (values must be positive):
    # leave the spacing out rather than pass on a value that divides by zero downstream.
    spacing = ds.get("PixelSpacing")
    if spacing is not None and not all(float(v) > 0 for v in spacing):
        del ds.PixelSpacing
    ds.Modality = ds.get("Modality") or "CR"
    ds.BodyPartExamined = ds.get("BodyPartExamined") or "CHEST"

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "CR0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]
