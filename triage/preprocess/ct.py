"""Head-CT preprocessing: one DICOM series → a 1 mm isotropic HU volume of the head.

The pipeline is ``load_ct_series`` → ``resample_isotropic`` → ``head_mask`` → ``crop_to_head``;
``prepare_head_ct`` runs all four. Window presets and the ``ClipAndScaleHU`` transforms turn HU
into model input.

Inputs: single-frame CT Image Storage objects, and multi-frame Enhanced CT and Legacy Converted
Enhanced CT objects, whose frames are placed by their functional groups (per-frame groups first,
shared groups as fallback). One series may mix both.

Geometry conventions:

* ``SimpleITK.Image`` objects carry physical geometry in LPS millimetres (ITK convention) and are
  indexed (x, y, z); numpy arrays taken from them are indexed (z, y, x).
* Slices are ordered along the slice normal (the cross product of the two
  ImageOrientationPatient vectors), never by InstanceNumber or file order.
* Gantry tilt up to ``max_tilt_deg`` (default ``MAX_TILT_DEG``) is kept exact: the
  slice-stacking axis of the loaded image follows the ImagePositionPatient line, which is not
  perpendicular to the slice plane on a tilted scan, so the direction matrix of
  ``CTSeriesVolume.image`` may be non-orthogonal. ``resample_isotropic`` resamples onto an
  orthonormal grid, which removes the shear. A larger tilt raises ``GantryTiltError``.
* Missing slices (a gap up to ``MAX_GAP_RATIO`` × the median spacing) and uneven spacing are
  put on a regular grid by linear interpolation between neighbouring slices; larger gaps, too
  few slices or too little coverage raise ``IncompleteSeriesError``.

Decoding and HU: single-frame JPEG Lossless files (the usual compressed archive format, and
the slow one to decode) are decoded and rescaled by GDCM through SimpleITK's
``ImageSeriesReader``, runs of consecutive slices in threads (SimpleITK releases the GIL while
it reads; pylibjpeg, pydicom's JPEG decoder, does not). pydicom decodes everything else: native
(uncompressed) data, RLE, JPEG-LS, JPEG 2000, lossy JPEG, the frames of multi-frame objects,
files GDCM cannot read, and everything with ``decoder="pydicom"``. GDCM is kept to JPEG
Lossless on purpose: its RLE decoder kills the process (SIGFPE) on a malformed fragment, it
reads truncated native pixel data without complaint, and lossy JPEG decoders differ by ±1.
Both decoders give HU = stored × RescaleSlope + RescaleIntercept computed in float64 and rounded
once to float32, so lossless data gives identical HU whichever decodes it.

Error messages never contain patient data: they name attributes, counts, slice indices (in
sorted order or in the order given) and geometry only.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

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
    JPEGLossless,
    JPEGLosslessSV1,
    LegacyConvertedEnhancedCTImageStorage,
)

from triage.preprocess.errors import GantryTiltError, IncompleteSeriesError, PreprocessError

try:  # copies an array into an existing image (GetImageFromArray's second half)
    from SimpleITK.extra import _SetImageFromArray as _copy_into_image
except ImportError:  # pragma: no cover - a SimpleITK without it: GetImageFromArray
    _copy_into_image = None

__all__ = [
    "HEAD_MIN_COVERAGE_MM",
    "HU_AIR",
    "IMAGE_KEY",
    "MAX_GAP_RATIO",
    "MAX_TILT_DEG",
    "MIN_SLICES",
    "ClipAndScaleHU",
    "ClipAndScaleHUd",
    "CTSeriesVolume",
    "GantryTiltError",
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
"""Default fewest image slices (frames) of ``load_ct_series``: what the haemorrhage model needs.

Loading itself works from one slice (``min_slices=1``)."""

MAX_GAP_RATIO: Final[float] = 2.5
"""A gap between neighbouring slices larger than this × the median spacing means missing slices.

One missing slice (a 2× gap) is interpolated; two or more in a row make the series incomplete."""

MAX_TILT_DEG: Final[float] = 30.0
"""Default largest gantry tilt that ``load_ct_series`` corrects, in degrees.

CT gantries tilt by at most about ±30°; a larger angle between the slice-stacking line and the
slice normal is not a gantry tilt but a reformat or inconsistent positions, and correcting it
would mostly pad the volume with air."""

HEAD_MIN_COVERAGE_MM: Final[float] = 90.0
"""Default least coverage along the slice normal for ``prepare_head_ct``, in mm.

