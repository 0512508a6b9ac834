"""CT pixel data → HU: the sorted slices of a series decoded onto a regular grid along the
stacking axis, in float32 Hounsfield units.

Single-frame JPEG Lossless files (the usual compressed archive format, and the slow one to
decode) are decoded and rescaled by GDCM through SimpleITK's ``ImageSeriesReader``, runs of
consecutive slices in threads (SimpleITK releases the GIL while it reads; pylibjpeg, pydicom's
JPEG decoder, does not). pydicom decodes everything else: native (uncompressed) data, RLE,
JPEG-LS, JPEG 2000, lossy JPEG, the frames of multi-frame objects, files GDCM cannot read, and
everything with ``decoder="pydicom"``. GDCM is kept to JPEG Lossless on purpose: its RLE decoder
kills the process (SIGFPE) on a malformed fragment, it reads truncated native pixel data without
complaint, and lossy JPEG decoders differ by ±1. Both decoders give HU = stored × RescaleSlope +
RescaleIntercept computed in float64 and rounded once to float32, so lossless data gives
identical HU whichever decodes it. HU below ``HU_AIR`` and pixel padding become ``HU_AIR``.

Damaged pixel data never reaches the grid: before any decoder runs, every compressed frame is
checked for its end marker (``ct_streams.check_streams``: JPEG-family decoders fill a cut
stream instead of failing), and a frame that pydicom cannot decode, or that decodes to another
size than Rows × Columns, fails the series too. Both raise ``CorruptSliceError`` naming the
sorted slice indices (see ``check_streams`` for why the series fails rather than losing the
slice as a gap).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, Literal

import numpy as np
import SimpleITK as sitk
from pydicom.pixels import pixel_array
from pydicom.uid import JPEGLossless, JPEGLosslessSV1

from triage.preprocess.ct_geometry import Stack
from triage.preprocess.ct_headers import Frame
from triage.preprocess.ct_streams import check_streams
from triage.preprocess.errors import CorruptSliceError
from triage.preprocess.hu import HU_AIR

try:  # copies an array into an existing image (GetImageFromArray's second half)
    from SimpleITK.extra import _SetImageFromArray as _copy_into_image
except ImportError:  # pragma: no cover - a SimpleITK without it: GetImageFromArray
    _copy_into_image = None

__all__ = ["Decoder", "decode_slice", "decode_to_image", "default_workers"]

Decoder = Literal["gdcm", "pydicom"]

_REGULAR_TOL: Final[float] = 0.05  # fraction of the slice spacing
_MAX_WORKERS: Final[int] = 8
_CHUNK_SLICES: Final[int] = 16  # files per GDCM series read
# Transfer syntaxes GDCM decodes (see the module docstring); pydicom decodes the others.
_GDCM_SYNTAXES: Final[frozenset[str]] = frozenset({JPEGLossless, JPEGLosslessSV1})


def _gdcm_may_decode(item: Frame) -> bool:
    """Whether GDCM may decode the slice: a single-frame object in a ``_GDCM_SYNTAXES`` syntax."""
    return item.frame is None and item.transfer_syntax in _GDCM_SYNTAXES


def _gdcm_series(run: Sequence[Frame], block: np.ndarray) -> bool:
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


def _gdcm_file(item: Frame, out: np.ndarray) -> bool:
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


def _decode_pydicom(item: Frame, index: int, out: np.ndarray) -> None:
    """Decodes one slice into ``out`` in HU with pydicom: stored × slope + intercept, computed
    in float64 (exactly in float32 where that is exact) and rounded once to float32.

    Raises:
        CorruptSliceError: pydicom cannot decode the frame, or it decodes to another shape.
    """
    ds = item.dataset
    try:
        stored = pixel_array(ds) if item.frame is None else pixel_array(ds, index=item.frame)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise CorruptSliceError(
            f"pixel data of sorted slice {index} cannot be decoded ({name}, {type(exc).__name__})"
        ) from None
    if stored.shape != out.shape:
        raise CorruptSliceError(f"pixel data of sorted slice {index} does not match Rows/Columns")
    if item.slope == 1.0 and item.intercept.is_integer():
        out[...] = stored  # exact in float32: |stored + intercept| < 2**24
        if item.intercept != 0.0:
            out += np.float32(item.intercept)
    else:
        np.copyto(out, stored * item.slope + item.intercept, casting="same_kind")


def _clear_padding(item: Frame, out: np.ndarray) -> None:
    """Sets pixels of PixelPaddingValue to ``HU_AIR``, in place (HU at or below ``HU_AIR``
    are clipped anyway, before or after: the order does not matter)."""
    padding = item.dataset.get("PixelPaddingValue")
    if isinstance(padding, int):
        padding_hu = padding * item.slope + item.intercept
        if padding_hu > HU_AIR:
            out[out == np.float32(padding_hu)] = HU_AIR


def _decode_run(run: Sequence[Frame], first: int, block: np.ndarray, decoder: Decoder) -> None:
    """Decodes sorted slices ``first``, ``first + 1``, … into ``block`` (one array per slice
    along axis 0) in HU.

    With ``decoder="gdcm"``, slices that GDCM may decode (``_gdcm_may_decode``) go to GDCM, as one
    series read when the whole run may; the others, and slices GDCM cannot read, go to pydicom.
    """
    use_gdcm = decoder == "gdcm"
    if (
        use_gdcm
        and len(run) > 1
        and all(_gdcm_may_decode(i) for i in run)
        and _gdcm_series(run, block)
    ):
        for item, out in zip(run, block, strict=True):
            _clear_padding(item, out)
        return
    for j, item in enumerate(run):
        if not (use_gdcm and _gdcm_may_decode(item) and _gdcm_file(item, block[j])):
            _decode_pydicom(item, first + j, block[j])
            np.maximum(block[j], np.float32(HU_AIR), out=block[j])
        _clear_padding(item, block[j])


def decode_slice(item: Frame, decoder: Decoder = "gdcm") -> np.ndarray:
    """Checks and decodes one slice on its own (an image viewer's read), in HU.

    The same path as the series: the compressed frame checked for its end first
    (``check_streams``), JPEG Lossless by GDCM, the rest by pydicom, rounded once, values
    below ``HU_AIR`` and pixel padding set to ``HU_AIR``.

    Args:
        item: The slice, read with its pixel data (``read_slices``).
        decoder: ``"gdcm"`` or ``"pydicom"``, see the module docstring.

    Returns:
        float32 (rows, columns) HU.

    Raises:
        CorruptSliceError: The frame is cut short, cannot be decoded or decodes to another
            size.
    """
    check_streams([item])
    out = np.empty((1, item.rows, item.columns), dtype=np.float32)
    _decode_run([item], 0, out, decoder)
    return out[0]


def default_workers() -> int:
    """Decoding threads: the CPUs this process may use, at most ``_MAX_WORKERS``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_WORKERS))


def _decode_into(
    slices: Sequence[Frame],
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
    slices: Sequence[Frame], stack: Stack, decoder: Decoder, pool: ThreadPoolExecutor | None
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


def decode_to_image(
    slices: Sequence[Frame], stack: Stack, decoder: Decoder, workers: int
) -> sitk.Image:
    """Checks and decodes the sorted slices onto the stack's regular grid, as an image.

    Every compressed frame is checked for its end first (``check_streams``), so no decoder
    sees a cut-short stream.

    Args:
        slices: Slices sorted along the normal (n of them).
        stack: Their offsets along the stacking axis and the grid.
        decoder: ``"gdcm"`` or ``"pydicom"``, see the module docstring.
        workers: Decoding threads (1: this thread only).

    Returns:
        float32 HU image of size (columns, rows, ``stack.n_out``), no geometry set (unit
        spacing, zero origin, identity direction).

    Raises:
        CorruptSliceError: A frame is cut short, cannot be decoded or decodes to another size.
    """
    check_streams(slices)
    rows, columns = slices[0].rows, slices[0].columns
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ct-decode")
        if workers > 1
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
    return image
