"""Head-CT preprocessing: one DICOM series → a 1 mm isotropic HU volume of the head.

The pipeline is ``load_ct_series`` → ``resample_isotropic`` → ``head_mask`` → ``crop_to_head``;
``prepare_head_ct`` runs all four. Window presets and the ``ClipAndScaleHU`` transforms turn HU
into model input. This module puts the steps together and is where callers import them from;
each job lives in its own module:

* ``ct_headers``: files → image slices with geometry and rescale (single-frame CT Image Storage
  objects, and the frames of Enhanced CT and Legacy Converted Enhanced CT objects, placed by
  their functional groups; one series may mix both);
* ``ct_geometry``: slices checked against each other, sorted along the slice normal, gantry tilt,
  gaps and coverage, the regular grid along the stacking line;
* ``ct_streams``: every compressed frame checked for its end before decoding;
* ``ct_decode``: pixel data → HU on the grid (GDCM for single-frame JPEG Lossless, pydicom for
  the rest, on threads), missing slices interpolated;
* ``resample``, ``head``, ``intensity``: isotropic resampling, head mask and crop, windows.

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

Damaged pixel data: a slice whose compressed stream is cut short (JPEG-family decoders fill such
a stream without an error), cannot be decoded or decodes to another size raises
``CorruptSliceError`` for the whole series, never a volume (see ``ct_streams``).

Error messages never contain patient data: they name attributes, counts, slice indices (in
sorted order or in the order given) and geometry only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import SimpleITK as sitk

from triage.preprocess.ct_decode import Decoder, decode_to_image, default_workers
from triage.preprocess.ct_geometry import (
    MAX_GAP_RATIO,
    MAX_TILT_DEG,
    sort_along_normal,
    stack_geometry,
)
from triage.preprocess.ct_headers import read_slices
from triage.preprocess.errors import (
    CorruptSliceError,
    GantryTiltError,
    IncompleteSeriesError,
    PreprocessError,
)
from triage.preprocess.head import crop_to_head, head_mask
from triage.preprocess.hu import HU_AIR
from triage.preprocess.intensity import IMAGE_KEY, ClipAndScaleHU, ClipAndScaleHUd, WindowPreset
from triage.preprocess.resample import resample_isotropic

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
    "CorruptSliceError",
    "Decoder",
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

MIN_SLICES: Final[int] = 8
"""Default fewest image slices (frames) of ``load_ct_series``: what the haemorrhage model needs.

Loading itself works from one slice (``min_slices=1``)."""

HEAD_MIN_COVERAGE_MM: Final[float] = 90.0
"""Default least coverage along the slice normal for ``prepare_head_ct``, in mm.

A whole adult head CT (skull base to vertex) covers about 120–180 mm; 90 mm is the same limit
as the haemorrhage model's series rule used for routing (``BLAST_CT_V1``), so a series that
routing accepts is not refused here. Coverage is measured as in routing: the extent of the
slice centres along the normal plus one slice spacing."""


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

    @property
    def hu_origin(self) -> tuple[float, float, float]:
        """LPS position in mm, (x, y, z), of the centre of voxel ``hu[0, 0, 0]``; with
        ``resampled``'s spacing and direction it places ``hu`` (and any mask on its grid) in
        patient space."""
        z, y, x = self.crop_start
        point = self.resampled.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        return float(point[0]), float(point[1]), float(point[2])


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
            pydicom for the rest (see ``ct_decode``); ``"pydicom"``: pydicom for all.
            Both give the same HU on lossless data.
        workers: Decoding threads; None: the CPUs available (at most 8).

    Returns:
        The series as a ``CTSeriesVolume`` (see there for the image's geometry and values).

    Raises:
        IncompleteSeriesError: Fewer than ``min_slices`` slices, a gap of missing slices, or
            less coverage than ``min_coverage_mm``.
        CorruptSliceError: Slices whose pixel data is cut short, cannot be decoded or decodes
            to another size than Rows × Columns (the message names their sorted indices).
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
    n_workers = default_workers() if workers is None else workers
    if n_workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    slices = read_slices(paths)
    if len(slices) < min_slices:
        raise IncompleteSeriesError(
            f"the series has {len(slices)} image slice(s); at least {min_slices} are needed"
        )
    row, col, normal = sort_along_normal(slices)
    positions = np.stack([s.position for s in slices])
    stack = stack_geometry(
        positions,
        normal,
        thickness=slices[0].thickness,
        max_tilt_deg=max_tilt_deg,
        min_coverage_mm=min_coverage_mm,
    )
    image = decode_to_image(slices, stack, decoder, n_workers)

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
        CorruptSliceError: Slices whose pixel data is cut short or cannot be decoded.
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