A whole adult head CT (skull base to vertex) covers about 120–180 mm; 90 mm is the same limit
as the haemorrhage model's series rule used for routing (``BLAST_CT_V1``), so a series that
routing accepts is not refused here. Coverage is measured as in routing: the extent of the
slice centres along the normal plus one slice spacing."""

HEAD_THRESHOLD_HU: Final[float] = -300.0
"""Voxels above this HU count as body (skin, fat, soft tissue, bone) in ``head_mask``."""

IMAGE_KEY: Final[str] = "image"
"""Default dictionary key of the CT image for the dictionary transforms."""

Decoder = Literal["gdcm", "pydicom"]

# Tolerances, in millimetres unless stated.
_DUPLICATE_TOL_MM: Final[float] = 0.01
_LINE_TOL_MM: Final[float] = 0.1
_ORIENTATION_TOL: Final[float] = 1e-4  # direction cosines
_PIXEL_SPACING_RTOL: Final[float] = 1e-4
_REGULAR_TOL: Final[float] = 0.05  # fraction of the slice spacing

_MAX_WORKERS: Final[int] = 8
_CHUNK_SLICES: Final[int] = 16  # files per GDCM series read
_DEFER_BYTES: Final[int] = 64 * 1024  # larger values (native pixel data) stay on disk until used
_LOCALIZER: Final[str] = "LOCALIZER"
# Transfer syntaxes GDCM decodes (see the module docstring); pydicom decodes the others.
_GDCM_SYNTAXES: Final[frozenset[str]] = frozenset({JPEGLossless, JPEGLosslessSV1})
_ENHANCED_CT: Final[frozenset[str]] = frozenset(
    {EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)
# The functional group macro (sequence) that holds each attribute in multi-frame objects.
_GROUP_OF: Final[dict[str, str]] = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "FrameType": "CTImageFrameTypeSequence",
}


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
        n_slices: Number of image slices read: single-frame objects plus frames of multi-frame
            objects (localizers and non-image objects excluded).
        gantry_tilt_deg: Angle between the slice-stacking line and the slice normal, degrees
            (0 when the slice positions lie on the normal within 0.1 mm).
        coverage_mm: Extent of the slice centres along the slice normal plus one slice
            spacing (the slice thickness for a single slice, 0 when unknown).
    """

    image: sitk.Image
    StudyInstanceUID: str
    SeriesInstanceUID: str
    n_slices: int
    gantry_tilt_deg: float = 0.0
    coverage_mm: float = 0.0


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


@dataclass(frozen=True, eq=False)
class _Frame:
    """Header facts of one image slice: a single-frame object or one frame of a multi-frame one.

    Attributes:
        dataset: The object (pixel data possibly still on disk: read with ``defer_size``).
        path: Its file.
        frame: 0-based frame index in a multi-frame object; None for a single-frame object.
        position: ImagePositionPatient, mm, float64 (3,).
        orientation: ImageOrientationPatient, float64 (6,).
        pixel_spacing: (row spacing, column spacing) in mm.
        rows: Rows.
        columns: Columns.
        slope: RescaleSlope (1 when absent).
        intercept: RescaleIntercept (0 when absent).
        thickness: SliceThickness in mm, None when absent or malformed.
        gdcm: Whether GDCM may decode it: a single-frame object in a transfer syntax of
            ``_GDCM_SYNTAXES``.
    """

    dataset: pydicom.Dataset
    path: Path
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    thickness: float | None
    gdcm: bool


@dataclass(frozen=True)
class _Stack:
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


# --------------------------------------------------------------------------------------------
# Loading: headers


def _read(path: Path, index: int, total: int) -> pydicom.Dataset | None:
    """Reads one file's header (native pixel data deferred); None for files that are not DICOM."""
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except InvalidDicomError:
        return None
    except Exception as exc:
        raise PreprocessError(
            f"file {index + 1} of {total} cannot be read as DICOM ({type(exc).__name__})"
        ) from None


