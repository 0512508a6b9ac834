"""The codes and words of the DICOM results: what each model class is called in a
Segmentation and a TID 1500 report, the finding codes, units and the AI marking.

Segment codes (all from the DICOM Content Mapping Resource, PS3.16, as pydicom's code
dictionary carries them):

* category: SCT 49755003 "Morphologically Abnormal Structure" (CID 7150);
* type: SCT 50960005 "Hemorrhage" and SCT 79654002 "Edema", both in CID 7159 "Lesion
  Segmentation Type", which CID 7151 "Segmentation Property Type" includes;
* where: the segment's anatomic region, SCT 12738006 "Brain" (intraparenchymal blood,
  oedema), SCT 35764002 "Brain ventricle" (intraventricular blood), SCT 1101003 "Intracranial"
  (extra-axial blood: inside the skull, outside the brain).

Why a morphology plus a site rather than one disorder code per class: no PS3.16 context group
has intraparenchymal, extra-axial or intraventricular haemorrhage, and SNOMED CT itself defines
such disorders as Associated morphology = 50960005 |Hemorrhage| with a Finding site (SNOMED
International's template "Hemorrhage of [body structure] (finding)",
https://conf.spaces.snomed.org/wiki/spaces/SCTEMPLATES/pages/133996425), which is what type +
anatomic region says, post-coordinated, with codes every DICOM reader knows. The SNOMED CT
disorder concepts looked up for these classes, for reference (not emitted):
274100004 "Cerebral hemorrhage (disorder)" for intraparenchymal blood (ICD-10 I61.9 maps to
it in published FHIR concept maps), 2032001 "Cerebral edema" (VisualDx's code list for
cerebral oedema). "Extra-axial haemorrhage" has no SNOMED CT concept (it groups subdural,
epidural and subarachnoid blood, each its own disorder), and no intraventricular-haemorrhage
concept for adults could be confirmed from a source at hand, so neither is guessed.

The study-level finding is SCT 1386000 "Intracranial hemorrhage (disorder)" (pydicom's
dictionary), present or absent as SCT 52101004 "Present" / SCT 272519000 "Absent" (CID 240).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ALGORITHM_FAMILY",
    "CONTENT_LABEL",
    "MANUFACTURER",
    "MILLILITRE",
    "NOT_FOR_DIAGNOSTIC_USE",
    "SCORE_UNIT",
    "SegmentTerms",
    "finding_code",
    "segment_terms",
]

MANUFACTURER: Final[str] = "triage"
"""Manufacturer of every object this package writes."""

NOT_FOR_DIAGNOSTIC_USE: Final[str] = "NOT FOR DIAGNOSTIC USE"
"""The marking of every AI result while the product is uncleared."""

CONTENT_LABEL: Final[str] = "AI_NOT_FOR_DIAG"
"""ContentLabel of the Segmentation (CS: at most 16 upper-case letters, digits, _ or space)."""

ALGORITHM_FAMILY: Final[Code] = codes.cid7162.ArtificialIntelligence
"""DCM 123110 "Artificial Intelligence" (CID 7162 "Algorithm Family")."""

MILLILITRE: Final[Code] = Code("ml", "UCUM", "milliliter")
"""UCUM unit of lesion volumes."""

SCORE_UNIT: Final[Code] = codes.UCUM.NoUnits
"""UCUM "1": a score in [0, 1] has no unit."""


@dataclass(frozen=True)
class SegmentTerms:
    """How one model class appears in a Segmentation and in the report.

    Attributes:
        label: SegmentLabel (at most 64 characters).
        category: segmented property category (CID 7150).
        type: segmented property type (CID 7151).
        region: anatomic region of the segment, and the finding site in the report.
        colour_lab: recommended display colour, CIE L*a*b* (L* in [0, 100]).
    """

    label: str
    category: Code
    type: Code
    region: Code
    colour_lab: tuple[float, float, float]


_ABNORMAL: Final[Code] = codes.SCT.MorphologicallyAbnormalStructure

_CLASS_TERMS: Final[dict[str, SegmentTerms]] = {
    "IPH": SegmentTerms(
        "Intraparenchymal haemorrhage", _ABNORMAL, codes.SCT.Hemorrhage, codes.SCT.Brain,
        (47.0, 70.0, 48.0),
    ),
    "EAH": SegmentTerms(
        "Extra-axial haemorrhage", _ABNORMAL, codes.SCT.Hemorrhage, codes.SCT.Intracranial,
        (67.0, 36.0, 70.0),
    ),
    "oedema": SegmentTerms(
        "Perilesional oedema", _ABNORMAL, codes.SCT.Edema, codes.SCT.Brain, (87.0, -8.0, 77.0)
    ),
    "IVH": SegmentTerms(
        "Intraventricular haemorrhage", _ABNORMAL, codes.SCT.Hemorrhage,
        codes.SCT.BrainVentricle, (52.0, 15.0, -63.0),
    ),
}  # fmt: skip

_FINDING_CODES: Final[dict[str, Code]] = {
    "intracranial_haemorrhage": codes.SCT.IntracranialHemorrhage,
}


def segment_terms(class_name: str) -> SegmentTerms:
    """The terms of a model class; a class without its own is a generic intracranial lesion
    (SCT 52988006 "Lesion", CID 7159) labelled with its name."""
    terms = _CLASS_TERMS.get(class_name)
    if terms is not None:
        return terms
    return SegmentTerms(
        class_name[:64], _ABNORMAL, codes.SCT.Lesion, codes.SCT.Intracranial, (55.0, 70.0, -40.0)
    )


def finding_code(finding: str) -> Code:
    """The code of a study-level finding.

    Raises:
        ValueError: the finding has no code here yet.
    """
    try:
        return _FINDING_CODES[finding]
    except KeyError:
        raise ValueError(
            f"no DICOM code for the finding {finding!r}; add one to triage.dicomout.terminology"
        ) from None
