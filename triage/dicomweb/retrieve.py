"""WADO-RS (PS3.18 10.4): instances as stored, their metadata as DICOM JSON, frames as
uncompressed pixel bytes, and a rendered PNG.

- Instances: ``multipart/related; type="application/dicom"``, each part the file as it was
  received (its own transfer syntax, said in the part's Content-Type).
- Metadata: the header of each instance as DICOM JSON; Pixel Data is left out (a viewer
  asks for frames), other binary values are inline (``InlineBinary``).
- Frames: ``multipart/related; type="application/octet-stream"``, each frame decoded to
  Explicit VR Little Endian bytes (``transfer-syntax=1.2.840.10008.1.2.1``), whatever the
  stored transfer syntax; frame numbers start at 1.
- Rendered: one frame as an 8-bit PNG through the modality and VOI LUTs of the file (its
  first window), MONOCHROME1 inverted.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

EXPLICIT_LE = "1.2.840.10008.1.2.1"


class RetrieveError(ValueError):
    """A frame or rendering that cannot be made; ``status`` 404 (no such frame) or 406
    (this kind of instance cannot be shown so)."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


def boundary() -> str:
    return "triage-" + secrets.token_hex(12)


def multipart(parts: Sequence[tuple[str, bytes]], mark: str) -> Iterator[bytes]:
    """A multipart/related body, one part per (content type, bytes), yielded piece by piece."""
    for content_type, data in parts:
        yield f"--{mark}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        yield data
        yield b"\r\n"
    yield f"--{mark}--\r\n".encode()


def instance_parts(paths: Sequence[Path]) -> Iterator[tuple[str, bytes]]:
    """Each stored file as a part, with its transfer syntax."""
    for path in paths:
        data = path.read_bytes()
        try:
            ts = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.get(
                "TransferSyntaxUID", ""
            )
        except pydicom.errors.InvalidDicomError:
            continue
        yield f"application/dicom; transfer-syntax={ts}", data


def metadata(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The headers of the instances as DICOM JSON (Pixel Data left out)."""
    out = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        ds.remove_private_tags()
        out.append(dict(ds.to_json_dict(bulk_data_threshold=1 << 20)))
    return out


def frame_numbers(text: str) -> list[int]:
    """``1,2,5`` → [1, 2, 5]; raises :class:`RetrieveError` for anything else."""
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise RetrieveError(
            "frame numbers are whole numbers from 1, comma-separated", 400
        ) from None
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > 1000:
        raise RetrieveError("frame numbers are whole numbers from 1, comma-separated", 400)
    return numbers


def _frames_array(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise RetrieveError("this instance has no pixel data", 406)
    array = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames == 1:
        array = array[np.newaxis, ...]
    elif samples == 1 and array.ndim == 2:  # one frame said to be many
        array = array[np.newaxis, ...]
    return ds, array


def frames(path: Path, numbers: Sequence[int]) -> list[bytes]:
    """The frames, decoded, as little-endian native bytes (1-based numbers)."""
    ds, array = _frames_array(path)
    out = []
    for n in numbers:
        if n > array.shape[0]:
            raise RetrieveError(f"the instance has {array.shape[0]} frame(s)")
        frame = array[n - 1]
        if int(ds.get("BitsAllocated", 16)) == 1:
            raise RetrieveError("1-bit frames are not served decoded here", 406)
        out.append(np.ascontiguousarray(frame.astype(frame.dtype.newbyteorder("<"))).tobytes())
    return out


def rendered_png(path: Path, number: int = 1) -> bytes:
    """One frame windowed to 8 bits as PNG."""
    ds, array = _frames_array(path)
    if number > array.shape[0]:
        raise RetrieveError(f"the instance has {array.shape[0]} frame(s)")
    frame = array[number - 1]
    if int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        values = apply_modality_lut(frame, ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds, index=0)
        values = values.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        grey = (
            np.zeros(values.shape, np.uint8)
            if hi <= lo
            else ((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        )
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            grey = 255 - grey
        image = Image.fromarray(grey)
    else:
        image = Image.fromarray(np.asarray(frame, dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