def _image_kind(ds: pydicom.Dataset) -> Literal["single", "enhanced"] | None:
    """'single' for a CT Image slice, 'enhanced' for an (Legacy Converted) Enhanced CT object,
    None for anything else (localizers, objects without pixel data, other SOP classes)."""
    if "PixelData" not in ds:
        return None
    sop_class = ds.get("SOPClassUID")
    if sop_class is not None and sop_class != CTImageStorage and sop_class not in _ENHANCED_CT:
        return None
    if sop_class is None and ds.get("Modality") != "CT":
        return None
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if _LOCALIZER in image_type:
        return None
    return "enhanced" if sop_class in _ENHANCED_CT else "single"


def _group_value(groups: Sequence[pydicom.Dataset | None], keyword: str) -> Any:
    """An attribute from the first functional group (per-frame, then shared) holding it."""
    sequence = _GROUP_OF[keyword]
    for group in groups:
        items = None if group is None else group.get(sequence)
        if items:
            value = items[0].get(keyword)
            if value is not None and value != "":
                return value
    return None


def _int_attribute(ds: pydicom.Dataset, keyword: str, default: int, label: str) -> int:
    """An integer attribute of the object, ``default`` when absent."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PreprocessError(f"{label} has a malformed {keyword}") from None


def _frame_header(
    ds: pydicom.Dataset,
    path: Path,
    frame: int | None,
    lookup: Callable[[str], Any],
    label: str,
) -> _Frame:
    """Reads and checks the geometry and rescale attributes of one slice.

    Args:
        ds: The object.
        path: Its file.
        frame: Frame index (multi-frame objects) or None.
        lookup: Returns an attribute's value for this slice, None when absent.
        label: How messages name the slice ("image 3", "frame 2 of image 1").
    """
    values = []
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        value = lookup(keyword)
        if value is None or value == "":
            raise PreprocessError(f"{label} lacks {keyword}")
        values.append(value)
    rows = _int_attribute(ds, "Rows", 0, label)
    columns = _int_attribute(ds, "Columns", 0, label)
    if rows <= 0 or columns <= 0:
        raise PreprocessError(f"{label} lacks a positive Rows/Columns")
    try:
        position, orientation, spacing = (np.asarray(v, dtype=np.float64) for v in values)
    except (TypeError, ValueError):
        raise PreprocessError(f"{label} has a malformed geometry attribute") from None
    if position.shape != (3,) or not np.all(np.isfinite(position)):
        raise PreprocessError(f"{label}: ImagePositionPatient must hold 3 numbers")
    if orientation.shape != (6,) or not np.all(np.isfinite(orientation)):
        raise PreprocessError(f"{label}: ImageOrientationPatient must hold 6 numbers")
    if spacing.shape != (2,) or not np.all(spacing > 0):
        raise PreprocessError(f"{label}: PixelSpacing must hold 2 positive numbers")
    slope_value, intercept_value = lookup("RescaleSlope"), lookup("RescaleIntercept")
    try:
        slope = 1.0 if slope_value in (None, "") else float(slope_value)
        intercept = 0.0 if intercept_value in (None, "") else float(intercept_value)
    except (TypeError, ValueError):
        raise PreprocessError(f"{label} has a malformed RescaleSlope/Intercept") from None
    if not (math.isfinite(slope) and math.isfinite(intercept) and slope != 0):
        raise PreprocessError(f"{label} has an unusable RescaleSlope/Intercept")
    try:
        thickness: float | None = float(lookup("SliceThickness"))
    except (TypeError, ValueError):
        thickness = None
    if thickness is not None and not (math.isfinite(thickness) and thickness > 0):
        thickness = None
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return _Frame(
        dataset=ds,
        path=path,
        frame=frame,
        position=position,
        orientation=orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=rows,
        columns=columns,
        slope=slope,
        intercept=intercept,
        thickness=thickness,
        gdcm=frame is None and syntax in _GDCM_SYNTAXES,
    )


def _frames_of(
    ds: pydicom.Dataset, path: Path, kind: Literal["single", "enhanced"], index: int
) -> list[_Frame]:
    """The image slices of one object: itself, or its non-localizer frames."""
    label = f"image {index + 1}"
    if _int_attribute(ds, "SamplesPerPixel", 1, label) != 1:
        raise PreprocessError(f"{label}: SamplesPerPixel must be 1 for CT")
    n_frames = _int_attribute(ds, "NumberOfFrames", 1, label)
    if kind == "single":
        if n_frames != 1:
            raise PreprocessError(
                f"{label}: a CT Image Storage object must hold one frame, not {n_frames}"
            )
        return [_frame_header(ds, path, None, ds.get, label)]
    if n_frames < 1:
        raise PreprocessError(f"{label}: NumberOfFrames must be at least 1")
    shared_items = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_items[0] if shared_items else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n_frames:
        raise PreprocessError(
            f"{label}: {len(per_frame)} per-frame functional groups for {n_frames} frames"
        )
    frames = []
    for f in range(n_frames):
        groups = (per_frame[f] if per_frame else None, shared)

        def lookup(keyword: str, groups: tuple[Any, ...] = groups) -> Any:
            value = _group_value(groups, keyword)
            return ds.get(keyword) if value is None else value

        frame_type = [str(v).upper() for v in (_group_value(groups, "FrameType") or [])]
        if _LOCALIZER in frame_type:
            continue
        frames.append(_frame_header(ds, path, f, lookup, f"frame {f + 1} of {label}"))
    return frames


def _check_consistent(slices: Sequence[_Frame]) -> tuple[np.ndarray, np.ndarray]:
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


def _stack_geometry(
    positions: np.ndarray,
    normal: np.ndarray,
    *,
    thickness: float | None,
    max_tilt_deg: float,
    min_coverage_mm: float | None,
) -> _Stack:
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
        return _Stack(normal, np.zeros(1), thickness or 1.0, 1, 0.0, coverage)
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
    return _Stack(u, t, spacing, n_out, tilt, coverage)


def _check_coverage(coverage: float, min_coverage_mm: float | None, n: int) -> None:
    """Raises ``IncompleteSeriesError`` when the coverage is below the minimum."""
    if min_coverage_mm is not None and coverage < min_coverage_mm:
        raise IncompleteSeriesError(
            f"the series covers {coverage:.1f} mm along the slice normal with {n} slice(s); "
            f"at least {min_coverage_mm:g} mm are needed"
        )


# --------------------------------------------------------------------------------------------
# Loading: pixel data


def _gdcm_series(run: Sequence[_Frame], block: np.ndarray) -> bool:
    """Decodes single-frame files into ``block`` (float32 (len(run), rows, columns)) in HU,
    clipped at ``HU_AIR``, with GDCM: SimpleITK's ``ImageSeriesReader``, in the order given.

    GDCM applies each file's RescaleSlope/Intercept in float64 and the reader casts to
    float32, so values round once, as in ``_decode_pydicom``.

    Returns:
        False when GDCM cannot read a file or reads another shape (then each slice is decoded
        on its own).
    """
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(item.path) for item in run])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.SetSpacingWarningRelThreshold(1e9)  # geometry is checked here, not by the reader
    try:
        image = reader.Execute()  # releases the GIL while it reads and decodes
    except RuntimeError:
        return False
    if image.GetNumberOfComponentsPerPixel() != 1:
        return False
    view = sitk.GetArrayViewFromImage(image)  # valid while ``image`` lives
    if view.shape != block.shape:
        return False
    np.maximum(view, np.float32(HU_AIR), out=block)  # copies and clips in one pass
    return True


def _gdcm_file(item: _Frame, out: np.ndarray) -> bool:
    """Decodes one single-frame file into ``out`` (float32 (rows, columns)) in HU, clipped at
    ``HU_AIR``, with GDCM.

    Returns:
        False when GDCM cannot read the file or reads another shape.
    """
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(item.path))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError:
        return False
    view = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1 or view.size != out.size:
        return False
    np.maximum(view.reshape(out.shape), np.float32(HU_AIR), out=out)
    return True


def _decode_pydicom(item: _Frame, index: int, out: np.ndarray) -> None:
    """Decodes one slice into ``out`` in HU with pydicom: stored × slope + intercept, computed
    in float64 (exactly in float32 where that is exact) and rounded once to float32."""
    ds = item.dataset
    try:
        stored = pixel_array(ds) if item.frame is None else pixel_array(ds, index=item.frame)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise PreprocessError(
            f"pixel data of sorted slice {index} cannot be decoded ({name}, {type(exc).__name__})"
        ) from None
    if stored.shape != out.shape:
        raise PreprocessError(f"pixel data of sorted slice {index} does not match Rows/Columns")
    if item.slope == 1.0 and item.intercept.is_integer():
        out[...] = stored  # exact in float32: |stored + intercept| < 2**24
        if item.intercept != 0.0:
            out += np.float32(item.intercept)
    else:
        np.copyto(out, stored * item.slope + item.intercept, casting="same_kind")


def _clear_padding(item: _Frame, out: np.ndarray) -> None:
    """Sets pixels of PixelPaddingValue to ``HU_AIR``, in place (HU at or below ``HU_AIR``
    are clipped anyway, before or after: the order does not matter)."""
    padding = item.dataset.get("PixelPaddingValue")
    if isinstance(padding, int):
        padding_hu = padding * item.slope + item.intercept
        if padding_hu > HU_AIR:
            out[out == np.float32(padding_hu)] = HU_AIR


def _decode_run(run: Sequence[_Frame], first: int, block: np.ndarray, decoder: Decoder) -> None:
    """Decodes sorted slices ``first``, ``first + 1``, … into ``block`` (one array per slice
    along axis 0) in HU.

    With ``decoder="gdcm"``, slices that GDCM may decode (``_Frame.gdcm``) go to GDCM, as one
    series read when the whole run may; the others, and slices GDCM cannot read, go to pydicom.
    """
    use_gdcm = decoder == "gdcm"
    if use_gdcm and len(run) > 1 and all(i.gdcm for i in run) and _gdcm_series(run, block):
        for item, out in zip(run, block, strict=True):
            _clear_padding(item, out)
        return
    for j, item in enumerate(run):
        if not (use_gdcm and item.gdcm and _gdcm_file(item, block[j])):
            _decode_pydicom(item, first + j, block[j])
            np.maximum(block[j], np.float32(HU_AIR), out=block[j])
        _clear_padding(item, block[j])


def _default_workers() -> int:
    """Decoding threads: the CPUs this process may use, at most ``_MAX_WORKERS``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_WORKERS))


