"""Files the analysis leaves behind: label masks with their HU grid, one .npz per finding."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Overlay:
    """A model's label mask on the model's grid, kept for the page and DICOM SEG export.

    Attributes:
        labels: uint8 (z, y, x), 0 background, 1.. the model's classes, 1 mm isotropic.
        hu: int16 (z, y, x) HU on the same grid (for previews).
        classes: class names for label values 1..N.
        crop_start: (z, y, x) index of labels[0, 0, 0] in the resampled series volume.
        SeriesInstanceUID: the source series.
    """

    labels: np.ndarray
    hu: np.ndarray
    classes: tuple[str, ...]
    crop_start: tuple[int, int, int]
    SeriesInstanceUID: str


def overlay_path(results_dir: Path, study_uid: str, finding: str) -> Path:
    name = hashlib.sha256(study_uid.encode("ascii")).hexdigest()[:24]
    return results_dir / name / f"{finding}.npz"


def save_overlay(path: Path, overlay: Overlay) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        labels=overlay.labels,
        hu=overlay.hu,
        crop_start=np.asarray(overlay.crop_start, dtype=np.int64),
        classes=np.asarray(overlay.classes),
    )
    tmp.replace(path)


def load_overlay(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Returns (labels uint8 (z,y,x), hu int16 (z,y,x), class names)."""
    with np.load(path) as npz:
        return npz["labels"], npz["hu"], tuple(str(c) for c in npz["classes"])
