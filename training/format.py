"""The generic dataset format every ``triage-train`` step reads and writes.

A dataset is a folder::

    <dataset>/
      dataset.json    {"format": "triage-dataset/1", "name", "task", "source", "created", ...}
      dicom/...       DICOM files of one or more studies (any layout below ``dicom/``)
      masks/...       optional masks: NIfTI label maps (``.nii.gz``) on the grid of the source
                      series, or DICOM Segmentation objects
      labels.csv      one row per study and finding (columns :data:`LABEL_COLUMNS`)

``labels.csv`` columns:

- ``StudyInstanceUID``: the study (its files are found under ``dicom/`` by their headers).
- ``PatientID``: the patient (a pseudonym in exports); splits group by it, never by image.
- ``SeriesInstanceUID``: the series the label refers to; blank: the series the model's
  router chooses, as in serving.
- ``finding``: a finding code of a model spec (``intracranial_haemorrhage``,
  ``pneumothorax``...).
- ``label``: 1 present, 0 absent.
- ``mask``: optional path relative to the dataset folder. A NIfTI label map whose values are
  the model's output indices (BLAST-CT: 0 background, 1 IPH, 2 EAH, 3 oedema, 4 IVH), in
  the patient geometry of the series (SimpleITK writes LPS geometry as NIfTI's RAS), or a
  DICOM Segmentation whose segment labels name those classes.
- ``subtype``: optional lesion type (:data:`HAEMORRHAGE_SUBTYPES`, ``normal``...).
- ``volume_ml``: optional true lesion volume in ml (synthetic data, expert masks).
- ``split``: optional ``train``, ``val`` or ``test``; blank: assigned by patient.
"""

from __future__ import annotations

from typing import Final

FORMAT: Final = "triage-dataset/1"
LABELS_FILE: Final = "labels.csv"
META_FILE: Final = "dataset.json"
DICOM_DIR: Final = "dicom"
MASKS_DIR: Final = "masks"

LABEL_COLUMNS: Final[tuple[str, ...]] = (
    "StudyInstanceUID",
    "PatientID",
    "SeriesInstanceUID",
    "finding",
    "label",
    "mask",
    "subtype",
    "volume_ml",
    "split",
)

SPLITS: Final[tuple[str, ...]] = ("train", "val", "test")

#: Haemorrhage types and the BLAST-CT output class each is labelled with.
HAEMORRHAGE_SUBTYPES: Final[dict[str, int]] = {
    "intraparenchymal": 1,  # IPH
    "subdural": 2,  # EAH (extra-axial)
    "epidural": 2,  # EAH
    "subarachnoid": 2,  # EAH
    "intraventricular": 4,  # IVH
}

HAEMORRHAGE: Final = "intracranial_haemorrhage"
PNEUMOTHORAX: Final = "pneumothorax"
