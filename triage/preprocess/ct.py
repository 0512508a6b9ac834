"""Head-CT preprocessing: one DICOM series → a 1 mm isotropic HU volume of the head.

The pipeline is ``load_ct_series`` → ``resample_isotropic`` → ``head_mask`` → ``crop_to_head``;
``prepare_head_ct`` runs all four. Window presets and the ``ClipAndScaleHU`` transforms turn HU
into model input.

Geometry conventions:

* ``SimpleITK.Image`` objects carry physical geometry in LPS millimetres (ITK convention) and are
  indexed (x, y, z); numpy arrays taken from them are indexed (z, y, x).
* Slices are ordered along the slice normal (the cross product of the two
  ImageOrientationPatient vectors), never by InstanceNumber.
* Gantry tilt is kept exact: the slice-stacking axis of the loaded image follows the
  ImagePositionPatient line, which is not perpendicular to the slice plane on a tilted scan, so
  the direction matrix of ``CTSeriesVolume.image`` may be non-orthogonal. ``resample_isotropic``
  resamples onto an orthonormal grid, which removes the shear.

Error messages never contain patient data: they name attributes, counts, slice indices (in
sorted order) and geometry only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils.enums import TransformBackends
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

__all__ = [
    "HU_AIR",
    "IMAGE_KEY",
    "MIN_SLICES",
    "ClipAndScaleHU",
    "ClipAndScaleHUd",
    "CTSeriesVolume",
    "HeadCT",
    "IncompleteSeriesError",
    "PreprocessError",
    "WindowPreset",
    "crop_to_head",
    "head_mask",
    "load_ct_series",
    "prepare_head_ct",
    "resample_isotropic",
]

HU_AIR: Final[float] = -1024.0
"""HU used for air, for pixel padding and for voxels outside the scanned volume."""

MIN_SLICES: Final[int] = 8
"""Fewest image slices a series must have."""

MAX_GAP_RATIO: Final[float] = 2.5
"""A gap between neighbouring slices larger than this × the median spacing means missing slices."""

HEAD_THRESHOLD_HU: Final[float] = -300.0
"""Voxels above this HU count as body (skin, fat, soft tissue, bone) in ``head_mask``."""

IMAGE_KEY: Final[str] = "image"
"""Default dictionary key of the CT image for the dictionary transforms."""

# Tolerances, in millimetres unless stated.
_DUPLICATE_TOL_MM: Final[float] = 0.01
_LINE_TOL_MM: Final[float] = 0.1
_ORIENTATION_TOL: Final[float] = 1e-4  # direction cosines
_PIXEL_SPACING_RTOL: Final[float] = 1e-4
_REGULAR_TOL: Final[float] = 0.05  # fraction of the slice spacing

_LOCALIZER: Final[str] = "LOCALIZER"
_ENHANCED_CT: Final[frozenset[str]] = frozenset(
    {EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)


class PreprocessError(ValueError):
    """A series cannot be turned into a model input.

    The message says what is wrong (attribute, count, geometry) and never holds patient data.
    """


class IncompleteSeriesError(PreprocessError):
    """The series covers too little to be read: too few slices, or gaps too large.

    The study gets the ``incomplete_series`` status (more images may still arrive).
    """


@dataclass(frozen=True, eq=False)
class CTSeriesVolume:
    """One CT series as a 3D image in Hounsfield units.

    Attributes:
        image: float32 HU image, geometry (origin, spacing, direction) from DICOM in LPS mm,
            reoriented with ``sitk.DICOMOrient(image, "LPS")``. Values below -1024 HU and
            pixel padding are set to -1024. The slices lie on a regular grid along the stacking
            axis: where the source spacing is uneven (a missing slice within the allowed gap),
            the grid keeps the median spacing and the missing slices are linearly interpolated,
            so the image may have more slices than ``n_slices``. On a gantry-tilted series the
            direction matrix is non-orthogonal (the stacking axis follows the slice positions).
        StudyInstanceUID: Study Instance UID of the series.
        SeriesInstanceUID: Series Instance UID of the series.
        n_slices: Number of DICOM image slices read (localizers and non-image objects excluded).
    """

    image: sitk.Image
    StudyInstanceUID: str
    SeriesInstanceUID: str
    n_slices: int


@dataclass(frozen=True, eq=False)
class HeadCT:
    """A head CT ready for the models.

    Attributes:
        hu: float32 array (z, y, x) in HU, isotropic at ``spacing_mm``, cropped to the head
            bounding box plus a small margin. Axes follow LPS: x towards the patient's left,
            y posterior, z superior (approximately, on an oblique or tilted scan).
        spacing_mm: Voxel spacing (z, y, x) in mm.
        resampled: The whole isotropic float32 HU image before cropping; maps masks back to
            patient space (``hu`` equals ``GetArrayViewFromImage(resampled)`` at ``crop_start``).
        crop_start: (z, y, x) index of ``hu[0, 0, 0]`` within the ``resampled`` array.
        head_mask: bool array, same shape as ``hu``, True inside the head (body, not air or
            table).
        StudyInstanceUID: Study Instance UID of the series.
        SeriesInstanceUID: Series Instance UID of the series.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    resampled: sitk.Image
    crop_start: tuple[int, int, int]
    head_mask: np.ndarray
    StudyInstanceUID: str
    SeriesInstanceUID: str


