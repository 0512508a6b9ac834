"""X-ray (CR, DX) preprocessing: one radiograph file → a model input in presentation grey scale.

The pipeline is ``load_radiograph`` → ``ResizeWithAspect`` → ``check_xray_input``;
``prepare_radiograph`` runs all three.

Intensity conventions (``XRayImage.pixels``):

* The stored values (pydicom masks bits above BitsStored and sign-extends signed data) go
  through pydicom's Modality LUT (``apply_modality_lut``: Modality LUT Sequence or
  RescaleSlope/Intercept), then the VOI transform: the first VOI LUT Sequence item
  (``apply_voi``) when present, else the first WindowCenter/WindowWidth pair with the
  VOILUTFunction (``apply_windowing``). The VOI output range is mapped linearly onto [0, 1]:
  for a window, the range pydicom maps the window onto; for a VOI LUT, the range of the LUT's
  entries (robust to LUT Descriptors that overstate the bit depth).
* With neither a VOI LUT nor a usable window, a window is taken from the data:
  ``DATA_WINDOW_PERCENTILES`` of the pixels inside the exposed field, which excludes
  PixelPaddingValue (and PixelPaddingRangeLimit) pixels and every pixel at the image's exact
  lowest or highest value (flat collimator shutters, burned-out background, saturation).
* MONOCHROME1 is inverted (1 − value) so that 1 is the brightest grey on display and bone or
  other high attenuation is bright in both photometric interpretations. For DX the standard
  ties PresentationLUTShape INVERSE to MONOCHROME1, so it is not applied a second time.

Geometry conventions: arrays are indexed (row, column); ``ResizeWithAspect`` scales the image so
that it fits the model's input, keeps its aspect ratio and pads symmetrically with 0 (black);
``ResizeGeometry`` maps points between the original image and the model input using pixel
centres (the half-pixel convention of ``align_corners=False``).

Error messages never contain patient data or file paths: they name attributes, codes, counts
and shapes only.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Pad, Resize, Transform
from monai.utils import convert_to_dst_type
from monai.utils.enums import TransformBackends
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, pixel_array
from pydicom.uid import (
    DigitalIntraOralXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForProcessing,
)

from triage.preprocess.ct_streams import object_stream_problem
from triage.preprocess.errors import CorruptSliceError, InputContractError, PreprocessError
from triage.preprocess.intensity import IMAGE_KEY
from triage.preprocess.views import view_position

__all__ = [
    "DATA_WINDOW_PERCENTILES",
    "FallbackWindow",
    "RADIOGRAPH_MODALITIES",
    "InputContractError",
    "ResizeGeometry",
    "ResizeWithAspect",
    "ResizeWithAspectd",
    "SpacingSource",
    "VOISource",
    "XRayImage",
    "XRayInput",
    "check_xray_input",
    "load_radiograph",
    "prepare_radiograph",
]

RADIOGRAPH_MODALITIES: Final[frozenset[str]] = frozenset({"CR", "DX"})
"""Modality values accepted by ``load_radiograph``."""

DATA_WINDOW_PERCENTILES: Final[tuple[float, float]] = (0.5, 99.5)
"""Percentiles of the exposed field used as the window when the file has no VOI transform."""

SpacingSource = Literal[
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor",
]
"""Where ``pixel_spacing_mm`` came from; the last is ImagerPixelSpacing divided by the factor."""

VOISource = Literal["VOILUTSequence", "window", "data", "bits"]
"""Which VOI transform made the presentation values (``data``: ``DATA_WINDOW_PERCENTILES``;
``bits``: the whole stored range, 0 .. 2**BitsStored - 1 through the Modality LUT)."""

FallbackWindow = Literal["data", "bits"]
"""What stands in for a missing VOI transform: a window from the data, or the stored range."""

_MONOCHROME: Final[frozenset[str]] = frozenset({"MONOCHROME1", "MONOCHROME2"})
_FOR_PROCESSING_SOP: Final[frozenset[str]] = frozenset(
    {
        DigitalXRayImageStorageForProcessing,
        DigitalMammographyXRayImageStorageForProcessing,
        DigitalIntraOralXRayImageStorageForProcessing,
    }
)

_LATERALITIES: Final[frozenset[str]] = frozenset({"L", "R", "B", "U"})


@dataclass(frozen=True, eq=False)
class XRayImage:
    """One radiograph in presentation grey scale, at its original resolution.

    Attributes:
        pixels: float32 (rows, columns) in [0, 1], 1 = brightest on display (bone bright);
            see the module docstring for the Modality LUT, VOI and MONOCHROME1 steps.
        pixel_spacing_mm: (row, column) spacing in mm, or None when the file holds no valid
            spacing (absent, not two positive finite numbers, e.g. ``0\\0``).
        spacing_source: The attribute the spacing came from; None when it is None.
        view_position: Normalised view: a ViewPosition defined term (AP, PA, LL, RL, RLD, LLD,
            RLO, LLO) or LATERAL (side not stated), from ViewPosition, else ViewCodeSequence,
            else words in SeriesDescription; None when unknown or ambiguous.
        laterality: ImageLaterality, else Laterality: L, R, B or U; None when absent.
        body_part: BodyPartExamined (upper case), or None.
        photometric: PhotometricInterpretation of the file (MONOCHROME1 or MONOCHROME2).
        bits_stored: BitsStored of the file.
        voi_source: The VOI transform used.
        Modality: CR or DX.
        SOPInstanceUID: SOP Instance UID of the file.
        SeriesInstanceUID: Series Instance UID.
        StudyInstanceUID: Study Instance UID.
    """

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    spacing_source: SpacingSource | None
    view_position: str | None
    laterality: str | None
    body_part: str | None
    photometric: str
    bits_stored: int
    voi_source: VOISource
    Modality: str
    SOPInstanceUID: str
    SeriesInstanceUID: str
    StudyInstanceUID: str


@dataclass(frozen=True)
class ResizeGeometry:
    """How ``ResizeWithAspect`` placed an image in the model input.

    Point coordinates are continuous (row, column) with pixel centres at integers:
    ``model = (original + 0.5) * scale - 0.5 + padding_before``.

    Attributes:
        original_shape: (rows, columns) of the input image.
        resized_shape: (rows, columns) after scaling, before padding.
        output_shape: (rows, columns) of the model input.
        scale: (row, column) output pixels per input pixel (equal up to rounding of the sizes).
        padding: ((top, bottom), (left, right)) pixels of padding.
    """

    original_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    output_shape: tuple[int, int]
    scale: tuple[float, float]
    padding: tuple[tuple[int, int], tuple[int, int]]

    def to_model(self, points: np.ndarray) -> np.ndarray:
        """Maps (..., 2) (row, column) points of the original image into the model input."""
        pts = np.asarray(points, dtype=np.float64)
        return (pts + 0.5) * np.asarray(self.scale) - 0.5 + self._before

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Maps (..., 2) (row, column) points of the model input back onto the original image."""
        pts = np.asarray(points, dtype=np.float64)
        return (pts - self._before + 0.5) / np.asarray(self.scale) - 0.5

    @property
    def _before(self) -> np.ndarray:
        return np.array([self.padding[0][0], self.padding[1][0]], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class XRayInput:
    """A radiograph ready for a model, with what is needed to map findings back.

    Attributes:
        image: float32 (1, rows, columns) in [0, 1], presentation grey scale (bone bright),
            aspect kept, padded with 0.
        geometry: Placement of the original image in ``image``.
        pixel_spacing_mm: (row, column) spacing of ``image`` in mm (the original spacing
            divided by the scale), or None when the file holds none.
        spacing_source: Where the original spacing came from, or None.
        view_position: As in ``XRayImage``.
        laterality: As in ``XRayImage``.
        body_part: As in ``XRayImage``.
        photometric: PhotometricInterpretation of the file.
        voi_source: The VOI transform used.
        Modality: CR or DX.
        SOPInstanceUID: SOP Instance UID of the file.
        SeriesInstanceUID: Series Instance UID.
        StudyInstanceUID: Study Instance UID.
    """

    image: np.ndarray
    geometry: ResizeGeometry
    pixel_spacing_mm: tuple[float, float] | None
    spacing_source: SpacingSource | None
    view_position: str | None
    laterality: str | None
    body_part: str | None
    photometric: str
    voi_source: VOISource
    Modality: str
    SOPInstanceUID: str
    SeriesInstanceUID: str
    StudyInstanceUID: str


# --------------------------------------------------------------------------------------------
# Loading


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        raise PreprocessError("file is not DICOM") from None
    except Exception as exc:
        raise PreprocessError(f"file cannot be read as DICOM ({type(exc).__name__})") from None


def _check_header(ds: pydicom.Dataset) -> None:
    """Refuses what ``load_radiograph`` does not handle, naming the attribute."""
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality not in RADIOGRAPH_MODALITIES:
        shown = repr(modality[:16]) if modality else "absent"
        raise PreprocessError(f"modality {shown} is not a radiograph (CR or DX expected)")
    if "PixelData" not in ds:
        raise PreprocessError("the file holds no pixel data (PixelData absent)")
    intent = str(ds.get("PresentationIntentType") or "").strip().upper()
    if ds.get("SOPClassUID") in _FOR_PROCESSING_SOP or intent == "FOR PROCESSING":
        raise PreprocessError("FOR PROCESSING images (raw detector data) are not supported")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError):
        raise PreprocessError("malformed NumberOfFrames or SamplesPerPixel") from None
    if frames != 1:
        raise PreprocessError(f"multi-frame radiographs are not supported ({frames} frames)")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if samples != 1 or photometric not in _MONOCHROME:
        raise PreprocessError(
            f"colour or non-monochrome images are not supported (SamplesPerPixel {samples}, "
            f"PhotometricInterpretation {photometric[:16] or 'absent'!r})"
        )


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    # A cut JPEG-family stream decodes without error into filler rows (see ct_streams).
    problem = object_stream_problem(ds)
    if problem:
        raise CorruptSliceError(f"the radiograph's pixel data is incomplete: {problem}")
    try:
        stored = pixel_array(ds)  # masks bits above BitsStored, sign-extends signed data
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise PreprocessError(
            f"pixel data cannot be decoded ({name}, {type(exc).__name__})"
        ) from None
    if stored.ndim != 2:
        raise PreprocessError(f"decoded pixel data has shape {stored.shape}, expected 2D")
    return stored


