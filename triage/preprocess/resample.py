"""Resampling a 3D image to isotropic voxels on an orthonormal grid (SimpleITK).

A gantry-tilted CT loads with a sheared (non-orthogonal) direction matrix; resampling keeps the
scan plane and uses its normal as the third axis, which removes the shear.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from triage.preprocess.hu import HU_AIR

__all__ = ["resample_isotropic"]


def _orthonormal(direction: np.ndarray) -> np.ndarray:
    """An orthonormal direction that keeps the scan plane of a sheared (gantry-tilt) image.

    The axis least orthogonal to the others is rebuilt as the normal of the other two; on a tie
    the last such axis is rebuilt (after LPS reorientation of an axial or tilted-axial scan,
    axis 2 is the slice-stacking axis, the one the shear lives in).

    Args:
        direction: float64 (3, 3), columns are the image axes in physical space.

    Returns:
        float64 (3, 3) orthonormal direction with the same handedness; ``direction``
        (normalised) when it is orthonormal already.
    """
    cols = direction / np.linalg.norm(direction, axis=0)
    off = np.abs(cols.T @ cols - np.eye(3))
    if off.max() <= 1e-6:
        return cols
    scores = off.sum(axis=0)
    k = max(a for a in range(3) if scores[a] >= scores.max() - 1e-6)
    i, j = (a for a in range(3) if a != k)
    out = np.empty((3, 3))
    out[:, i] = cols[:, i]
    b = cols[:, j] - (cols[:, j] @ cols[:, i]) * cols[:, i]
    out[:, j] = b / np.linalg.norm(b)
    c = np.cross(out[:, i], out[:, j])
    out[:, k] = c if c @ cols[:, k] >= 0 else -c
    return out


def resample_isotropic(image: sitk.Image, spacing_mm: float = 1.0) -> sitk.Image:
    """Resamples a 3D image to isotropic voxels on an orthonormal grid.

    The output keeps the image's axes (orthonormalised: a gantry-tilt shear is removed by
    keeping the scan plane and using its normal as the third axis) and covers the physical
    extent of all input voxel centres. Linear interpolation; outside the input is ``HU_AIR``.

    Args:
        image: 3D image in HU (any pixel type), any spacing and direction.
        spacing_mm: Output voxel size in mm, the same on all axes.

    Returns:
        float32 HU image with spacing ``(spacing_mm,) * 3``.

    Raises:
        ValueError: ``spacing_mm`` is not positive or the image is not 3D.
    """
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    size = np.asarray(image.GetSize(), dtype=np.float64)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    out_direction = _orthonormal(direction)

    corners = np.array(np.meshgrid(*[[0.0, n - 1.0] for n in size], indexing="ij")).reshape(3, -1)
    physical = origin[:, None] + direction @ (spacing[:, None] * corners)
    local = out_direction.T @ (physical - origin[:, None])
    low, high = local.min(axis=1), local.max(axis=1)
    out_size = np.floor((high - low) / spacing_mm + 1e-6).astype(int) + 1
    out_origin = origin + out_direction @ low

    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing((float(spacing_mm),) * 3)
    resampler.SetSize([int(n) for n in out_size])
    resampler.SetOutputOrigin(tuple(float(v) for v in out_origin))
    resampler.SetOutputDirection(tuple(float(v) for v in out_direction.ravel()))
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(HU_AIR)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    return resampler.Execute(image)
