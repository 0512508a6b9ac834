"""The patient identity the outputs copy from their source images, completed where the sources
leave out what the copy then requires.

highdicom copies the Patient module from the source images. De-identified data sets often say
PatientIdentityRemoved YES without the method (DeidentificationMethod or its code sequence),
which the standard then requires (PS3.3 C.7.1.1, Type 1C); the outputs state that the sources
did not say how, rather than invent a method.
"""

from __future__ import annotations

import re

import pydicom

__all__ = [
    "COPIED_TYPE2",
    "METHOD_NOT_STATED",
    "complete_deidentification",
    "complete_type2",
    "drop_invalid_age",
]

METHOD_NOT_STATED = "Not stated by the source images"
"""DeidentificationMethod of an output whose de-identified sources do not name theirs."""


def complete_deidentification(ds: pydicom.Dataset) -> None:
    """Adds DeidentificationMethod when PatientIdentityRemoved is YES and no method is given."""
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        return
    if ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence"):
        return
    ds.DeidentificationMethod = METHOD_NOT_STATED


# The Patient and Study attributes highdicom copies from the first source image into a
# Segmentation and an SR: Type 2 in CT images (present, possibly empty), yet often missing
# from real files; highdicom reads them as attributes and fails on a missing one.
COPIED_TYPE2: tuple[str, ...] = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def complete_type2(ds: pydicom.Dataset) -> None:
    """Adds the Type 2 attributes the outputs copy (:data:`COPIED_TYPE2`) as empty values
    where ``ds`` lacks them (call it on the caller's own copies of the source headers)."""
    for keyword in COPIED_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")


_AGE = re.compile(r"\d{3}[DWMY]")


def drop_invalid_age(ds: pydicom.Dataset) -> None:
    """Removes PatientAge (Type 3 where the outputs carry it) when it is not an Age String
    (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``): some sources write ``62``, and the unit is not
    guessed."""
    if "PatientAge" in ds and not _AGE.fullmatch(str(ds.PatientAge or "")):
        del ds.PatientAge
