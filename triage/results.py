"""Files the analysis leaves behind: one overlay per finding (.npz), for the page and for
DICOM export.

Two kinds of overlay:

* ``labels``: a segmentation's class map on the model's grid (uint8 (z, y, x), 0 background,
  1..N the model's classes) with the HU it was computed from (int16, same grid), the grid's
  place in the resampled series volume (``origin`` = crop start (z, y, x)) and the grid's
  physical geometry in patient space (``grid_origin``, ``grid_spacing``, ``grid_direction``,
  LPS millimetres, SimpleITK conventions), which lays the map back onto the source images
  (:mod:`triage.dicomout.geometry`). Overlays written before the geometry was kept load with
  None there and cannot be mapped back.
* ``heatmap``: a classifier's saliency map (float16 (rows, columns) in [0, 1]) with the
  radiograph it explains in presentation grey (uint8, same grid); ``origin`` is the (row,
  column) of the map's first pixel in the source image and ``scale`` the source pixels per
  map pixel (row, column), so the map can be laid back onto the original image.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
        grid_origin: ``labels``: LPS position in mm, (x, y, z), of the centre of voxel
            ``data[0, 0, 0]``; None for a heatmap or an overlay written before it was kept.
        grid_spacing: ``labels``: voxel spacing in mm along the grid's (x, y, z) axes, i.e.
            ``data``'s axes 2, 1, 0; None as ``grid_origin``.
        grid_direction: ``labels``: the 3 x 3 direction matrix, row-major, whose columns are
            the grid's x, y and z axes in LPS (SimpleITK ``GetDirection`` order): the centre of
            ``data[k, j, i]`` lies at ``grid_origin + D @ (grid_spacing * (i, j, k))``; None as
            ``grid_origin``.
    """

    kind: OverlayKind
    data: np.ndarray
    background: np.ndarray
    classes: tuple[str, ...]
    origin: tuple[int, ...]
    SeriesInstanceUID: str
    scale: tuple[float, ...] = ()
    SOPInstanceUID: str | None = None
    grid_origin: tuple[float, ...] | None = None
    grid_spacing: tuple[float, ...] | None = None
    grid_direction: tuple[float, ...] | None = None

    @property
    def has_geometry(self) -> bool:
        """Whether the grid's physical geometry is known (``labels`` written by this version)."""
        return (
            self.grid_origin is not None
            and self.grid_spacing is not None
            and self.grid_direction is not None
        )


def overlay_path(results_dir: Path, study_uid: str, finding: str) -> Path:
    name = hashlib.sha256(study_uid.encode("ascii")).hexdigest()[:24]
    return results_dir / name / f"{finding}.npz"


def save_overlay(path: Path, overlay: Overlay) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: two workers may write one study's overlay at once (a lapsed lease).
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp.npz")
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
        **_geometry_arrays(overlay),
    )
    tmp.replace(path)


def _geometry_arrays(overlay: Overlay) -> dict[str, Any]:
    """The grid geometry's npz entries (none when the overlay has no geometry)."""
    values = {
        "grid_origin": (overlay.grid_origin, 3),
        "grid_spacing": (overlay.grid_spacing, 3),
        "grid_direction": (overlay.grid_direction, 9),
    }
    out: dict[str, Any] = {}
    for key, (value, n) in values.items():
        if value is None:
            continue
        array = np.asarray(value, dtype=np.float64)
        if array.shape != (n,) or not np.isfinite(array).all():
            raise ValueError(f"overlay {key} must hold {n} finite numbers, got {value!r}")
        out[key] = array
    return out


def _floats(npz: Any, key: str) -> tuple[float, ...] | None:
    """A float tuple from the npz, None when the file has no such entry (older files)."""
    return tuple(float(v) for v in npz[key]) if key in npz else None


def load_overlay(path: Path) -> Overlay:
    """Read an overlay written by :func:`save_overlay` (or by an earlier version, which kept
    ``labels``, ``hu`` and ``crop_start``). Files written before the grid geometry was kept
    load with ``grid_origin``, ``grid_spacing`` and ``grid_direction`` None."""
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
            grid_origin=_floats(npz, "grid_origin"),
            grid_spacing=_floats(npz, "grid_spacing"),
            grid_direction=_floats(npz, "grid_direction"),
        )