def _decode_into(
    slices: Sequence[_Frame],
    dest: np.ndarray,
    rows: np.ndarray,
    decoder: Decoder,
    pool: ThreadPoolExecutor | None,
) -> None:
    """Decodes sorted slice k into ``dest[rows[k]]`` (float32 HU), several at a time.

    Runs of up to ``_CHUNK_SLICES`` single-frame files bound for consecutive rows are one task
    each, run in ``pool`` (here, one after another, without one); frames of multi-frame objects
    (one shared dataset each) are decoded one after another in this thread meanwhile.
    """
    runs: list[tuple[int, int]] = []  # [a, b) ranges of sorted slices decoded by one task
    serial: list[int] = []
    k = 0
    while k < len(slices):
        if slices[k].frame is not None:
            serial.append(k)
            k += 1
            continue
        b = k + 1
        while (
            b < len(slices)
            and b - k < _CHUNK_SLICES
            and slices[b].frame is None
            and rows[b] == rows[b - 1] + 1
        ):
            b += 1
        runs.append((k, b))
        k = b

    def run_task(a: int, b: int) -> None:
        _decode_run(slices[a:b], a, dest[rows[a] : rows[a] + (b - a)], decoder)

    def serial_tasks() -> None:
        for k in serial:
            _decode_run(slices[k : k + 1], k, dest[rows[k] : rows[k] + 1], decoder)

    if pool is None or len(runs) <= 1:
        for a, b in runs:
            run_task(a, b)
        serial_tasks()
        return
    for k in serial:  # load each object's pixel data once, before any concurrent access
        _ = slices[k].dataset.PixelData
    futures: list[Future[None]] = [pool.submit(run_task, a, b) for a, b in runs]
    try:
        serial_tasks()
        for future in futures:
            future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def _blend(lower: np.ndarray, upper: np.ndarray, w: float, out: np.ndarray) -> None:
    """out = (1 - w) × lower + w × upper, for float32 slices of one shape."""
    np.multiply(lower, np.float32(1.0 - w), out=out)
    out += np.float32(w) * upper