@dataclass(frozen=True)
class _Slice:
    """Header facts of one image slice, before decoding."""

    dataset: pydicom.Dataset
    position: np.ndarray  # ImagePositionPatient, mm, float64 (3,)
    orientation: np.ndarray  # ImageOrientationPatient, float64 (6,)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rows: int
    columns: int


# --------------------------------------------------------------------------------------------
# Loading


def _read(path: Path, index: int, total: int) -> pydicom.Dataset | None:
    """Reads one file; None for files that are not DICOM."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        return None
    except Exception as exc:
        raise PreprocessError(
            f"file {index + 1} of {total} cannot be read as DICOM ({type(exc).__name__})"
        ) from None


def _is_ct_image(ds: pydicom.Dataset) -> bool:
    """Whether a dataset is a CT image slice (not a localizer, report or other object)."""
    if "PixelData" not in ds:
        return False
    sop_class = ds.get("SOPClassUID")
    if sop_class in _ENHANCED_CT:
        raise PreprocessError("enhanced multi-frame CT is not supported yet")
    if sop_class is not None and sop_class != CTImageStorage:
        return False
    if sop_class is None and ds.get("Modality") != "CT":
        return False
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return _LOCALIZER not in image_type


def _required(ds: pydicom.Dataset, keyword: str, index: int) -> Any:
    """The value of a required attribute of image ``index`` (1-based in messages)."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise PreprocessError(f"image {index + 1} lacks {keyword}")
    return value


def _slice_header(ds: pydicom.Dataset, index: int) -> _Slice:
    """Reads and checks the geometry attributes of one slice."""
    keywords = (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
    )
    values = [_required(ds, keyword, index) for keyword in keywords]
    try:
        position, orientation, spacing = (np.asarray(v, dtype=np.float64) for v in values[:3])
        rows, columns = int(values[3]), int(values[4])
    except (TypeError, ValueError):
        raise PreprocessError(f"image {index + 1} has a malformed geometry attribute") from None
    if position.shape != (3,) or not np.all(np.isfinite(position)):
        raise PreprocessError(f"image {index + 1}: ImagePositionPatient must hold 3 numbers")
    if orientation.shape != (6,) or not np.all(np.isfinite(orientation)):
        raise PreprocessError(f"image {index + 1}: ImageOrientationPatient must hold 6 numbers")
    if spacing.shape != (2,) or not np.all(spacing > 0):
        raise PreprocessError(f"image {index + 1}: PixelSpacing must hold 2 positive numbers")
    if int(ds.get("NumberOfFrames") or 1) != 1:
        raise PreprocessError("multi-frame CT images are not supported yet")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise PreprocessError(f"image {index + 1}: SamplesPerPixel must be 1 for CT")
    return _Slice(ds, position, orientation, (spacing[0], spacing[1]), rows, columns)


