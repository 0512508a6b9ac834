"""A finding's overlay laid on the displayed slices, once per overlay file (then cached).

* ``labels`` (a segmentation on the model's 1 mm grid): every source pixel takes the class of
  the grid voxel nearest its centre, placed by its own slice's position and orientation
  (:func:`triage.dicomout.geometry.labels_on_source`, the mapping the DICOM Segmentation
  uses), so gantry tilt, reversed files and uneven spacing come out as the images lie. Only
  slices that hold a label are kept; the others are zeros.
* ``heatmap`` (a classifier's saliency, float in [0, 1] on a square crop of the radiograph):
  laid back on the source image by the overlay's ``origin`` (row, column of the map's first
  pixel) and ``scale`` (source pixels per map pixel), interpolated bilinearly with pixel
  centres aligned (as the model made the map from the image), as uint8 0..255; 0 outside
  the crop.

Overlays written before the grid geometry was kept cannot be placed: mapping them raises
``OverlayUnavailable`` with the reason, shown in the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from triage.dicomout.geometry import labels_on_source
from triage.preprocess.ct_headers import read_headers
from triage.results import Overlay, OverlayKind
from triage.viewer.series import SeriesLayout

__all__ = [
    "ClassSummary",
    "MappedOverlay",
    "OverlayUnavailable",
    "heatmap_on_source",
    "map_overlay",
    "overlay_series",
]

NO_GEOMETRY = (
    "written before overlays kept their grid's place in patient space, so it cannot be laid"
    " on the images; analyse the study again to show it"
)


class OverlayUnavailable(ValueError):
    """An overlay that cannot be shown on its series; the message says why (no patient
    data)."""


@dataclass(frozen=True)
class ClassSummary:
    """One class of a label overlay on the source slices.

    Attributes:
        value: the label value in the overlay's pixels.
        name: the class name (IPH, EAH, ...).
        voxels: source pixels of the class, over every slice.
        best_index: the displayed slice holding most of them.
    """

    value: int
    name: str
    voxels: int
    best_index: int


@dataclass(frozen=True)
class MappedOverlay:
    """An overlay on the displayed slices of its series.

    Attributes:
        kind: ``labels`` or ``heatmap``.
        classes: per class with pixels (labels); () for a heatmap.
        best_index: the displayed slice with the most of the finding (labels: most labelled
            pixels; heatmap: the image it explains); None when the overlay marks nothing.
        slices: display index -> uint8 (rows, columns) for the slices that hold something.
        shape: (rows, columns) of every slice.
    """

    kind: OverlayKind
    classes: tuple[ClassSummary, ...]
    best_index: int | None
    slices: dict[int, np.ndarray] = field(repr=False)
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return 1024 + sum(int(a.nbytes) for a in self.slices.values())

    def slice(self, index: int) -> np.ndarray:
        """uint8 (rows, columns) on the displayed slice ``index`` (zeros where nothing)."""
        found = self.slices.get(index)
        return found if found is not None else np.zeros(self.shape, dtype=np.uint8)


def _map_labels(
    overlay: Overlay, layout: SeriesLayout, headers: Sequence[pydicom.Dataset] | None
) -> MappedOverlay:
    if not overlay.has_geometry:
        raise OverlayUnavailable(NO_GEOMETRY)
    if layout.kind != "volume":
        raise OverlayUnavailable("a label overlay needs a CT series")
    try:
        if headers is None:
            headers = read_headers(list(dict.fromkeys(ref.path for ref in layout.slices)))
        on_source = labels_on_source(overlay, headers)
    except ValueError as exc:  # PreprocessError is one
        raise OverlayUnavailable(str(exc)) from None
    by_instance = on_source.by_instance()
    n_classes = len(overlay.classes)
    counts = np.zeros((len(layout.slices), n_classes + 1), dtype=np.int64)
    slices: dict[int, np.ndarray] = {}
    for ref in layout.slices:
        labels = by_instance.get((ref.SOPInstanceUID, ref.frame))
        if labels is None or not labels.any():
            continue
        slices[ref.index] = labels.copy()  # not a view that keeps the whole stack alive
        counts[ref.index] = np.bincount(labels.ravel(), minlength=n_classes + 1)
    classes = tuple(
        ClassSummary(
            value=value,
            name=overlay.classes[value - 1],
            voxels=int(counts[:, value].sum()),
            best_index=int(np.argmax(counts[:, value])),
        )
        for value in range(1, n_classes + 1)
        if counts[:, value].any()
    )
    per_slice = counts[:, 1:].sum(axis=1)
    best = int(np.argmax(per_slice)) if per_slice.any() else None
    return MappedOverlay("labels", classes, best, slices, (layout.rows, layout.columns))


def heatmap_on_source(
    heat: np.ndarray,
    origin: Sequence[int],
    scale: Sequence[float],
    shape: tuple[int, int],
) -> np.ndarray:
    """A saliency map laid back on its source image.

    Args:
        heat: float (h, w) saliency in [0, 1] (values outside are clipped).
        origin: (row, column) in the source image of the map's first pixel's corner.
        scale: source pixels per map pixel, (row, column).
        shape: the source image's (rows, columns).

    Returns:
        uint8 (rows, columns): the map resampled bilinearly onto the source pixels it
        covers (``h * scale[0]`` rows from ``origin[0]``, likewise for columns), × 255
        rounded; 0 elsewhere.
    """
    h, w = heat.shape
    height = max(1, round(h * float(scale[0])))
    width = max(1, round(w * float(scale[1])))
    resized = Image.fromarray(np.asarray(heat, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    values = np.rint(np.clip(np.asarray(resized), 0.0, 1.0) * 255.0).astype(np.uint8)
    out = np.zeros(shape, dtype=np.uint8)
    r0, c0 = int(origin[0]), int(origin[1])
    top, left = max(r0, 0), max(c0, 0)
    bottom, right = min(r0 + height, shape[0]), min(c0 + width, shape[1])
    if bottom > top and right > left:
        out[top:bottom, left:right] = values[top - r0 : bottom - r0, left - c0 : right - c0]
    return out


def _map_heatmap(overlay: Overlay, layout: SeriesLayout) -> MappedOverlay:
    ref = next(
        (s for s in layout.slices if s.SOPInstanceUID == overlay.SOPInstanceUID),
        None,
    )
    if ref is None:
        raise OverlayUnavailable("the image the saliency map explains is not shown")
    if overlay.data.ndim != 2 or len(overlay.origin) != 2 or len(overlay.scale) != 2:
        raise OverlayUnavailable("the saliency map lacks its place on the image")
    shape = (layout.rows, layout.columns)
    values = heatmap_on_source(overlay.data, overlay.origin, overlay.scale, shape)
    slices = {ref.index: values} if values.any() else {}
    return MappedOverlay("heatmap", (), ref.index, slices, shape)


def map_overlay(
    overlay: Overlay, layout: SeriesLayout, headers: Sequence[pydicom.Dataset] | None = None
) -> MappedOverlay:
    """Lays an overlay on the displayed slices of its series (see the module docstring).

    Args:
        overlay: the overlay file's content.
        layout: its series as displayed.
        headers: the series' CT image headers when already read (any order); None: read
            here for a label overlay.

    Raises:
        OverlayUnavailable: it cannot be placed (no grid geometry, another series, a heatmap
            whose image is not the one shown, geometry that does not fit the images).
    """
    if overlay.SeriesInstanceUID and overlay.SeriesInstanceUID != layout.SeriesInstanceUID:
        raise OverlayUnavailable("the overlay belongs to another series")
    if overlay.kind == "heatmap":
        return _map_heatmap(overlay, layout)
    return _map_labels(overlay, layout, headers)


def overlay_series(path: Path) -> str:
    """The SeriesInstanceUID an overlay file names ("" for files written before it was kept),
    read without loading its arrays."""
    with np.load(path) as npz:
        return str(npz["SeriesInstanceUID"]) if "SeriesInstanceUID" in npz else ""