def _decode_onto_grid(
    slices: Sequence[_Frame], stack: _Stack, decoder: Decoder, pool: ThreadPoolExecutor | None
) -> np.ndarray:
    """Decodes the sorted slices onto a regular grid along the stacking axis, in HU.

    Source slices that sit on grid positions are decoded straight into place; grid positions
    between them (missing slices) are interpolated linearly. Uneven slices that do not sit on
    the grid are decoded first and then interpolated.

    Args:
        slices: Sorted slices (n of them).
        stack: Their offsets along the stacking axis and the grid.
        decoder: See ``load_ct_series``.
        pool: Decoding threads; None decodes in this thread.

    Returns:
        float32 (n_out, rows, columns) HU.
    """
    t, spacing, n_out = stack.t, stack.spacing, stack.n_out
    shape = (slices[0].rows, slices[0].columns)
    slots = np.rint(t / spacing).astype(np.int64)
    on_grid = np.all(np.abs(t - slots * spacing) <= _REGULAR_TOL * spacing)
    if on_grid and len(np.unique(slots)) == len(slots):
        out = np.empty((n_out, *shape), dtype=np.float32)
        _decode_into(slices, out, slots, decoder, pool)
        for a, b in zip(slots[:-1], slots[1:], strict=True):
            for j in range(a + 1, b):
                _blend(out[a], out[b], (j - a) / (b - a), out[j])
        return out

    source = np.empty((len(slices), *shape), dtype=np.float32)
    _decode_into(slices, source, np.arange(len(slices)), decoder, pool)
    out = np.empty((n_out, *shape), dtype=np.float32)
    grid = np.arange(n_out) * spacing
    below = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 2)
    for j, (k, tj) in enumerate(zip(below, grid, strict=True)):
        _blend(source[k], source[k + 1], float((tj - t[k]) / (t[k + 1] - t[k])), out[j])
    return out


