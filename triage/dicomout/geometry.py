"""A label overlay laid back onto the source images: one label frame per source image slice.

The model labels a 1 mm isotropic grid resampled from the series (:class:`~triage.results.
Overlay` keeps the grid's origin, spacing and direction in LPS millimetres). Each source
pixel's centre is placed in patient space from its own slice's ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, and takes the label of the nearest grid voxel (0
outside the grid). Nothing is assumed about how the slices stack, so gantry tilt, slices in
any file order or InstanceNumber order, uneven spacing and missing slices all come out as the
images lie. Multi-frame (Enhanced CT) sources are placed frame by frame from their functional
groups (:func:`triage.preprocess.ct_headers.image_slices`).

Conventions: ImageOrientationPatient's first vector is the direction of increasing column
index (along a row), the second of increasing row index; PixelSpacing is (between rows,
between columns). The centre of pixel (row m, column n) lies at
``IPP + n * PixelSpacing[1] * row_vector + m * PixelSpacing[0] * column_vector``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom

from triage.preprocess.ct_headers import Frame, image_slices
from triage.results import Overlay

__all__ = ["SourceLabels", "labels_on_source"]


@dataclass(frozen=True, eq=False)
class SourceLabels:
    """A label map on the source images.

    Attributes:
        slices: the source image slices, in the order of the objects given (frames of a
            multi-frame object in frame order, localizer frames left out); ``slices[i].dataset``
            is the object, ``slices[i].frame`` the 0-based frame index (None: single-frame).
        labels: uint8 (n, rows, columns), ``labels[i]`` on ``slices[i]``'s pixel grid: 0
            background, 1..N ``classes``.
        classes: class names of the label values 1..N.
    """

    slices: tuple[Frame, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def by_instance(self) -> dict[tuple[str, int | None], np.ndarray]:
        """(SOPInstanceUID, frame index or None) -> uint8 (rows, columns) labels."""
        return {
            (str(s.dataset.SOPInstanceUID), s.frame): self.labels[i]
            for i, s in enumerate(self.slices)
        }

    def voxel_counts(self) -> dict[str, int]:
        """Source pixels per class (every slice counted once)."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.classes) + 1)
        return {name: int(counts[i + 1]) for i, name in enumerate(self.classes)}


def _grid(overlay: Overlay) -> tuple[np.ndarray, np.ndarray]:
    """(origin (3,), M (3, 3)) such that the continuous grid index (x, y, z) of the physical
    point p is ``M @ (p - origin)``."""
    if overlay.kind != "labels":
        raise ValueError(
            f"only a labels overlay can be laid on the source images, not {overlay.kind}"
        )
    if not overlay.has_geometry:
        raise ValueError(
            "the overlay has no grid geometry (written before it was kept): analyse the "
            "study again to place its labels on the source images"
        )
    assert overlay.grid_origin is not None and overlay.grid_spacing is not None
    assert overlay.grid_direction is not None
    origin = np.asarray(overlay.grid_origin, dtype=np.float64)
    spacing = np.asarray(overlay.grid_spacing, dtype=np.float64)
    direction = np.asarray(overlay.grid_direction, dtype=np.float64).reshape(3, 3)
    if not (np.all(spacing > 0) and abs(np.linalg.det(direction)) > 1e-6):
        raise ValueError("the overlay's grid spacing or direction is degenerate")
    return origin, np.linalg.inv(direction) / spacing[:, None]


def _slices(sources: Sequence[pydicom.Dataset], series_uid: str) -> list[Frame]:
    slices: list[Frame] = []
    for i, ds in enumerate(sources):
        if series_uid and str(ds.get("SeriesInstanceUID", "")) != series_uid:
            raise ValueError(f"source image {i + 1} is not of the overlay's series")
        found = image_slices(ds, i)
        if not found:
            raise ValueError(f"source image {i + 1} is not a CT image slice (or a localizer)")
        slices.extend(found)
    if not slices:
        raise ValueError("no source images given")
    return slices


