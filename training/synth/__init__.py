"""Synthetic data for tests, demos and CI, written in the generic dataset format.

* :func:`synth_ct_dataset`: head CTs with intracranial haemorrhage of a requested type and
  volume (on the real CQ500 head or the demo phantom), NIfTI masks of the BLAST-CT classes.
* :func:`synth_xray_dataset`: chest PA radiographs with and without a pneumothorax (on real
  radiographs), 2D NIfTI masks.

Both are deterministic in their seed and write DICOM that flows through the real ingest,
preprocessing and router (``blast-ct-v1`` and ``xrv-densenet121-res224-all``).
"""

from __future__ import annotations

from training.synth.ct import (
    BLOOD_HU,
    Anatomy,
    BaseVolume,
    InsertedLesion,
    head_anatomy,
    insert_haemorrhage,
    synth_ct_dataset,
)
from training.synth.dicomio import SynthReport, SynthStudy
from training.synth.xray import (
    InsertedPneumothorax,
    insert_pneumothorax,
    lung_masks,
    synth_xray_dataset,
)

__all__ = [
    "BLOOD_HU",
    "Anatomy",
    "BaseVolume",
    "InsertedLesion",
    "InsertedPneumothorax",
    "SynthReport",
    "SynthStudy",
    "head_anatomy",
    "insert_haemorrhage",
    "insert_pneumothorax",
    "lung_masks",
    "synth_ct_dataset",
    "synth_xray_dataset",
]