def load_ct_series(
    paths: Sequence[Path],
    *,
    min_slices: int = MIN_SLICES,
    max_tilt_deg: float = MAX_TILT_DEG,
    min_coverage_mm: float | None = None,
    decoder: Decoder = "gdcm",
    workers: int | None = None,
) -> CTSeriesVolume:
    """Loads one CT series into a float32 HU image with its DICOM geometry.

    Files that are not DICOM, objects without pixel data, non-CT objects and localizers
    (ImageType, or an enhanced frame's FrameType, containing LOCALIZER) are ignored. The
    remaining slices (single-frame objects and frames of Enhanced CT objects) must belong to one
    series, share size and orientation (parallel slices), have distinct positions on one
    straight line, a gantry tilt of at most ``max_tilt_deg`` and no gap above
    ``MAX_GAP_RATIO`` × the median spacing. HU are ``stored × RescaleSlope + RescaleIntercept``
    per slice (per frame for Enhanced CT, from its Pixel Value Transformation group).

    Args:
        paths: DICOM files of the series, in any order.
        min_slices: Fewest image slices accepted (at least 1).
        max_tilt_deg: Largest gantry tilt corrected, degrees in [0, 90).
        min_coverage_mm: Least coverage along the slice normal (extent of the slice centres
            plus one spacing) accepted; None accepts any.
        decoder: ``"gdcm"``: GDCM through SimpleITK for single-frame JPEG Lossless files,
            pydicom for the rest (see the module docstring); ``"pydicom"``: pydicom for all.
            Both give the same HU on lossless data.
        workers: Decoding threads; None: the CPUs available (at most 8).

    Returns:
        The series as a ``CTSeriesVolume`` (see there for the image's geometry and values).

    Raises:
        IncompleteSeriesError: Fewer than ``min_slices`` slices, a gap of missing slices, or
            less coverage than ``min_coverage_mm``.
        GantryTiltError: The gantry tilt is above ``max_tilt_deg``.
        PreprocessError: Otherwise the files do not form one usable CT series; the message
            says why.
        ValueError: An argument is out of range.
    """
    if min_slices < 1:
        raise ValueError(f"min_slices must be at least 1, got {min_slices}")
    if not 0.0 <= max_tilt_deg < 90.0:
        raise ValueError(f"max_tilt_deg must lie in [0, 90), got {max_tilt_deg}")
    if min_coverage_mm is not None and not min_coverage_mm >= 0:
        raise ValueError(f"min_coverage_mm must be >= 0, got {min_coverage_mm}")
    if decoder not in ("gdcm", "pydicom"):
        raise ValueError(f"decoder must be 'gdcm' or 'pydicom', got {decoder!r}")
    n_workers = _default_workers() if workers is None else workers
    if n_workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    total = len(paths)
    if total == 0:
        raise PreprocessError("no files given")
    images: list[tuple[Path, pydicom.Dataset, Literal["single", "enhanced"]]] = []
    for i, p in enumerate(paths):
        ds = _read(Path(p), i, total)
        kind = None if ds is None else _image_kind(ds)
        if ds is not None and kind is not None:
            images.append((Path(p), ds, kind))
    if not images:
        raise PreprocessError(f"none of the {total} files is a CT image")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds, _ in images}
    if len(series_uids) > 1:
        raise PreprocessError(
            f"the files hold {len(series_uids)} series; pass the files of one series"
        )
    slices = [
        item for i, (path, ds, kind) in enumerate(images) for item in _frames_of(ds, path, kind, i)
    ]
    if len(slices) < min_slices:
        raise IncompleteSeriesError(
            f"the series has {len(slices)} image slice(s); at least {min_slices} are needed"
        )
    row, col = _check_consistent(slices)
    normal = np.cross(row, col)
    slices.sort(key=lambda s: float(s.position @ normal))
    positions = np.stack([s.position for s in slices])
    stack = _stack_geometry(
        positions,
        normal,
        thickness=slices[0].thickness,
        max_tilt_deg=max_tilt_deg,
        min_coverage_mm=min_coverage_mm,
    )

    rows, columns = slices[0].rows, slices[0].columns
    with (
        ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="ct-decode")
        if n_workers > 1
        else contextlib.nullcontext()
    ) as pool:
        # A pool thread allocates (and zero-fills) the image while the others decode.
        blank = (
            None
            if pool is None or _copy_into_image is None
            else pool.submit(sitk.Image, [columns, rows, stack.n_out], sitk.sitkFloat32)
        )
        hu = _decode_onto_grid(slices, stack, decoder, pool)
        if blank is None or _copy_into_image is None:
            image = sitk.GetImageFromArray(hu)
        else:
            image = blank.result()
            _copy_into_image(hu, image)
    del hu

    row_spacing, col_spacing = slices[0].pixel_spacing
    image.SetSpacing((col_spacing, row_spacing, stack.spacing))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetDirection(tuple(float(v) for v in np.stack([row, col, stack.u], axis=1).ravel()))
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
        gantry_tilt_deg=stack.tilt_deg,
        coverage_mm=stack.coverage_mm,
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