def _nonzero_box(data: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Lowest and highest (x, y, z) index of the labelled voxels; None when there are none."""
    if not data.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        present = np.flatnonzero(data.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(int(present[0]))
        hi.append(int(present[-1]))
    return np.array(lo[::-1], dtype=np.float64), np.array(hi[::-1], dtype=np.float64)


def _sample_slice(
    data: np.ndarray,
    box: tuple[np.ndarray, np.ndarray],
    origin: np.ndarray,
    to_index: np.ndarray,
    frame: Frame,
) -> np.ndarray:
    """Nearest-neighbour labels at the centres of one slice's pixels (uint8 (rows, columns))."""
    row_vec, col_vec = frame.orientation[:3], frame.orientation[3:]
    row_spacing, col_spacing = frame.pixel_spacing
    start = to_index @ (frame.position - origin)  # index of pixel (0, 0)
    per_column = to_index @ (row_vec * col_spacing)  # index step to the next column
    per_row = to_index @ (col_vec * row_spacing)  # index step to the next row
    out = np.zeros((frame.rows, frame.columns), dtype=np.uint8)
    # The index is affine in (row, column): its extremes lie at the corners. Skip slices that
    # cannot reach a labelled voxel.
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
    corners *= [frame.rows - 1, frame.columns - 1]
    reach = start + corners[:, :1] * per_row + corners[:, 1:] * per_column
    lo, hi = box
    if np.any(reach.max(axis=0) < lo - 0.5) or np.any(reach.min(axis=0) > hi + 0.5):
        return out
    rows = np.arange(frame.rows, dtype=np.float64)[:, None]
    columns = np.arange(frame.columns, dtype=np.float64)[None, :]
    index = []
    inside = np.ones(out.shape, dtype=bool)
    for axis in range(3):
        i = np.floor(start[axis] + rows * per_row[axis] + columns * per_column[axis] + 0.5)
        inside &= (i >= lo[axis]) & (i <= hi[axis])
        index.append(i)
    x, y, z = (i[inside].astype(np.intp) for i in index)
    out[inside] = data[z, y, x]
    return out


def labels_on_source(overlay: Overlay, sources: Sequence[pydicom.Dataset]) -> SourceLabels:
    """Lays a labels overlay onto the source images of its series.

    Args:
        overlay: a ``labels`` overlay with its grid geometry (``grid_origin``, ``grid_spacing``,
            ``grid_direction``): uint8 (z, y, x) labels 0..N on the model grid.
        sources: the series' CT image objects (headers are enough: read with
            ``stop_before_pixels``, e.g. :func:`triage.preprocess.ct_headers.read_headers`), in
            any order; single-frame, or Enhanced CT placed by their per-frame functional
            groups.

    Returns:
        One uint8 (rows, columns) label frame per source slice, in the order given: each
        pixel takes the label of the grid voxel nearest to its centre in patient space, 0
        outside the grid.

    Raises:
        ValueError: the overlay is not a labels overlay, has no grid geometry (written before
            it was kept) or labels beyond its classes; a source is not a CT image of the
            overlay's series.
        PreprocessError: a source's geometry attributes are missing or malformed.
    """
    origin, to_index = _grid(overlay)
    data = np.ascontiguousarray(overlay.data)
    if data.ndim != 3 or data.dtype != np.uint8:
        raise ValueError(f"overlay data must be uint8 (z, y, x), got {data.dtype} {data.shape}")
    if data.size and int(data.max()) > len(overlay.classes):
        raise ValueError(
            f"overlay labels go up to {int(data.max())} but it names {len(overlay.classes)} classes"
        )
    slices = _slices(sources, overlay.SeriesInstanceUID)
    labels = np.zeros((len(slices), slices[0].rows, slices[0].columns), dtype=np.uint8)
    if any((s.rows, s.columns) != labels.shape[1:] for s in slices):
        raise ValueError("the source images differ in Rows/Columns")
    box = _nonzero_box(data)
    if box is not None:
        for i, frame in enumerate(slices):
            labels[i] = _sample_slice(data, box, origin, to_index, frame)
    return SourceLabels(slices=tuple(slices), labels=labels, classes=tuple(overlay.classes))
