"""Validation rules for one received instance: each check reads the parsed header (and the
raw pixel data element, never decoded) and returns a reason, or None when the instance
passes. Reasons name the attribute and the rule, never a value (no patient data).

The attributes read here are decoded once by :func:`triage.ingest.parse.parse` (see
``READ_AT_INGEST`` there), so a value that cannot be decoded is refused there, not here.
"""

from __future__ import annotations

import re
import struct

import pydicom
from pydicom.dataset import Dataset

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_UID_CHARS_RE = re.compile(r"^[0-9.]+$")


def uid_problem(name: str, value: object) -> str | None:
    """A reason ``value`` breaks the UID rules of PS3.5 9.1, else None: at most 64
    characters; components of digits separated by dots, none empty, none with a leading
    zero (a component "0" itself is allowed)."""
    if value is None or str(value) == "":
        return f"missing required attribute {name}"
    text = str(value)
    if len(text) > 64:
        return f"{name} is {len(text)} characters long (at most 64 allowed)"
    if not _UID_CHARS_RE.match(text):
        return f"{name} contains characters other than digits and dots"
    components = text.split(".")
    if "" in components:
        return f"{name} has an empty component (PS3.5 9.1: digits between single dots)"
    if any(len(c) > 1 and c[0] == "0" for c in components):
        return f"{name} has a component with a leading zero (not allowed by PS3.5 9.1)"
    return None


def validate_header(ds: Dataset) -> str | None:
    """Return a reason the header is unacceptable, or None when it is fine."""
    for name in REQUIRED_UIDS:
        problem = uid_problem(name, ds.get(name))
        if problem:
            return problem
    if not ds.get("Modality"):
        return "missing required attribute Modality"
    return None


# Executable formats a Part 10 preamble must not hold (PS3.10 7.5 allows TIFF and zeros).
_EXECUTABLE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"MZ", "Windows PE/DOS"),
    (b"\x7fELF", "ELF"),
    (b"#!", "script"),
    (b"\xfe\xed\xfa\xce", "Mach-O"),
    (b"\xfe\xed\xfa\xcf", "Mach-O"),
    (b"\xce\xfa\xed\xfe", "Mach-O"),
    (b"\xcf\xfa\xed\xfe", "Mach-O"),
    (b"\xca\xfe\xba\xbe", "Mach-O universal/Java class"),
)


def executable_preamble(data: bytes) -> str | None:
    """The kind of executable held in a Part 10 preamble, or None."""
    if data[128:132] != b"DICM":
        return None
    preamble = data[:128]
    for magic, kind in _EXECUTABLE_MAGIC:
        if preamble.startswith(magic):
            return kind
    return None


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _is_image_storage(sop_class: str) -> bool:
    return "Image Storage" in pydicom.uid.UID(sop_class).name


def check_image_size(ds: Dataset, max_pixel_bytes: int) -> str | None:
    """A reason when the header announces more pixel data than the ceiling, else None."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
    bits = _int(ds, "BitsAllocated", 0)
    if None in (rows, cols, frames, samples, bits):
        return "Rows, Columns, NumberOfFrames, SamplesPerPixel or BitsAllocated is not a number"
    assert rows is not None and cols is not None and frames is not None
    assert samples is not None and bits is not None
    if min(rows, cols, frames, samples, bits) < 0:
        return "a negative image dimension"
    size = rows * cols * frames * samples * bits // 8
    if size > max_pixel_bytes:
        return (
            f"image too large: Rows {rows} x Columns {cols} x frames {frames} x samples"
            f" {samples} x {bits} bits = {size} bytes, over the {max_pixel_bytes}-byte ceiling"
        )
    return None


def check_sop_class_content(ds: Dataset) -> str | None:
    """A reason when an image SOP class lacks the image pixel module, else None (0xA900)."""
    sop_class = str(ds.SOPClassUID)
    if not _is_image_storage(sop_class):
        return None
    name = pydicom.uid.UID(sop_class).name
    for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            return f"data set does not match {name}: missing {keyword}"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return f"data set does not match {name}: no pixel data"
    if not (_int(ds, "Rows") and _int(ds, "Columns")):
        return f"data set does not match {name}: Rows or Columns is 0"
    return None


def check_pixel_data(data: bytes, ds: Dataset) -> str | None:
    """A reason when the pixel data element is truncated or its fragments are malformed."""
    if "PixelData" not in ds:
        return None
    elem = ds["PixelData"]
    value = elem.value
    if not isinstance(value, bytes):
        return "PixelData could not be read"
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    encapsulated = bool(ts) and pydicom.uid.UID(str(ts)).is_encapsulated
    if encapsulated:
        return _check_fragments(value, frames=_int(ds, "NumberOfFrames", 1) or 1)
    rows, cols = _int(ds, "Rows", 0) or 0, _int(ds, "Columns", 0) or 0
    frames = _int(ds, "NumberOfFrames", 1) or 1
    samples, bits = _int(ds, "SamplesPerPixel", 1) or 1, _int(ds, "BitsAllocated", 0) or 0
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422" and samples == 3:
        samples = 2  # native YBR_FULL_422 keeps 2 values per pixel (PS3.3 C.7.6.3.1.2)
    pixels = rows * cols * frames * samples
    needed = (pixels + 7) // 8 if bits == 1 else pixels * bits // 8
    if len(value) < needed:
        return (
            f"truncated PixelData: {len(value)} bytes where Rows x Columns x frames x samples"
            f" x BitsAllocated needs {needed}"
        )
    return None


def _check_fragments(value: bytes, *, frames: int) -> str | None:
    """Walk the items of encapsulated pixel data (PS3.5 A.4): each item must fit in the
    value, and there must be a fragment per frame at least (the first item is the offset
    table)."""
    offset, items = 0, 0
    while offset + 8 <= len(value):
        group, element, length = struct.unpack_from("<HHL", value, offset)
        tag = group << 16 | element
        if tag == 0xFFFEE0DD:
            break
        if tag != 0xFFFEE000 or length == 0xFFFFFFFF:
            return "malformed encapsulated PixelData: unexpected item tag or length"
        if offset + 8 + length > len(value):
            return (
                f"truncated encapsulated PixelData: item {items} declares {length} bytes,"
                f" {len(value) - offset - 8} present"
            )
        offset += 8 + length
        items += 1
    fragments = items - 1
    if fragments < 1:
        return "encapsulated PixelData holds no fragments"
    if fragments < frames:
        return f"truncated encapsulated PixelData: {fragments} fragment(s) for {frames} frames"
    return None


# SOP classes whose IOD fixes the Modality value.
_MODALITY_OF_CLASS: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.5.1.4.1.1.2": ("CT",),
    "1.2.840.10008.5.1.4.1.1.2.1": ("CT",),
    "1.2.840.10008.5.1.4.1.1.1": ("CR",),
    "1.2.840.10008.5.1.4.1.1.1.1": ("DX",),
    "1.2.840.10008.5.1.4.1.1.1.1.1": ("DX",),
    "1.2.840.10008.5.1.4.1.1.4": ("MR",),
}


def modality_mismatch(ds: Dataset) -> str | None:
    """A note when Modality contradicts the SOP class (stored with warning 0xB007)."""
    allowed = _MODALITY_OF_CLASS.get(str(ds.SOPClassUID))
    modality = str(ds.get("Modality", "")).strip().upper()
    if allowed and modality not in allowed:
        return (
            f"Modality {modality[:16]!r} does not match {pydicom.uid.UID(str(ds.SOPClassUID)).name}"
        )
    return None