def prepare_head_ct(
    paths: Sequence[Path],
    spacing_mm: float = 1.0,
    *,
    min_coverage_mm: float | None = HEAD_MIN_COVERAGE_MM,
    max_tilt_deg: float = MAX_TILT_DEG,
    workers: int | None = None,
) -> HeadCT:
    """Loads a head-CT series, resamples it to isotropic voxels and crops it to the head.

    Args:
        paths: DICOM files of one CT series, in any order.
        spacing_mm: Output voxel size in mm.
        min_coverage_mm: Least coverage along the slice normal (see ``HEAD_MIN_COVERAGE_MM``);
            None accepts any.
        max_tilt_deg: Largest gantry tilt corrected, degrees.
        workers: Decoding threads; None: the CPUs available.

    Returns:
        The ``HeadCT`` (float32 HU (z, y, x) at ``spacing_mm``, with head mask and crop offset).

    Raises:
        IncompleteSeriesError: Fewer than ``MIN_SLICES`` slices, missing slices beyond one in a
            row, or less coverage than ``min_coverage_mm``.
        GantryTiltError: The gantry tilt is above ``max_tilt_deg``.
        PreprocessError: Otherwise the series is unusable or holds no head; the message says
            why.
    """
    volume = load_ct_series(
        paths, min_coverage_mm=min_coverage_mm, max_tilt_deg=max_tilt_deg, workers=workers
    )
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
    """Head-CT display windows as (level, width) in HU.

    * ``brain`` L 40 / W 80: the standard brain window.
    * ``subdural`` L 75 / W 215: the middle of the common subdural ranges L 50–100 /
      W 130–300 (Radiopaedia, "Windowing (CT)").
    * ``stroke`` L 40 / W 40: the "stroke window" of Turner and Holdsworth, Br J Radiol
      2011;84:1061–1066, also listed by Radiopaedia. The narrower L 32 / W 8 (Radiology
      1999;213:150–155) was a starting point for manual adjustment, too narrow for a fixed
      model input.
    * ``bone`` L 600 / W 2800: the temporal-bone (skull) window listed by Radiopaedia; the
      general bone window L 500 / W 2000 clips dense skull cortex above 1500 HU.
    """

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
