"""CT series headers: DICOM files → the image slices of one series, each with its geometry and
rescale (no pixel data decoded).

Single-frame CT Image Storage objects give one slice each; Enhanced CT and Legacy Converted
Enhanced CT objects give one slice per non-localizer frame, placed by their functional groups
(per-frame groups first, shared groups as fallback). Files that are not DICOM, objects without
pixel data, non-CT objects and localizers are left out.

Error messages never contain patient data: they name attributes, counts and the position of an
object in the list of files given ("file 3 of 40", "image 2", "frame 4 of image 1").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

from triage.preprocess.errors import PreprocessError

__all__ = ["Frame", "image_slices", "read_headers", "read_slices"]

_DEFER_BYTES: Final[int] = 64 * 1024  # larger values (native pixel data) stay on disk until used
_LOCALIZER: Final[str] = "LOCALIZER"
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
class Frame:
    """Header facts of one image slice: a single-frame object or one frame of a multi-frame one.

    Attributes:
        dataset: The object (native pixel data possibly still on disk: read with
            ``defer_size``; encapsulated pixel data is read with the header).
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
        transfer_syntax: The object's TransferSyntaxUID, None when its file meta lacks one.
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
    transfer_syntax: str | None


def _read(
    path: Path, index: int, total: int, *, headers_only: bool = False
) -> pydicom.Dataset | None:
    """Reads one file's header (native pixel data deferred, or not read at all with
    ``headers_only``); None for files that are not DICOM."""
    try:
        if headers_only:
            return pydicom.dcmread(path, stop_before_pixels=True)
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except InvalidDicomError:
        return None
    except Exception as exc:
        raise PreprocessError(
            f"file {index + 1} of {total} cannot be read as DICOM ({type(exc).__name__})"
        ) from None


def _image_kind(
    ds: pydicom.Dataset, *, headers_only: bool = False
) -> Literal["single", "enhanced"] | None:
    """'single' for a CT Image slice, 'enhanced' for an (Legacy Converted) Enhanced CT object,
    None for anything else (localizers, objects without pixel data, other SOP classes). With
    ``headers_only`` (read before the pixel data) the pixel data is not looked for: the SOP
    classes accepted require it."""
    if not headers_only and "PixelData" not in ds:
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
) -> Frame:
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
    return Frame(
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
        transfer_syntax=None if syntax is None else str(syntax),
    )


def _frames_of(
    ds: pydicom.Dataset, path: Path, kind: Literal["single", "enhanced"], index: int
) -> list[Frame]:
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


def _read_images(
    paths: Sequence[Path], *, headers_only: bool = False
) -> list[tuple[Path, pydicom.Dataset, Literal["single", "enhanced"]]]:
    """The CT image objects among the files, in the order given, checked to be one series."""
    total = len(paths)
    if total == 0:
        raise PreprocessError("no files given")
    images: list[tuple[Path, pydicom.Dataset, Literal["single", "enhanced"]]] = []
    for i, p in enumerate(paths):
        ds = _read(Path(p), i, total, headers_only=headers_only)
        kind = None if ds is None else _image_kind(ds, headers_only=headers_only)
        if ds is not None and kind is not None:
            images.append((Path(p), ds, kind))
    if not images:
        raise PreprocessError(f"none of the {total} files is a CT image")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds, _ in images}
    if len(series_uids) > 1:
        raise PreprocessError(
            f"the files hold {len(series_uids)} series; pass the files of one series"
        )
    return images


def read_slices(paths: Sequence[Path]) -> list[Frame]:
    """Reads the headers of one series' files and lists its image slices, in the order given.

    Args:
        paths: DICOM files of one CT series, in any order.

    Returns:
        The slices: single-frame CT objects and the non-localizer frames of Enhanced CT
        objects (not sorted, not checked against each other).

    Raises:
        PreprocessError: No files, a file that cannot be read, none that is a CT image, files
            of several series, or a slice whose geometry or rescale attributes are unusable.
    """
    return [
        item
        for i, (path, ds, kind) in enumerate(_read_images(paths))
        for item in _frames_of(ds, path, kind, i)
    ]


def read_headers(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    """Reads the headers (up to the pixel data, which stays unread) of one series' CT images.

    The same objects as :func:`read_slices` reads, for work on the series' geometry and
    identity only (mapping results back onto the images, DICOM outputs that reference them).

    Args:
        paths: DICOM files of one CT series, in any order.

    Returns:
        The CT image objects (single-frame or enhanced, localizers left out), in the order
        given; their slices come from :func:`image_slices`.

    Raises:
        PreprocessError: No files, a file that cannot be read, none that is a CT image, or
            files of several series.
    """
    return [ds for _, ds, _ in _read_images(paths, headers_only=True)]


def image_slices(ds: pydicom.Dataset, index: int = 0) -> list[Frame]:
    """The image slices of one CT image object already read (its header is enough).

    Args:
        ds: A CT Image, Enhanced CT or Legacy Converted Enhanced CT object.
        index: Its position in the list of objects, for messages ("image 3").

    Returns:
        The object as one slice, or its non-localizer frames (``Frame.frame`` = 0-based frame
        index); [] for an object that is not a CT image or is a localizer.

    Raises:
        PreprocessError: A slice's geometry or rescale attributes are unusable.
    """
    kind = _image_kind(ds, headers_only=True)
    if kind is None:
        return []
    path = Path(str(getattr(ds, "filename", None) or ""))
    return _frames_of(ds, path, kind, index)
