"""CT series geometry: the slices checked against each other, sorted along the slice normal and
placed on a regular grid along the stacking line.

* Slices are ordered along the slice normal (the cross product of the two
  ImageOrientationPatient vectors), never by InstanceNumber or file order.
* Gantry tilt up to ``max_tilt_deg`` is measured here and kept exact by the loader: the
  stacking line follows the ImagePositionPatient line, which is not perpendicular to the slice
  plane on a tilted scan. A larger tilt raises ``GantryTiltError``.
* Missing slices (a gap up to ``MAX_GAP_RATIO`` × the median spacing) and uneven spacing are
  accepted and put on a regular grid (the decoder interpolates between neighbouring slices);
  larger gaps or too little coverage raise ``IncompleteSeriesError``.

Error messages name counts, millimetres, degrees and sorted slice indices only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from triage.preprocess.ct_headers import Frame
from triage.preprocess.errors import GantryTiltError, IncompleteSeriesError, PreprocessError

__all__ = [
    "MAX_GAP_RATIO",
    "MAX_TILT_DEG",
    "Stack",
    "sort_along_normal",
    "stack_geometry",
]

MAX_GAP_RATIO: Final[float] = 2.5
"""A gap between neighbouring slices larger than this × the median spacing means missing slices.

One missing slice (a 2× gap) is interpolated; two or more in a row make the series incomplete."""

MAX_TILT_DEG: Final[float] = 30.0
"""Default largest gantry tilt that ``load_ct_series`` corrects, in degrees.

