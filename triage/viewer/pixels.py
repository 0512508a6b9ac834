"""One displayed slice's pixel values, as the viewer sends them.

* CT: int16 Hounsfield units. The slice goes through the analysis's own decoding
  (:func:`triage.preprocess.ct_decode.decode_slice`: every compressed frame checked for its
  end first, JPEG Lossless by GDCM, the rest by pydicom, stored × RescaleSlope +
  RescaleIntercept, pixel padding and values below -1024 HU read as -1024), rounded once.
* Radiographs: uint16 stored values (no LUT applied: the manifest's window is on these
  values); a cut-short compressed frame is refused before decoding
  (:func:`triage.preprocess.ct_streams.object_stream_problem`); signed data is clipped at 0.

Bodies are sent little-endian, row-major, gzip-compressed at level 1 (the fastest: a 512²
CT slice compresses to about 45% in about 7 ms).
"""

from __future__ import annotations

import gzip
from typing import Final

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from triage.preprocess.ct_decode import decode_slice
from triage.preprocess.ct_headers import read_slices
from triage.preprocess.ct_streams import object_stream_problem
from triage.preprocess.errors import CorruptSliceError, PreprocessError
from triage.viewer.series import SeriesLayout, SliceRef

__all__ = ["GZIP_LEVEL", "decode_pixels", "gzip_body"]

GZIP_LEVEL: Final[int] = 1


def gzip_body(array: np.ndarray) -> bytes:
    """The array's bytes (as stored: give it little-endian, C order), gzip level 1, without
    a time stamp (the same slice always compresses to the same bytes)."""
    return gzip.compress(np.ascontiguousarray(array).tobytes(), compresslevel=GZIP_LEVEL, mtime=0)


def _ct_pixels(layout: SeriesLayout, ref: SliceRef) -> np.ndarray:
    frames = read_slices([ref.path])
    item = next((f for f in frames if f.frame == ref.frame), None)
    if item is None:
        raise PreprocessError(f"slice {ref.index} is no longer in its file")
    if (item.rows, item.columns) != (layout.rows, layout.columns):
        raise PreprocessError(f"slice {ref.index} does not have the series' Rows/Columns")
    hu = decode_slice(item)
    return np.clip(np.rint(hu), -32768, 32767).astype("<i2")


def _radiograph_pixels(layout: SeriesLayout, ref: SliceRef) -> np.ndarray:
    try:
        ds = pydicom.dcmread(ref.path)
    except InvalidDicomError:
        raise PreprocessError("the radiograph's file is not DICOM") from None
    except Exception as exc:
        raise PreprocessError(
            f"the radiograph's file cannot be read ({type(exc).__name__})"
        ) from None
    problem = object_stream_problem(ds)
    if problem:
        raise CorruptSliceError(f"the radiograph's pixel data is incomplete: {problem}")
    try:
        stored = pixel_array(ds)  # masks bits above BitsStored, sign-extends signed data
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise CorruptSliceError(
            f"the radiograph's pixel data cannot be decoded ({name}, {type(exc).__name__})"
        ) from None
    if stored.shape != (layout.rows, layout.columns):
        raise CorruptSliceError("the radiograph's pixel data does not match Rows/Columns")
    if stored.dtype.kind == "i":
        stored = np.clip(stored, 0, None)
    return np.clip(stored, 0, 65535).astype("<u2")


def decode_pixels(layout: SeriesLayout, ref: SliceRef) -> np.ndarray:
    """Decodes one slice of a laid-out series (see the module docstring).

    Args:
        layout: the series.
        ref: one of its slices.

    Returns:
        (rows, columns) little-endian int16 HU (CT) or uint16 stored values (radiographs).

    Raises:
        PreprocessError: the file cannot be read or no longer holds the slice.
        CorruptSliceError: the pixel data is cut short, cannot be decoded or has another size.
    """
    if layout.pixel_type == "int16":
        return _ct_pixels(layout, ref)
    return _radiograph_pixels(layout, ref)
