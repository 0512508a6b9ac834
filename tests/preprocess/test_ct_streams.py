"""Damaged compressed slices: a JPEG-family frame cut short (encapsulation intact) fails the
series with a reason on every decoder path, and never reaches a model as filler; whole frames
still decode exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.encaps import encapsulate, generate_frames, itemize_fragment
from pydicom.uid import JPEGLSLossless, generate_uid

import triage.preprocess.ct_decode as ct_decode
from tests.conftest import pydicom_file
from tests.preprocess.ct_builders import cut_frame, cut_slice, to_jpeg_lossless, write_slice
from triage.preprocess.ct import (
    HU_AIR,
    CorruptSliceError,
    IncompleteSeriesError,
    PreprocessError,
    load_ct_series,
    prepare_head_ct,
)
from triage.preprocess.ct_streams import END_MARKER

DECODERS = ["gdcm", "pydicom"]
N = 12


def _series(directory: Path, *, jpeg: bool) -> tuple[list[Path], np.ndarray]:
    """``N`` axial 48 × 40 slices 2.5 mm apart, noisy HU (so that filler cannot pass for
    data), file k at sorted position k; uncompressed or JPEG Lossless.

    Returns the files and the expected float32 HU (z, y, x).
    """
    directory.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    rng = np.random.default_rng(5)
    paths, expected = [], []
    for k in range(N):
        hu = np.rint(rng.uniform(-1100.0, 1500.0, size=(48, 40)))
        path = write_slice(
            directory / f"{k:02d}.dcm",
            hu,
            position=(0.0, 0.0, 2.5 * k),
            series_uid=series,
            study_uid=study,
        )
        expected.append(np.maximum(hu, HU_AIR).astype(np.float32))
        if jpeg:
            to_jpeg_lossless(path)
        paths.append(path)
    return paths, np.stack(expected)


def _hu(paths: list[Path], decoder: str, **kwargs: object) -> np.ndarray:
    volume = load_ct_series(paths, decoder=decoder, **kwargs)  # type: ignore[arg-type]
    return sitk.GetArrayFromImage(volume.image)


@pytest.fixture(scope="module")
def jpeg_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    return _series(tmp_path_factory.mktemp("jpeg"), jpeg=True)


def _copy(paths: list[Path], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, directory / p.name)) for p in paths]


@pytest.mark.parametrize("zero_fill", [False, True], ids=["cut", "cut-and-zero-filled"])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("decoder", DECODERS)
def test_cut_jpeg_lossless_slice_fails_the_series_naming_it(
    tmp_path: Path,
    jpeg_series: tuple[list[Path], np.ndarray],
    decoder: str,
    workers: int,
    zero_fill: bool,
) -> None:
    paths = _copy(jpeg_series[0], tmp_path)
    cut_slice(paths[5], zero_fill=zero_fill)
    with pytest.raises(CorruptSliceError) as info:
        _hu(paths, decoder, workers=workers)
    message = str(info.value)
    assert message.startswith(f"1 of {N} image slice(s) hold incomplete pixel data")
    assert "sorted slice 5 (JPEG Lossless, Non-Hierarchical, First-Order Prediction" in message
    assert message.endswith("ends without its end-of-image marker (cut short)")
    assert isinstance(info.value, PreprocessError)  # the study fails (not "incomplete")
    assert not isinstance(info.value, IncompleteSeriesError)


@pytest.mark.parametrize("decoder", DECODERS)
def test_without_the_check_both_decoders_return_filler(
    tmp_path: Path,
    jpeg_series: tuple[list[Path], np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    decoder: str,
) -> None:
    """Why the check exists: a cut stream decodes to a full-size frame without an error
    (pydicom's decoder on a cut stream; GDCM on a cut stream padded back to its length)."""
    paths, expected = jpeg_series
    paths = _copy(paths, tmp_path)
    cut_slice(paths[5], zero_fill=decoder == "gdcm")
    monkeypatch.setattr(ct_decode, "check_streams", lambda slices: None)
    array = _hu(paths, decoder)
    np.testing.assert_array_equal(np.delete(array, 5, axis=0), np.delete(expected, 5, axis=0))
    wrong_rows = np.any(array[5] != expected[5], axis=1)
    assert wrong_rows[-10:].all() and not wrong_rows[:5].any()  # the end of the frame is filler


def test_every_cut_slice_is_counted_and_named(
    tmp_path: Path, jpeg_series: tuple[list[Path], np.ndarray]
) -> None:
    paths = _copy(jpeg_series[0], tmp_path)
    for k in (0, 7, 11):
        cut_slice(paths[k], keep=0.9)
    with pytest.raises(CorruptSliceError, match=rf"^3 of {N} image .*sorted slices 0, 7, 11 "):
        load_ct_series(paths)


def test_prepare_head_ct_refuses_a_cut_slice(
    tmp_path: Path, jpeg_series: tuple[list[Path], np.ndarray]
) -> None:
    paths = _copy(jpeg_series[0], tmp_path)
    cut_slice(paths[3])
    with pytest.raises(CorruptSliceError, match="sorted slice 3 "):
        prepare_head_ct(paths, min_coverage_mm=None)


@pytest.mark.parametrize("decoder", DECODERS)
def test_whole_jpeg_lossless_series_equals_the_uncompressed_one(
    tmp_path: Path, jpeg_series: tuple[list[Path], np.ndarray], decoder: str
) -> None:
    native, expected = _series(tmp_path / "native", jpeg=False)
    np.testing.assert_array_equal(_hu(jpeg_series[0], decoder), expected)
    np.testing.assert_array_equal(_hu(native, decoder), expected)


def _fragments(*fragments: bytes) -> bytes:
    """Encapsulated pixel data of one frame in these fragments (an empty Basic Offset Table;
    each fragment padded to even length with a 0x00 byte)."""
    return itemize_fragment(b"") + b"".join(
        itemize_fragment(f + b"\x00" * (len(f) % 2)) for f in fragments
    )


@pytest.mark.parametrize("decoder", DECODERS)
def test_whole_frames_pass_with_padding_or_a_split_end_marker(
    tmp_path: Path, jpeg_series: tuple[list[Path], np.ndarray], decoder: str
) -> None:
    """An end marker followed by pad bytes (the 0x00 of an odd-length stream, or a few more),
    or in a last fragment of its own, ends a whole frame."""
    paths, expected = jpeg_series
    paths = _copy(paths, tmp_path)
    for k, pixel_data in (
        (2, lambda f: _fragments(f + b"\x00")),
        (4, lambda f: _fragments(f + bytes(7))),
        (6, lambda f: _fragments(f[: (len(f) - 2) // 2 * 2], f[(len(f) - 2) // 2 * 2 :])),
        (8, lambda f: _fragments(f[:16], f[16:-30], f[-30:])),
    ):
        ds = pydicom.dcmread(paths[k])
        (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
        frame = frame.rstrip(b"\x00")
        assert frame.endswith(END_MARKER)
        ds.PixelData = pixel_data(frame)
        ds.save_as(paths[k])
    np.testing.assert_array_equal(_hu(paths, decoder), expected)


def _enhanced_jpeg_ls(path: Path, *, has_bot: bool, frames: int | None = None) -> bytes:
    """pydicom-data's two-frame Enhanced CT as JPEG-LS Lossless at ``path``; with ``frames``,
    only that many frames kept in the pixel data (NumberOfFrames unchanged). Returns the
    second frame's stream."""
    ds = pydicom.dcmread(pydicom_file("eCT_Supplemental.dcm"))
    ds.compress(JPEGLSLossless)
    streams = list(generate_frames(ds.PixelData, number_of_frames=2))
    ds.PixelData = encapsulate(streams[:frames], has_bot=has_bot)
    ds.save_as(path)
    return streams[1]


@pytest.mark.parametrize("has_bot", [True, False])
def test_cut_frame_of_a_multi_frame_object_fails_the_series(tmp_path: Path, has_bot: bool) -> None:
    path = tmp_path / "enhanced.dcm"
    second = _enhanced_jpeg_ls(path, has_bot=has_bot)
    # Frames at z -159 and -149; the slice normal points to -z, so frame 2 is sorted slice 0.
    whole = load_ct_series([path], min_slices=1)
    assert whole.n_slices == 2
    ds = pydicom.dcmread(path)
    first = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=2)
    ds.PixelData = encapsulate([first, cut_frame(second)], has_bot=has_bot)
    ds.save_as(path)
    with pytest.raises(CorruptSliceError, match=r"^1 of 2 .*sorted slice 0 \(JPEG-LS Lossless"):
        load_ct_series([path], min_slices=1)


def test_frames_missing_from_the_pixel_data_fail_the_series(tmp_path: Path) -> None:
    path = tmp_path / "enhanced.dcm"
    _enhanced_jpeg_ls(path, has_bot=False, frames=1)
    with pytest.raises(
        CorruptSliceError,
        match=r"sorted slice 0 .*: frame missing from the encapsulated pixel data \(1 of 2 ",
    ):
        load_ct_series([path], min_slices=1)


@pytest.mark.realdata
@pytest.mark.parametrize("decoder", DECODERS)
def test_real_jpeg_lossless_slice_cut_to_a_third_fails_the_series(
    tmp_path: Path, cq500_dir: Path, decoder: str
) -> None:
    """The outside probe's case on the real series: one 512 × 512 slice cut to a third."""

    def z(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    paths = _copy(sorted(sorted(cq500_dir.glob("*.dcm"), key=z)[100:140]), tmp_path)
    whole = load_ct_series(paths, decoder=decoder)  # type: ignore[arg-type]
    assert whole.n_slices == 40
    victim = sorted(paths, key=z)[20]
    cut_slice(victim)
    with pytest.raises(CorruptSliceError, match=r"^1 of 40 .*sorted slice 20 \(JPEG Lossless"):
        load_ct_series(paths, decoder=decoder)  # type: ignore[arg-type]
