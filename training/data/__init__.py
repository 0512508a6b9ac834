"""Datasets for training and evaluation: the generic format read and written, public data sets
converted into it, patient-grouped splits, and MONAI samples through the serving
preprocessing.

* :mod:`training.data.dataset`: :func:`read_dataset`, :class:`StudyRecord`,
  :func:`choose_series` (the series the model reads, routed as in serving).
* :mod:`training.data.adapters`: RSNA 2019 ICH, CQ500, SIIM-ACR pneumothorax.
* :mod:`training.data.splits`: :func:`assign_splits` by patient, :func:`frozen_test_set`.
* :mod:`training.data.samples`: head-CT and chest samples (MONAI), cached and augmented
  reproducibly (imports torch and MONAI: import it directly).
"""

from __future__ import annotations

from training.data.dataset import (
    Dataset,
    DatasetError,
    LabelRow,
    NoSeriesError,
    StudyRecord,
    choose_series,
    read_dataset,
    write_labels,
    write_meta,
)
from training.data.splits import assign_splits, fingerprint, freeze_splits, frozen_test_set

__all__ = [
    "Dataset",
    "DatasetError",
    "LabelRow",
    "NoSeriesError",
    "StudyRecord",
    "assign_splits",
    "choose_series",
    "fingerprint",
    "freeze_splits",
    "frozen_test_set",
    "read_dataset",
    "write_labels",
    "write_meta",
]
