"""The patient identity the outputs copy from their source images, completed where the sources
leave out what the copy then requires.

highdicom copies the Patient module from the source images. De-identified data sets often say
PatientIdentityRemoved YES without the method (DeidentificationMethod or its code sequence),
which the standard then requires (PS3.3 C.7.1.1, Type 1C); the outputs state that the sources
did not say how, rather than invent a method.
"""

from __future__ import annotations

import pydicom

__all__ = ["METHOD_NOT_STATED", "complete_deidentification"]

METHOD_NOT_STATED = "Not stated by the source images"
"""DeidentificationMethod of an output whose de-identified sources do not name theirs."""


def complete_deidentification(ds: pydicom.Dataset) -> None:
    """Adds DeidentificationMethod when PatientIdentityRemoved is YES and no method is given."""
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        return
    if ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence"):
        return
    ds.DeidentificationMethod = METHOD_NOT_STATED