CT gantries tilt by at most about ±30°; a larger angle between the slice-stacking line and the
slice normal is not a gantry tilt but a reformat or inconsistent positions, and correcting it
would mostly pad the volume with air."""

# Tolerances, in millimetres unless stated.
_DUPLICATE_TOL_MM: Final[float] = 0.01
_LINE_TOL_MM: Final[float] = 0.1
_ORIENTATION_TOL: Final[float] = 1e-4  # direction cosines
_PIXEL_SPACING_RTOL: Final[float] = 1e-4


@dataclass(frozen=True)
class Stack:
    """Where the sorted slices lie along the stacking line, and the regular grid for them.

    Attributes:
        u: Unit stacking direction (first to last slice), float64 (3,).
        t: Offsets of the sorted slices along ``u`` in mm, float64 (n,), t[0] == 0.
        spacing: Grid spacing along ``u`` in mm.
        n_out: Number of grid slices; grid offsets are ``arange(n_out) * spacing``.
        tilt_deg: Gantry tilt in degrees.
        coverage_mm: Coverage along the slice normal in mm.
    """

    u: np.ndarray
    t: np.ndarray
    spacing: float
    n_out: int
    tilt_deg: float
    coverage_mm: float


def _check_consistent(slices: Sequence[Frame]) -> tuple[np.ndarray, np.ndarray]:
    """Checks that all slices share size and orientation; returns unit row and column vectors."""
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise PreprocessError("inconsistent Rows/Columns between slices of the series")
        if not np.allclose(s.orientation, first.orientation, atol=_ORIENTATION_TOL):
            raise PreprocessError(
                "inconsistent ImageOrientationPatient between slices (slices not parallel)"
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=_PIXEL_SPACING_RTOL):
            raise PreprocessError("inconsistent PixelSpacing between slices")
    row, col = first.orientation[:3], first.orientation[3:]
    row_norm, col_norm = np.linalg.norm(row), np.linalg.norm(col)
    if row_norm < 0.5 or col_norm < 0.5 or abs(row @ col) / (row_norm * col_norm) > 1e-3:
        raise PreprocessError("ImageOrientationPatient does not hold two orthogonal unit vectors")
    return row / row_norm, col / col_norm


def stack_geometry(
    positions: np.ndarray,
    normal: np.ndarray,
    *,
    thickness: float | None,
    max_tilt_deg: float,
    min_coverage_mm: float | None,
) -> Stack:
    """Checks the sorted slice positions and picks a regular grid along the stacking line.

    Args:
        positions: float64 (n, 3) ImagePositionPatient in mm, sorted along the slice normal.
        normal: Unit slice normal, float64 (3,).
        thickness: SliceThickness of the first slice (used for a single slice only).
        max_tilt_deg: Largest gantry tilt accepted.
        min_coverage_mm: Least coverage along the normal accepted; None: any.

    Raises:
        PreprocessError: Duplicate positions, or positions off a straight line.
        GantryTiltError: The tilt is above ``max_tilt_deg``.
        IncompleteSeriesError: A gap above ``MAX_GAP_RATIO`` × the median spacing, or
            coverage below ``min_coverage_mm``.
    """
    n = len(positions)
    if n == 1:
        coverage = thickness or 0.0
        _check_coverage(coverage, min_coverage_mm, n)
        return Stack(normal, np.zeros(1), thickness or 1.0, 1, 0.0, coverage)
    steps = np.diff(positions, axis=0)
    step_len = np.linalg.norm(steps, axis=1)
    if np.any(step_len < _DUPLICATE_TOL_MM):
        n_dup = int(np.count_nonzero(step_len < _DUPLICATE_TOL_MM))
        raise PreprocessError(f"duplicate slice positions: {n_dup} slice(s) share a position")
    extent = positions[-1] - positions[0]
    u = extent / np.linalg.norm(extent)
    rel = positions - positions[0]
    t = rel @ u
    off_line = float(np.max(np.linalg.norm(rel - np.outer(t, u), axis=1)))
    if off_line > _LINE_TOL_MM:
        raise PreprocessError(
            f"slice positions do not lie on a straight line (off by up to {off_line:.2f} mm)"
        )
    along_normal = float(extent @ normal)
    lateral = float(np.linalg.norm(extent - along_normal * normal))
    cos_tilt = float(np.clip(u @ normal, -1.0, 1.0))
    tilt = 0.0 if lateral <= _LINE_TOL_MM else math.degrees(math.acos(cos_tilt))
    if tilt > max_tilt_deg:
        raise GantryTiltError(tilt, max_tilt_deg)
    gaps = np.diff(t)
    median = float(np.median(gaps))
    worst = int(np.argmax(gaps))
    if gaps[worst] > MAX_GAP_RATIO * median:
        raise IncompleteSeriesError(
            f"missing slices: gap of {gaps[worst]:.2f} mm between sorted slices {worst} and "
            f"{worst + 1} is {gaps[worst] / median:.1f}x the median spacing of {median:.3f} mm"
        )
    coverage = (float(t[-1]) + median) * cos_tilt
    _check_coverage(coverage, min_coverage_mm, n)
    n_out = round(float(t[-1]) / median) + 1
    spacing = float(t[-1]) / (n_out - 1)
    return Stack(u, t, spacing, n_out, tilt, coverage)


def _check_coverage(coverage: float, min_coverage_mm: float | None, n: int) -> None:
    """Raises ``IncompleteSeriesError`` when the coverage is below the minimum."""
    if min_coverage_mm is not None and coverage < min_coverage_mm:
        raise IncompleteSeriesError(
            f"the series covers {coverage:.1f} mm along the slice normal with {n} slice(s); "
            f"at least {min_coverage_mm:g} mm are needed"
        )


def sort_along_normal(slices: list[Frame]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks that the slices are parallel and alike and sorts them along the slice normal,
    in place.

    Returns:
        (row, col, normal): unit row, column and normal vectors, float64 (3,) each.

    Raises:
        PreprocessError: The slices differ in size, orientation or pixel spacing, or the
            orientation does not hold two orthogonal vectors.
    """
    row, col = _check_consistent(slices)
    normal = np.cross(row, col)
    slices.sort(key=lambda s: float(s.position @ normal))
    return row, col, normal