def _check_consistent(slices: Sequence[_Slice]) -> tuple[np.ndarray, np.ndarray]:
    """Checks that all slices share size and orientation; returns unit row and column vectors."""
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise PreprocessError("inconsistent Rows/Columns between slices of the series")
        if not np.allclose(s.orientation, first.orientation, atol=_ORIENTATION_TOL):
            raise PreprocessError("inconsistent ImageOrientationPatient between slices")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=_PIXEL_SPACING_RTOL):
            raise PreprocessError("inconsistent PixelSpacing between slices")
    row, col = first.orientation[:3], first.orientation[3:]
    row_norm, col_norm = np.linalg.norm(row), np.linalg.norm(col)
    if row_norm < 0.5 or col_norm < 0.5 or abs(row @ col) / (row_norm * col_norm) > 1e-3:
        raise PreprocessError("ImageOrientationPatient does not hold two orthogonal unit vectors")
    return row / row_norm, col / col_norm


def _stack_geometry(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Checks the sorted slice positions and picks a regular grid along the stacking line.

    Args:
        positions: float64 (n, 3) ImagePositionPatient in mm, sorted along the slice normal.

    Returns:
        (u, t, spacing, n_out): unit stacking direction, offsets of the source slices along it
        in mm (t[0] == 0), the regular grid spacing in mm and the number of grid slices.
    """
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
    gaps = np.diff(t)
    median = float(np.median(gaps))
    worst = int(np.argmax(gaps))
    if gaps[worst] > MAX_GAP_RATIO * median:
        raise PreprocessError(
            f"missing slices: gap of {gaps[worst]:.2f} mm between sorted slices {worst} and "
            f"{worst + 1} is {gaps[worst] / median:.1f}x the median spacing of {median:.3f} mm"
        )
    n_out = round(float(t[-1]) / median) + 1
    spacing = float(t[-1]) / (n_out - 1)
    return u, t, spacing, n_out


def _decode_hu(item: _Slice, index: int, out: np.ndarray) -> None:
    """Decodes one slice into ``out`` (float32 (rows, columns)) in HU.

    HU = stored × RescaleSlope + RescaleIntercept; PixelPaddingValue and anything below
    ``HU_AIR`` (padding outside the reconstruction circle) become ``HU_AIR``.
    """
    ds = item.dataset
    try:
        stored = pixel_array(ds)  # unlike ds.pixel_array, keeps no decoded copy on ds
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise PreprocessError(
            f"pixel data of sorted slice {index} cannot be decoded ({name}, {type(exc).__name__})"
        ) from None
    if stored.shape != out.shape:
        raise PreprocessError(f"pixel data of sorted slice {index} does not match Rows/Columns")
    slope_value, intercept_value = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    try:
        slope = 1.0 if slope_value in (None, "") else float(slope_value)
        intercept = 0.0 if intercept_value in (None, "") else float(intercept_value)
    except (TypeError, ValueError):
        raise PreprocessError(
            f"sorted slice {index} has a malformed RescaleSlope/Intercept"
        ) from None
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
        raise PreprocessError(f"sorted slice {index} has an unusable RescaleSlope/Intercept")
    out[...] = stored
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    padding = ds.get("PixelPaddingValue")
    if isinstance(padding, int) and padding * slope + intercept > HU_AIR:
        out[stored == padding] = HU_AIR
    np.maximum(out, np.float32(HU_AIR), out=out)


def _blend(lower: np.ndarray, upper: np.ndarray, w: float, out: np.ndarray) -> None:
    """out = (1 - w) × lower + w × upper, for float32 slices of one shape."""
    np.multiply(lower, np.float32(1.0 - w), out=out)
    out += np.float32(w) * upper


def _decode_onto_grid(
    slices: Sequence[_Slice], t: np.ndarray, spacing: float, n_out: int
) -> np.ndarray:
    """Decodes the sorted slices onto a regular grid along the stacking axis, in HU.

    Source slices that sit on grid positions are decoded straight into place; grid positions
    between them (missing slices) are interpolated linearly. Uneven slices that do not sit on
    the grid are decoded first and then interpolated.

    Args:
        slices: Sorted slices (n of them).
        t: float64 (n,) slice offsets along the stacking axis in mm, ascending, t[0] == 0.
        spacing: Grid spacing in mm.
        n_out: Number of grid slices; grid offsets are ``arange(n_out) * spacing``.

    Returns:
        float32 (n_out, rows, columns) HU.
    """
    shape = (slices[0].rows, slices[0].columns)
    slots = np.rint(t / spacing).astype(np.int64)
    on_grid = np.all(np.abs(t - slots * spacing) <= _REGULAR_TOL * spacing)
    if on_grid and len(np.unique(slots)) == len(slots):
        out = np.empty((n_out, *shape), dtype=np.float32)
        for k, item in enumerate(slices):
            _decode_hu(item, k, out[slots[k]])
        for a, b in zip(slots[:-1], slots[1:], strict=True):
            for j in range(a + 1, b):
                _blend(out[a], out[b], (j - a) / (b - a), out[j])
        return out

    source = np.empty((len(slices), *shape), dtype=np.float32)
    for k, item in enumerate(slices):
        _decode_hu(item, k, source[k])
    out = np.empty((n_out, *shape), dtype=np.float32)
    grid = np.arange(n_out) * spacing
    below = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 2)
    for j, (k, tj) in enumerate(zip(below, grid, strict=True)):
        _blend(source[k], source[k + 1], float((tj - t[k]) / (t[k + 1] - t[k])), out[j])
    return out


def load_ct_series(paths: Sequence[Path]) -> CTSeriesVolume:
    """Loads one CT series into a float32 HU image with its DICOM geometry.

    Files that are not DICOM, objects without pixel data, non-CT objects and localizers
    (ImageType containing LOCALIZER) are ignored. The remaining slices must belong to one
    series, share size and orientation, number at least ``MIN_SLICES``, have distinct positions
    on one straight line and no gap above ``MAX_GAP_RATIO`` × the median spacing. HU are
    ``stored × RescaleSlope + RescaleIntercept`` per slice.

    Args:
        paths: DICOM files of the series, in any order.

    Returns:
        The series as a ``CTSeriesVolume`` (see there for the image's geometry and values).

    Raises:
        PreprocessError: The files do not form one usable CT series; the message says why.
    """
    total = len(paths)
    if total == 0:
        raise PreprocessError("no files given")
    datasets = [_read(Path(p), i, total) for i, p in enumerate(paths)]
    images = [ds for ds in datasets if ds is not None and _is_ct_image(ds)]
    if not images:
        raise PreprocessError(f"none of the {total} files is a CT image slice")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in images}
    if len(series_uids) > 1:
        raise PreprocessError(
            f"the files hold {len(series_uids)} series; pass the files of one series"
        )
    if len(images) < MIN_SLICES:
        raise PreprocessError(
            f"the series has {len(images)} image slice(s); at least {MIN_SLICES} are needed"
        )
    slices = [_slice_header(ds, i) for i, ds in enumerate(images)]
    row, col = _check_consistent(slices)
    normal = np.cross(row, col)
    slices.sort(key=lambda s: float(s.position @ normal))
    positions = np.stack([s.position for s in slices])
    u, t, dz, n_out = _stack_geometry(positions)

    hu = _decode_onto_grid(slices, t, dz, n_out)

    row_spacing, col_spacing = slices[0].pixel_spacing
    image = sitk.GetImageFromArray(hu)
    del hu
    image.SetSpacing((col_spacing, row_spacing, dz))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetDirection(tuple(float(v) for v in np.stack([row, col, u], axis=1).ravel()))
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        image.GetDirection()
    )
    if orientation != "LPS":
        image = sitk.DICOMOrient(image, "LPS")

    first = slices[0].dataset
    return CTSeriesVolume(
        image=image,
        StudyInstanceUID=str(first.get("StudyInstanceUID", "")),
        SeriesInstanceUID=str(first.get("SeriesInstanceUID", "")),
        n_slices=len(slices),
    )


# --------------------------------------------------------------------------------------------
# Resampling, head mask, crop


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


def _largest_component(mask: sitk.Image) -> sitk.Image:
    """The largest 6-connected component of a binary image (all 0 when the image is empty)."""
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return labels == 1


def head_mask(hu: np.ndarray, threshold_hu: float = HEAD_THRESHOLD_HU) -> np.ndarray:
    """Finds the head: the largest body-density 3D component, detached from the table.

    Steps: threshold (drops air and the head rest's foam); a morphological opening at half
    resolution (erosion by 2 voxels = 4 mm at 1 mm spacing, largest component, dilation by 3)
    cuts thin structures touching the head, such as the head holder; the largest component of
    the thresholded voxels inside the opened core; holes (air in sinuses, airways, ear canals)
    filled in each axial slice. Small objects, where the opening would leave nothing, fall back
    to the largest thresholded component.

    Args:
        hu: float array (z, y, x) in HU, about 1 mm isotropic (morphology radii are in voxels).
        threshold_hu: Voxels above this count as body.

    Returns:
        bool array (z, y, x), True inside the head; all False when nothing exceeds the
        threshold.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D array (z, y, x), got shape {hu.shape}")
    body = sitk.GetImageFromArray((hu > threshold_hu).view(np.uint8))
    small = sitk.Shrink(body, [2, 2, 2])
    core = _largest_component(sitk.BinaryErode(small, [2, 2, 2], sitk.sitkBall))
    if sitk.GetArrayViewFromImage(core).any():
        near = sitk.BinaryDilate(core, [3, 3, 3], sitk.sitkBall)
        near = sitk.Resample(near, body, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        body = body & near
    head = _largest_component(body)
    mask = sitk.GetArrayFromImage(head).astype(bool)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        filled = sitk.BinaryFillhole(sitk.GetImageFromArray(mask[z].view(np.uint8)))
        mask[z] = sitk.GetArrayViewFromImage(filled) != 0
    return mask


def crop_to_head(
    hu: np.ndarray, mask: np.ndarray, margin_vox: int = 2
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Crops an array and its head mask to the mask's bounding box plus a margin.

    Args:
        hu: float array (z, y, x) in HU.
        mask: bool array, same shape, True inside the head.
        margin_vox: Voxels kept around the bounding box on each side (clipped at the edges).

    Returns:
        (cropped_hu, cropped_mask, start): copies of the cropped arrays and the (z, y, x)
        index of ``cropped_hu[0, 0, 0]`` in ``hu``.

    Raises:
        PreprocessError: The mask is empty (no head found).
        ValueError: The shapes differ or ``margin_vox`` is negative.
    """
    if hu.shape != mask.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and mask {mask.shape} must be the same 3D shape")
    if margin_vox < 0:
        raise ValueError(f"margin_vox must be >= 0, got {margin_vox}")
    if not mask.any():
        raise PreprocessError("no head found: no body-density voxels in the image")
    start: list[int] = []
    stop: list[int] = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(max(int(present[0]) - margin_vox, 0))
        stop.append(min(int(present[-1]) + 1 + margin_vox, mask.shape[axis]))
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    return hu[box].copy(), mask[box].copy(), (start[0], start[1], start[2])


def prepare_head_ct(paths: Sequence[Path], spacing_mm: float = 1.0) -> HeadCT:
    """Loads a head-CT series, resamples it to isotropic voxels and crops it to the head.

    Args:
        paths: DICOM files of one CT series, in any order.
        spacing_mm: Output voxel size in mm.

    Returns:
        The ``HeadCT`` (float32 HU (z, y, x) at ``spacing_mm``, with head mask and crop offset).

    Raises:
        PreprocessError: The series is unusable or holds no head; the message says why.
    """
    volume = load_ct_series(paths)
    resampled = resample_isotropic(volume.image, spacing_mm)
    array = sitk.GetArrayViewFromImage(resampled)
    mask = head_mask(array)
    hu, cropped_mask, start = crop_to_head(array, mask)
    z, y, x = (float(v) for v in reversed(resampled.GetSpacing()))
    return HeadCT(
        hu=hu,
        spacing_mm=(z, y, x),
        resampled=resampled,
        crop_start=start,
        head_mask=cropped_mask,
        StudyInstanceUID=volume.StudyInstanceUID,
        SeriesInstanceUID=volume.SeriesInstanceUID,
    )


# --------------------------------------------------------------------------------------------
# Windows and intensity transforms


class WindowPreset(enum.Enum):
    """Head-CT display windows as (level, width) in HU."""

    brain = (40.0, 80.0)
    subdural = (75.0, 215.0)
    stroke = (40.0, 40.0)
    bone = (600.0, 2800.0)

    @property
    def level(self) -> float:
        """Window centre in HU."""
        return self.value[0]

    @property
    def width(self) -> float:
        """Window width in HU."""
        return self.value[1]

    @property
    def hu_range(self) -> tuple[float, float]:
        """(lowest, highest) HU of the window."""
        return (self.level - self.width / 2, self.level + self.width / 2)


class ClipAndScaleHU(Transform):
    """Clips HU to [lo, hi] and maps that range linearly onto [-1, 1].

    Input: numpy array or torch tensor (MetaTensor kept) of any shape, in HU.
    Output: the same type and shape, float32, values in [-1, 1].
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, lo: float, hi: float) -> None:
        """Sets the HU range.

        Args:
            lo: HU mapped to -1 (lower values are clipped).
            hi: HU mapped to +1 (higher values are clipped).

        Raises:
            ValueError: ``lo`` is not below ``hi``.
        """
        if not lo < hi:
            raise ValueError(f"lo must be below hi, got lo={lo}, hi={hi}")
        self.lo = float(lo)
        self.hi = float(hi)

    @classmethod
    def from_window(cls, preset: WindowPreset) -> ClipAndScaleHU:
        """The transform for a display window preset."""
        lo, hi = preset.hu_range
        return cls(lo, hi)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Applies the transform; see the class docstring."""
        width = self.hi - self.lo
        if isinstance(img, torch.Tensor):
            out = img.to(torch.float32).clamp(self.lo, self.hi)
            return (out - self.lo) / width * 2.0 - 1.0
        arr = np.clip(np.asarray(img, dtype=np.float32), self.lo, self.hi)
        arr -= np.float32(self.lo)
        arr /= np.float32(width)
        arr *= np.float32(2.0)
        arr -= np.float32(1.0)
        return arr


class ClipAndScaleHUd(MapTransform):
    """Dictionary wrapper of ``ClipAndScaleHU`` for the given keys."""

    backend = ClipAndScaleHU.backend

    def __init__(
        self,
        keys: KeysCollection = IMAGE_KEY,
        *,
        lo: float,
        hi: float,
        allow_missing_keys: bool = False,
    ) -> None:
        """Sets the keys and the HU range.

        Args:
            keys: Keys of the HU images to transform.
            lo: HU mapped to -1.
            hi: HU mapped to +1.
            allow_missing_keys: Do not fail when a key is absent.
        """
        super().__init__(keys, allow_missing_keys)
        self.transform = ClipAndScaleHU(lo, hi)

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        """Returns a shallow copy of ``data`` with the keyed HU images transformed."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
