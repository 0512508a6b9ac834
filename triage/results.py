"""Files the analysis leaves behind: one overlay per finding (.npz), for the page and for
DICOM export.

Two kinds of overlay:

* ``labels``: a segmentation's class map on the model's grid (uint8 (z, y, x), 0 background,
  1..N the model's classes) with the HU it was computed from (int16, same grid) and the
  grid's place in the resampled series volume (``origin`` = crop start (z, y, x)).
* ``heatmap``: a classifier's saliency map (float16 (rows, columns) in [0, 1]) with the
  radiograph it explains in presentation grey (uint8, same grid); ``origin`` is the (row,
  column) of the map's first pixel in the source image and ``scale`` the source pixels per
  map pixel (row, column), so the map can be laid back onto the original image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

OverlayKind = Literal["labels", "heatmap"]


@dataclass
class Overlay:
    """What a model marks on the images it read (see the module doc for the two kinds).

    Attributes:
        kind: ``labels`` or ``heatmap``.
        data: uint8 (z, y, x) class map, or float16 (rows, columns) saliency in [0, 1].
        background: int16 (z, y, x) HU, or uint8 (rows, columns) presentation grey.
        classes: class names for label values 1..N (``labels``), or the finding(s) the map
            explains (``heatmap``).
        origin: (z, y, x) crop start in the resampled series, or (row, column) in the source
            image.
        SeriesInstanceUID: the source series.
        scale: source pixels per map pixel (row, column) for ``heatmap``; () for ``labels``.
        SOPInstanceUID: the source image of a ``heatmap``; None for a volume.
    """

    kind: OverlayKind
    data: np.ndarray
    background: np.ndarray
    classes: tuple[str, ...]
    origin: tuple[int, ...]
    SeriesInstanceUID: str
    scale: tuple[float, ...] = ()
    SOPInstanceUID: str | None = None


def overlay_path(results_dir: Path, study_uid: str, finding: str) -> Path:
    name = hashlib.sha256(study_uid.encode("ascii")).hexdigest()[:24]
    return results_dir / name / f"{finding}.npz"


def save_overlay(path: Path, overlay: Overlay) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        kind=np.asarray(overlay.kind),
        data=overlay.data,
        background=overlay.background,
        origin=np.asarray(overlay.origin, dtype=np.int64),
        scale=np.asarray(overlay.scale, dtype=np.float64),
        classes=np.asarray(overlay.classes),
        SeriesInstanceUID=np.asarray(overlay.SeriesInstanceUID),
        SOPInstanceUID=np.asarray(overlay.SOPInstanceUID or ""),
    )
    tmp.replace(path)


def load_overlay(path: Path) -> Overlay:
    """Read an overlay written by :func:`save_overlay` (or by an earlier version, which kept
    ``labels``, ``hu`` and ``crop_start``)."""
    with np.load(path) as npz:
        classes = tuple(str(c) for c in npz["classes"])
        if "kind" not in npz:  # written before overlays had kinds
            return Overlay(
                kind="labels",
                data=npz["labels"],
                background=npz["hu"],
                classes=classes,
                origin=tuple(int(v) for v in npz["crop_start"]),
                SeriesInstanceUID="",
            )
        kind: OverlayKind = "heatmap" if str(npz["kind"]) == "heatmap" else "labels"
        return Overlay(
            kind=kind,
            data=npz["data"],
            background=npz["background"],
            classes=classes,
            origin=tuple(int(v) for v in npz["origin"]),
            SeriesInstanceUID=str(npz["SeriesInstanceUID"]),
            scale=tuple(float(v) for v in npz["scale"]),
            SOPInstanceUID=str(npz["SOPInstanceUID"]) or None,
        )
