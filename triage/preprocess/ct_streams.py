"""Whole compressed frames: every slice's encapsulated JPEG-family stream is checked for its end
before any decoder sees it.

Why before decoding: JPEG-family decoders fill a stream that ends early instead of failing.
Measured on a 512 × 512 JPEG Lossless CT slice cut to a third of its bytes (the fragment length
fixed, so the encapsulation stays valid): pydicom's decoder (pylibjpeg-libjpeg) returns a frame
of the right size whose last 318 rows are filler, with no error and no warning; pydicom's
JPEG-LS decoder does the same on a cut JPEG-LS stream. GDCM refuses the cut JPEG Lossless
stream, but reads the same stream padded back to its length with zero bytes as a full frame.
A check of the decoded size cannot see any of this; the end of the stream can.

The rule: a JPEG (ISO/IEC 10918), JPEG-LS (ISO/IEC 14495) or JPEG 2000 / HTJ2K (ISO/IEC 15444)
codestream ends with the marker 0xFFD9 (EOI; EOC in JPEG 2000), and these two bytes cannot occur
inside entropy-coded data: JPEG stuffs a 0x00 byte after every 0xFF data byte, JPEG-LS and JPEG
2000 stuff a zero bit so that a 0xFF data byte is never followed by one above 0x8F. A frame is
whole when the marker lies within its last ``END_WINDOW`` bytes (room for the 0x00 byte that pads
an odd-length stream to an even fragment and for trailing bytes some encoders add; the same
window pydicom uses to find the end of a frame). A stream cut anywhere in its entropy-coded data
lacks the marker, and so does one cut and then padded with zeros.

What it cannot see: a stream cut short and then given a new end marker. Both decoders read that
as a full frame (GDCM only prints a libjpeg warning on stderr, which is not available to the
caller), so it is a known limit of the check, not of one decoder.

Other syntaxes need no such check: native and deflated pixel data are checked for length by
pydicom (GDCM never reads them here), and the RLE Lossless header gives each segment's offset,
so pydicom refuses a short RLE frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import pydicom
from pydicom.encaps import generate_frames
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from triage.preprocess.ct_headers import Frame
from triage.preprocess.errors import CorruptSliceError

__all__ = [
    "END_MARKER",
    "END_WINDOW",
    "JPEG_FAMILY",
    "check_streams",
    "object_stream_problem",
    "stream_faults",
]

JPEG_FAMILY: Final[frozenset[str]] = frozenset(
    str(uid) for uid in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes)
)
"""Transfer syntaxes whose frames are codestreams ending with ``END_MARKER`` (JPEG, JPEG-LS,
JPEG 2000 and HTJ2K)."""

END_MARKER: Final[bytes] = b"\xff\xd9"
"""EOI (JPEG, JPEG-LS) and EOC (JPEG 2000): the last marker of a codestream."""

END_WINDOW: Final[int] = 10
"""A whole frame has ``END_MARKER`` within its last this many bytes."""

_CUT: Final[str] = "compressed stream ends without its end-of-image marker (cut short)"
_MAX_LISTED: Final[int] = 10  # slice indices named per reason


def _frame_tails(ds: pydicom.Dataset, n_frames: int) -> list[bytes]:
    """The last ``END_WINDOW`` bytes of each frame of an object's encapsulated pixel data, in
    frame order; fewer than ``n_frames`` entries when the pixel data holds fewer frames.

    Raises:
        ValueError: The encapsulation (items, offset tables) cannot be parsed.
    """
    eot, eot_lengths = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    extended = (eot, eot_lengths) if eot is not None and eot_lengths is not None else None
    tails: list[bytes] = []
    for frame in generate_frames(
        ds.PixelData, number_of_frames=n_frames, extended_offsets=extended
    ):
        tails.append(bytes(frame[-END_WINDOW:]))
        if len(tails) == n_frames:
            break
    return tails


def _n_frames(ds: pydicom.Dataset) -> int:
    """NumberOfFrames (1 when absent; headers have checked it is a positive integer)."""
    value = ds.get("NumberOfFrames")
    return 1 if value in (None, "") else int(value)


def stream_faults(slices: Sequence[Frame]) -> dict[int, str]:
    """Finds the slices whose compressed frame is not whole (see the module docstring).

    Slices in other transfer syntaxes than ``JPEG_FAMILY`` are not looked at. The encapsulated
    pixel data of each object is parsed once; it is in memory already (pydicom reads values of
    undefined length with the header).

    Args:
        slices: The series' slices, in the order the indices refer to.

    Returns:
        Index into ``slices`` → why its frame is not whole; empty when all are.
    """
    faults: dict[int, str] = {}
    objects: dict[int, list[bytes] | str] = {}  # id(dataset) → frame tails, or why none
    for k, item in enumerate(slices):
        if item.transfer_syntax not in JPEG_FAMILY:
            continue
        ds = item.dataset
        tails = objects.get(id(ds))
        if tails is None:
            try:
                tails = _frame_tails(ds, _n_frames(ds))
            except Exception as exc:  # malformed items or offset tables
                tails = f"encapsulated pixel data cannot be parsed ({type(exc).__name__})"
            objects[id(ds)] = tails
        if isinstance(tails, str):
            faults[k] = tails
            continue
        index = 0 if item.frame is None else item.frame
        if index >= len(tails):
            faults[k] = (
                f"frame missing from the encapsulated pixel data ({len(tails)} of "
                f"{_n_frames(ds)} frames found)"
            )
        elif END_MARKER not in tails[index]:
            faults[k] = _CUT
    return faults


def _describe(faults: dict[int, str], slices: Sequence[Frame]) -> str:
    """One message: how many slices, and per reason which sorted slices and syntaxes."""
    by_reason: dict[str, list[int]] = {}
    for k, why in faults.items():
        by_reason.setdefault(why, []).append(k)
    parts = []
    for why, indices in by_reason.items():
        shown = ", ".join(str(k) for k in indices[:_MAX_LISTED])
        more = f" and {len(indices) - _MAX_LISTED} more" if len(indices) > _MAX_LISTED else ""
        syntaxes = sorted({UID(str(slices[k].transfer_syntax)).name for k in indices})
        label = "sorted slice" if len(indices) == 1 else "sorted slices"
        parts.append(f"{label} {shown}{more} ({'; '.join(syntaxes)}): {why}")
    return (
        f"{len(faults)} of {len(slices)} image slice(s) hold incomplete pixel data, so the series "
        f"is not used: " + "; ".join(parts)
    )


def check_streams(slices: Sequence[Frame]) -> None:
    """Refuses a series with a cut-short compressed frame, before anything is decoded.

    Why the series fails rather than losing the slice as a gap (``MAX_GAP_RATIO``): the gap
    rules are for slices that were never sent; a slice that was acquired and arrived damaged
    says the transfer or the archive lost data, possibly in other slices too in ways no check
    sees (see the module docstring), and interpolating across it would show the model a
    made-up slice exactly where a small bleed may lie. A failed study keeps its normal place
    on the worklist and is read as usual; the reason is kept on the study.

    Args:
        slices: The series' slices sorted along the normal (messages name these indices).

    Raises:
        CorruptSliceError: Slices whose frame is not whole; the message gives their number,
            their sorted indices, the transfer syntaxes and why.
    """
    faults = stream_faults(slices)
    if faults:
        raise CorruptSliceError(_describe(faults, slices))


def object_stream_problem(ds: pydicom.Dataset) -> str | None:
    """Why a single object's compressed frames are not whole (a radiograph, see the module
    docstring), or None: frames cut short, missing, or encapsulation that cannot be parsed.
    Objects outside ``JPEG_FAMILY`` are not looked at."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax not in JPEG_FAMILY or "PixelData" not in ds:
        return None
    n_frames = _n_frames(ds)
    try:
        tails = _frame_tails(ds, n_frames)
    except Exception as exc:
        return f"encapsulated pixel data cannot be parsed ({type(exc).__name__})"
    if len(tails) < n_frames:
        return f"frame missing from the encapsulated pixel data ({len(tails)} of {n_frames} found)"
    cut = [k for k, tail in enumerate(tails) if END_MARKER not in tail]
    if cut:
        return f"{len(cut)} of {n_frames} frame(s) ({UID(syntax).name}): {_CUT}"
    return None