def _numbers(value: Any) -> np.ndarray | None:
    """A multi-valued numeric attribute as float64, or None when malformed."""
    if value is None or value == "":
        return None
    try:
        items = (
            list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        )
        return np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _positive_pair(value: Any) -> tuple[float, float] | None:
    arr = _numbers(value)
    if arr is None or arr.shape != (2,) or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        return None
    return float(arr[0]), float(arr[1])


def _spacing(ds: pydicom.Dataset) -> tuple[tuple[float, float] | None, SpacingSource | None]:
    """PixelSpacing, else ImagerPixelSpacing corrected by the magnification factor when given."""
    spacing = _positive_pair(ds.get("PixelSpacing"))
    if spacing is not None:
        return spacing, "PixelSpacing"
    imager = _positive_pair(ds.get("ImagerPixelSpacing"))
    if imager is None:
        return None, None
    factor = _numbers(ds.get("EstimatedRadiographicMagnificationFactor"))
    if factor is not None and factor.shape == (1,) and np.isfinite(factor[0]) and factor[0] > 0:
        f = float(factor[0])
        return (imager[0] / f, imager[1] / f), (
            "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
        )
    return imager, "ImagerPixelSpacing"


def _laterality(ds: pydicom.Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword) or "").strip().upper()
        if value in _LATERALITIES:
            return value
    return None


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and None not in (seq[0].get("LUTDescriptor"), seq[0].get("LUTData"))


def _has_window(ds: pydicom.Dataset) -> bool:
    return all(_numbers(ds.get(k)) is not None for k in ("WindowCenter", "WindowWidth"))


def _voi_lut_presentation(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The first VOI LUT applied, scaled onto [0, 1] by the range of the LUT's entries."""
    if not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values).astype(np.int64)  # LUT inputs are integers
    item = ds.VOILUTSequence[0]
    descriptor = [int(v) for v in item.LUTDescriptor]
    n_entries, first = descriptor[0] or 2**16, descriptor[1]
    if descriptor[2] == 8 and n_entries > 256:
        # pydicom 3.0 keeps LUT indices in the entries' dtype, so indices of an 8-bit LUT with
        # more than 256 entries wrap around; declared as 16-bit the entries read the same (the
        # data is one entry per 16-bit word either way) and the indices do not wrap. ``ds`` is
        # this module's own copy of the file.
        item.LUTDescriptor = [descriptor[0], descriptor[1], 16]
    entries = apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds)
    lo, hi = float(entries.min()), float(entries.max())
    if not hi > lo:
        raise PreprocessError("VOILUTSequence maps every value to the same output")
    out = apply_voi(values, ds).astype(np.float64)
    return (out - lo) / (hi - lo)


def _window_presentation(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """The first window applied, scaled onto [0, 1]; None when the window is unusable."""
    try:
        out = apply_windowing(values, ds)
        with np.errstate(over="ignore"):  # SIGMOID at the probe's extremes
            lo, hi = apply_windowing(np.array([-1e30, 1e30]), ds)
    except (ValueError, TypeError, IndexError):
        return None  # e.g. WindowWidth < 1 for LINEAR, unknown VOILUTFunction
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        return None
    return (out - lo) / (hi - lo)


def _data_window(values: np.ndarray, ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """``DATA_WINDOW_PERCENTILES`` of the exposed field mapped onto [0, 1]."""
    field = np.ones(stored.shape, dtype=bool)
    padding = ds.get("PixelPaddingValue")
    if isinstance(padding, int):
        limit = ds.get("PixelPaddingRangeLimit")
        if isinstance(limit, int):
            field &= ~((stored >= min(padding, limit)) & (stored <= max(padding, limit)))
        else:
            field &= stored != padding
    v = values.astype(np.float64, copy=False)
    inside = v[field]
    if inside.size:
        inside = inside[(inside > inside.min()) & (inside < inside.max())]
    if inside.size == 0:
        inside = v[field] if field.any() else v.ravel()
    lo, hi = (float(p) for p in np.percentile(inside, DATA_WINDOW_PERCENTILES))
    if not hi > lo:
        lo, hi = float(inside.min()), float(inside.max())
    if not hi > lo:
        raise PreprocessError("the image holds a single grey value")
    return (v - lo) / (hi - lo)


def _bits_window(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The whole stored range (BitsStored, signed or not) through the Modality LUT onto [0, 1].

    For unsigned data with no rescale this is ``stored / (2**BitsStored - 1)``: the scaling of
    TorchXRayVision's ``read_xray_dcm``, which its models were trained to expect.
    """
    bits = int(ds.get("BitsStored") or 0)
    if bits < 1:
        raise PreprocessError("BitsStored is missing: the stored range is unknown")
    if int(ds.get("PixelRepresentation") or 0) == 1:
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    else:
        ends = np.array([0, 2**bits - 1], dtype=np.int64)
    lo, hi = sorted(float(v) for v in apply_modality_lut(ends, ds))
    if not hi > lo:
        raise PreprocessError("the Modality LUT maps the stored range onto a single value")
    return (values.astype(np.float64, copy=False) - lo) / (hi - lo)


def _presentation(
    stored: np.ndarray, ds: pydicom.Dataset, photometric: str, fallback: FallbackWindow = "data"
) -> tuple[np.ndarray, VOISource]:
    """Modality LUT, VOI and MONOCHROME1 inversion: float32 in [0, 1], 1 = bright."""
    try:
        values = apply_modality_lut(stored, ds)
    except Exception as exc:
        raise PreprocessError(
            f"the Modality LUT cannot be applied ({type(exc).__name__})"
        ) from None
    out: np.ndarray | None = None
    source: VOISource
    if _has_voi_lut(ds):
        try:
            out, source = _voi_lut_presentation(values, ds), "VOILUTSequence"
        except PreprocessError:
            raise
        except Exception as exc:
            raise PreprocessError(
                f"the VOILUTSequence cannot be applied ({type(exc).__name__})"
            ) from None
    elif _has_window(ds):
        out, source = _window_presentation(values, ds), "window"
    if out is None and fallback == "bits":
        out, source = _bits_window(values, ds), "bits"
    elif out is None:
        out, source = _data_window(values, ds, stored), "data"
    np.clip(out, 0.0, 1.0, out=out)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32), source


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    return str(ds.get(keyword) or "")


def load_radiograph(path: Path, fallback_window: FallbackWindow = "data") -> XRayImage:
    """Reads one CR or DX radiograph into presentation grey scale.

    Args:
        path: A DICOM file (CR, DX, or another SOP class such as Secondary Capture whose
            Modality is CR or DX), single frame, monochrome, any transfer syntax that pydicom
            can decode here.
        fallback_window: With no VOI LUT and no window in the file: ``"data"`` takes a
            window from the pixels (``DATA_WINDOW_PERCENTILES``); ``"bits"`` maps the whole
            stored range onto [0, 1] (what TorchXRayVision's models expect).

    Returns:
        The ``XRayImage``: float32 pixels in [0, 1] with 1 = bright, and the header facts.

    Raises:
        PreprocessError: The file is not DICOM, not CR/DX (the message names the modality),
            FOR PROCESSING, multi-frame, colour, undecodable or holds a single grey value.
    """
    ds = _read(Path(path))
    _check_header(ds)
    stored = _decode(ds)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    pixels, voi_source = _presentation(stored, ds, photometric, fallback_window)
    spacing, spacing_source = _spacing(ds)
    body_part = _text(ds, "BodyPartExamined").strip().upper() or None
    return XRayImage(
        pixels=pixels,
        pixel_spacing_mm=spacing,
        spacing_source=spacing_source,
        view_position=view_position(ds),
        laterality=_laterality(ds),
        body_part=body_part,
        photometric=photometric,
        bits_stored=int(ds.get("BitsStored") or 0),
        voi_source=voi_source,
        Modality=str(ds.Modality).strip().upper(),
        SOPInstanceUID=_text(ds, "SOPInstanceUID"),
        SeriesInstanceUID=_text(ds, "SeriesInstanceUID"),
        StudyInstanceUID=_text(ds, "StudyInstanceUID"),
    )


# --------------------------------------------------------------------------------------------
# Resizing


class ResizeWithAspect(Transform):
    """Scales an image to fit ``size`` with its aspect ratio kept, then pads it symmetrically.

    The longer side (relative to ``size``) fills the output; the other is padded with
    ``pad_value``, the odd pixel going after (bottom, right). Downscaling averages areas (MONAI
    ``Resize`` mode ``area``, anti-aliased); upscaling is bilinear (``align_corners=False``).
    Both are convex combinations, so a [0, 1] image stays in [0, 1] up to float rounding.
    ``geometry`` gives the scale and padding, to map findings back.

    Input: numpy array or torch tensor, channel first (channels, rows, columns).
    Output: float32, (channels, *size); numpy in, numpy out; a tensor in gives a tensor (a
    MetaTensor, with the resize and pad recorded by MONAI, when MONAI tracks metadata).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, size: tuple[int, int], pad_value: float = 0.0) -> None:
        """Sets the output size.

        Args:
            size: (rows, columns) of the output.
            pad_value: Value of the padding (0: black in presentation grey scale).

        Raises:
            ValueError: ``size`` is not two positive integers.
        """
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"size must be two positive integers, got {size}")
        self.size = (int(size[0]), int(size[1]))
        self.pad_value = float(pad_value)

    def geometry(self, spatial_shape: Sequence[int]) -> ResizeGeometry:
        """Where an image of ``spatial_shape`` (rows, columns) lands in the output."""
        if len(spatial_shape) != 2 or not all(int(s) > 0 for s in spatial_shape):
            raise ValueError(f"expected a positive 2D shape, got {tuple(spatial_shape)}")
        h, w = int(spatial_shape[0]), int(spatial_shape[1])
        out_h, out_w = self.size
        s = min(out_h / h, out_w / w)
        new_h = min(out_h, max(1, round(h * s)))
        new_w = min(out_w, max(1, round(w * s)))
        pad_h, pad_w = out_h - new_h, out_w - new_w
        return ResizeGeometry(
            original_shape=(h, w),
            resized_shape=(new_h, new_w),
            output_shape=(out_h, out_w),
            scale=(new_h / h, new_w / w),
            padding=((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)),
        )

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Applies the transform; see the class docstring."""
        if img.ndim != 3:
            raise ValueError(f"expected (channels, rows, columns), got shape {tuple(img.shape)}")
        geo = self.geometry(img.shape[1:])
        out: torch.Tensor = (
            torch.as_tensor(img, dtype=torch.float32)
            if isinstance(img, torch.Tensor)
            else torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        )
        if geo.resized_shape != geo.original_shape:
            down = geo.scale[0] < 1.0 or geo.scale[1] < 1.0
            resize = (
                Resize(geo.resized_shape, mode="area")
                if down
                else Resize(geo.resized_shape, mode="bilinear", align_corners=False)
            )
            out = resize(out)
        if any(p for pair in geo.padding for p in pair):
            to_pad = [(0, 0), *geo.padding]
            pad = Pad(to_pad=to_pad, mode="constant", value=self.pad_value)  # type: ignore[arg-type]
            out = pad(out)
        if isinstance(img, np.ndarray):
            return np.asarray(convert_to_dst_type(out, img, dtype=np.float32)[0])
        return out


class ResizeWithAspectd(MapTransform):
    """Dictionary wrapper of ``ResizeWithAspect``.

    For each key, also stores the ``ResizeGeometry`` under ``f"{key}_{geometry_postfix}"``
    (a dataclass: give the DataLoader a collate function that keeps it, or drop it before
    batching).
    """

    backend = ResizeWithAspect.backend

    def __init__(
        self,
        keys: KeysCollection = IMAGE_KEY,
        *,
        size: tuple[int, int],
        pad_value: float = 0.0,
        geometry_postfix: str = "geometry",
        allow_missing_keys: bool = False,
    ) -> None:
        """Sets the keys and the output size.

        Args:
            keys: Keys of the channel-first images to resize.
            size: (rows, columns) of the output.
            pad_value: Value of the padding.
            geometry_postfix: Postfix of the key that receives each image's geometry.
            allow_missing_keys: Do not fail when a key is absent.
        """
        super().__init__(keys, allow_missing_keys)
        self.transform = ResizeWithAspect(size, pad_value)
        self.geometry_postfix = geometry_postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Returns a shallow copy of ``data`` with the keyed images resized and their geometry."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_{self.geometry_postfix}"] = self.transform.geometry(d[key].shape[1:])
            d[key] = self.transform(d[key])
        return d


# --------------------------------------------------------------------------------------------
# Contract check and the whole path


def check_xray_input(
    array: NdarrayOrTensor,
    *,
    size: tuple[int, int],
    value_range: tuple[float, float] = (0.0, 1.0),
    spacing_mm: tuple[float, float] | None = None,
    spacing_range_mm: tuple[float, float] | None = None,
) -> None:
    """Checks an X-ray model input against the model's contract; raises instead of guessing.

    Args:
        array: numpy array or torch tensor, (1, rows, columns) or a batch (n, 1, rows, columns).
        size: The model's (rows, columns).
        value_range: Inclusive (lowest, highest) value allowed.
        spacing_mm: (row, column) spacing of ``array`` in mm, or None when unknown.
        spacing_range_mm: When given, the inclusive (lowest, highest) spacing the model
            accepts; an unknown spacing is then an error too.

    Raises:
        InputContractError: Wrong type, dtype (float32 required), shape, non-finite values, values
            outside ``value_range``, or spacing unknown or outside ``spacing_range_mm``.
    """
    if isinstance(array, torch.Tensor):
        if array.dtype != torch.float32:
            raise InputContractError(f"input dtype is {array.dtype}, expected float32")
        values = array.detach().cpu().numpy()
    elif isinstance(array, np.ndarray):
        if array.dtype != np.float32:
            raise InputContractError(f"input dtype is {array.dtype}, expected float32")
        values = array
    else:
        raise InputContractError(f"input is a {type(array).__name__}, expected an array or tensor")
    expected = (1, int(size[0]), int(size[1]))
    shape = tuple(values.shape)
    if not (shape == expected or (len(shape) == 4 and shape[1:] == expected)):
        raise InputContractError(f"input shape is {shape}, expected {expected} or (n, *{expected})")
    if values.size == 0:
        raise InputContractError("input is empty")
    finite = np.isfinite(values)
    if not finite.all():
        n_bad = int(values.size - np.count_nonzero(finite))
        raise InputContractError(f"input holds {n_bad} NaN or infinite value(s)")
    lo, hi = float(values.min()), float(values.max())
    if lo < value_range[0] or hi > value_range[1]:
        raise InputContractError(
            f"input values span [{lo:.4g}, {hi:.4g}], outside the allowed "
            f"[{value_range[0]:.4g}, {value_range[1]:.4g}]"
        )
    if spacing_range_mm is not None:
        if spacing_mm is None:
            raise InputContractError("input pixel spacing is unknown; the model needs one")
        s_lo, s_hi = spacing_range_mm
        if not all(np.isfinite(s) and s_lo <= s <= s_hi for s in spacing_mm):
            raise InputContractError(
                f"input pixel spacing ({spacing_mm[0]:.4g}, {spacing_mm[1]:.4g}) mm is outside "
                f"the allowed [{s_lo:.4g}, {s_hi:.4g}] mm"
            )


def prepare_radiograph(path: Path, size: tuple[int, int] = (512, 512)) -> XRayInput:
    """Loads a radiograph and makes the model input: resized with aspect kept, checked.

    Args:
        path: One CR or DX DICOM file.
        size: The model's (rows, columns).

    Returns:
        The ``XRayInput``: float32 (1, *size) in [0, 1], geometry and header facts.

    Raises:
        PreprocessError: The file is unusable (see ``load_radiograph``).
        InputContractError: The result breaks the contract (a bug, not a property of the file).
    """
    radiograph = load_radiograph(path)
    transform = ResizeWithAspect(size)
    geometry = transform.geometry(radiograph.pixels.shape)
    image = np.asarray(transform(radiograph.pixels[None]), dtype=np.float32)
    np.clip(image, 0.0, 1.0, out=image)  # removes float rounding excursions only
    spacing = radiograph.pixel_spacing_mm
    if spacing is not None:
        spacing = (spacing[0] / geometry.scale[0], spacing[1] / geometry.scale[1])
    check_xray_input(image, size=size)
    return XRayInput(
        image=image,
        geometry=geometry,
        pixel_spacing_mm=spacing,
        spacing_source=radiograph.spacing_source,
        view_position=radiograph.view_position,
        laterality=radiograph.laterality,
        body_part=radiograph.body_part,
        photometric=radiograph.photometric,
        voi_source=radiograph.voi_source,
        Modality=radiograph.Modality,
        SOPInstanceUID=radiograph.SOPInstanceUID,
        SeriesInstanceUID=radiograph.SeriesInstanceUID,
        StudyInstanceUID=radiograph.StudyInstanceUID,
    )
