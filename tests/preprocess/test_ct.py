"""Tests of head-CT preprocessing: synthetic series built here, plus the real CQ500 series."""

from __future__ import annotations

import pickle
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.pixels import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
    generate_uid,
)

import triage.preprocess.ct as ct
import triage.preprocess.ct_decode as ct_decode
from tests.conftest import pydicom_file
from tests.preprocess.ct_builders import ramp_series as _ramp_series
from tests.preprocess.ct_builders import to_jpeg_lossless as _to_jpeg_lossless
from tests.preprocess.ct_builders import write_slice as _write_slice
from triage.preprocess.ct import (
    HEAD_MIN_COVERAGE_MM,
    HU_AIR,
    IMAGE_KEY,
    MAX_TILT_DEG,
    ClipAndScaleHU,
    ClipAndScaleHUd,
    CorruptSliceError,
    CTSeriesVolume,
    GantryTiltError,
    HeadCT,
    IncompleteSeriesError,
    PreprocessError,
    WindowPreset,
    crop_to_head,
    head_mask,
    load_ct_series,
    prepare_head_ct,
    resample_isotropic,
)

# --------------------------------------------------------------------------------------------
# Synthetic series


def _z_profile(volume: CTSeriesVolume) -> np.ndarray:
    """HU at the centre pixel of each slice, float (z,)."""
    array = sitk.GetArrayViewFromImage(volume.image)
    return np.array(array[:, array.shape[1] // 2, array.shape[2] // 2])


def test_unsorted_files_are_sorted_by_position(tmp_path: Path) -> None:
    paths = _ramp_series(tmp_path)
    random.Random(3).shuffle(paths)
    volume = load_ct_series(paths)
    assert volume.n_slices == 20
    assert volume.image.GetSize() == (32, 32, 20)
    assert volume.image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(_z_profile(volume), 10.0 * np.arange(20))
    assert volume.image.GetSpacing() == pytest.approx((1.0, 1.0, 2.0))
    assert volume.image.GetOrigin() == pytest.approx((-16.0, -16.0, 10.0))
    assert volume.image.GetDirection() == pytest.approx(np.eye(3).ravel())


def test_uids_are_reported(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    volume = load_ct_series(_ramp_series(tmp_path, series_uid=series, study_uid=study))
    assert (volume.StudyInstanceUID, volume.SeriesInstanceUID) == (study, series)


def test_localizer_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    series, study = generate_uid(), generate_uid()
    paths = _ramp_series(tmp_path, series_uid=series, study_uid=study)
    localizer = _write_slice(
        tmp_path / "scout.dcm",
        np.zeros((48, 64)),
        position=(-100.0, 0.0, 100.0),
        orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
        series_uid=series,
        study_uid=study,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not a DICOM file")
    volume = load_ct_series([localizer, not_dicom, *paths])
    assert volume.n_slices == 20
    np.testing.assert_allclose(_z_profile(volume), 10.0 * np.arange(20))


def test_too_many_missing_slices_make_an_incomplete_series(tmp_path: Path) -> None:
    paths = _ramp_series(tmp_path, skip=(9, 10))  # a 3x gap
    with pytest.raises(IncompleteSeriesError, match=r"missing slices: gap of 6\.00 mm"):
        load_ct_series(paths)


def test_too_few_slices_make_an_incomplete_series(tmp_path: Path) -> None:
    paths = _ramp_series(tmp_path, n=5)
    with pytest.raises(IncompleteSeriesError, match="has 5 image slice.s.; at least 8"):
        load_ct_series(paths)
    assert load_ct_series(paths, min_slices=5).n_slices == 5
    with pytest.raises(IncompleteSeriesError, match="at least 6"):
        load_ct_series(paths, min_slices=6)


def test_too_little_coverage_makes_an_incomplete_series(tmp_path: Path) -> None:
    paths = _ramp_series(tmp_path)  # 20 slices 2 mm apart: 38 mm between centres + 2 mm
    volume = load_ct_series(paths, min_coverage_mm=40.0)
    assert volume.coverage_mm == pytest.approx(40.0)
    assert volume.gantry_tilt_deg == 0.0
    with pytest.raises(IncompleteSeriesError, match=r"covers 40\.0 mm .* at least 41 mm"):
        load_ct_series(paths, min_coverage_mm=41.0)


def test_incomplete_series_error_is_a_distinct_exported_class() -> None:
    assert issubclass(IncompleteSeriesError, PreprocessError)
    assert issubclass(GantryTiltError, PreprocessError)
    assert not issubclass(IncompleteSeriesError, GantryTiltError)
    assert {"IncompleteSeriesError", "GantryTiltError", "PreprocessError"} <= set(ct.__all__)
    error = pickle.loads(pickle.dumps(GantryTiltError(35.04, 30.0)))
    assert (error.tilt_deg, error.max_tilt_deg) == (35.04, 30.0)
    assert str(error) == "gantry tilt of 35.0 degrees is above the limit of 30 degrees"


def test_arguments_are_checked(tmp_path: Path) -> None:
    paths = _ramp_series(tmp_path, n=8)
    for kwargs in (
        {"min_slices": 0},
        {"max_tilt_deg": -1.0},
        {"max_tilt_deg": 90.0},
        {"min_coverage_mm": -1.0},
        {"workers": 0},
        {"decoder": "dcmtk"},
    ):
        with pytest.raises(ValueError):
            load_ct_series(paths, **kwargs)  # type: ignore[arg-type]


def test_single_missing_slice_is_interpolated(tmp_path: Path) -> None:
    paths = _ramp_series(tmp_path, skip=(9,))  # a 2x gap, below the 2.5x limit
    volume = load_ct_series(paths)
    assert volume.n_slices == 19
    assert volume.image.GetSize() == (32, 32, 20)  # regular grid, slice 9 interpolated
    np.testing.assert_allclose(_z_profile(volume), 10.0 * np.arange(20))


def test_uneven_spacing_is_put_on_a_regular_grid(tmp_path: Path) -> None:
    series, study = generate_uid(), generate_uid()
    z = np.cumsum([0.0] + [2.0, 2.4] * 6)  # alternating 2.0 / 2.4 mm
    paths = [
        _write_slice(
            tmp_path / f"{k}.dcm",
            np.full((8, 8), 10.0 * zk),
            position=(0.0, 0.0, zk),
            series_uid=series,
            study_uid=study,
        )
        for k, zk in enumerate(z)
    ]
    volume = load_ct_series(paths)
    n = volume.image.GetSize()[2]
    spacing = volume.image.GetSpacing()[2]
    assert spacing * (n - 1) == pytest.approx(z[-1])
    np.testing.assert_allclose(_z_profile(volume), 10.0 * spacing * np.arange(n), atol=1e-3)


def test_two_series_are_rejected(tmp_path: Path) -> None:
    study = generate_uid()
    paths = _ramp_series(tmp_path / "a", study_uid=study) + _ramp_series(
        tmp_path / "b", study_uid=study
    )
    with pytest.raises(PreprocessError, match="2 series"):
        load_ct_series(paths)


def test_rescale_slope_and_intercept_are_applied_per_slice(tmp_path: Path) -> None:
    series, study = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    expected = []
    paths = []
    for k in range(10):
        hu = rng.integers(-1000, 2000, size=(16, 16)).astype(np.float64)
        hu -= hu % 2  # representable with slope 2
        slope, intercept = (2.0, -1000.0) if k % 2 else (1.0, -1024.0 + k)
        paths.append(
            _write_slice(
                tmp_path / f"{k}.dcm",
                hu,
                position=(0.0, 0.0, 5.0 * k),
                series_uid=series,
                study_uid=study,
                slope=slope,
                intercept=intercept,
            )
        )
        expected.append(hu)
    volume = load_ct_series(paths)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), np.stack(expected))


def test_values_below_air_are_clipped(tmp_path: Path) -> None:
    paths = _ramp_series(tmp_path, n=8, intercept=-3024.0)
    series = pydicom.dcmread(paths[0])
    hu = np.full((32, 32), -2500.0)
    _write_slice(
        paths[0],
        hu,
        position=series.ImagePositionPatient,
        series_uid=series.SeriesInstanceUID,
        study_uid=series.StudyInstanceUID,
        intercept=-3024.0,
    )
    array = sitk.GetArrayFromImage(load_ct_series(paths).image)
    assert array.min() == HU_AIR


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("duplicate", "duplicate slice positions"),
        ("rows", "inconsistent Rows/Columns"),
        ("orientation", "inconsistent ImageOrientationPatient between slices .slices not parallel"),
    ],
)
def test_inconsistent_series_are_rejected(tmp_path: Path, change: str, message: str) -> None:
    series, study = generate_uid(), generate_uid()
    _ramp_series(tmp_path, n=10, series_uid=series, study_uid=study)
    zeros = np.zeros((32, 32))
    if change == "duplicate":
        _write_slice(
            tmp_path / "dup.dcm", zeros, position=(-16, -16, 10), series_uid=series, study_uid=study
        )
    elif change == "rows":
        _write_slice(
            tmp_path / "rows.dcm",
            zeros[:16],
            position=(-16, -16, 99),
            series_uid=series,
            study_uid=study,
        )
    elif change == "orientation":
        tilted = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)
        _write_slice(
            tmp_path / "o.dcm",
            zeros,
            position=(-16, -16, 99),
            orientation=tilted,
            series_uid=series,
            study_uid=study,
        )
    with pytest.raises(PreprocessError, match=message) as info:
        load_ct_series(sorted(tmp_path.glob("*.dcm")))
    assert not isinstance(info.value, IncompleteSeriesError)


def test_missing_geometry_attribute_is_named(tmp_path: Path) -> None:
    paths = _ramp_series(tmp_path, n=8)
    ds = pydicom.dcmread(paths[3])
    del ds.ImagePositionPatient
    ds.save_as(paths[3])
    with pytest.raises(PreprocessError, match="lacks ImagePositionPatient"):
        load_ct_series(paths)


def test_no_files_and_no_images_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(PreprocessError, match="no files"):
        load_ct_series([])
    text = tmp_path / "a.txt"
    text.write_text("hello")
    with pytest.raises(PreprocessError, match="none of the 1 files"):
        load_ct_series([text])


def test_error_messages_hold_no_uids(tmp_path: Path) -> None:
    study = generate_uid()
    paths = _ramp_series(tmp_path / "a", study_uid=study) + _ramp_series(
        tmp_path / "b", study_uid=study
    )
    with pytest.raises(PreprocessError) as info:
        load_ct_series(paths)
    assert study not in str(info.value)
    assert str(tmp_path) not in str(info.value)


def test_reversed_axes_are_reoriented_to_lps(tmp_path: Path) -> None:
    # Rows run right-to-left (-x), columns anterior-to-posterior; slices descend in z.
    paths = _ramp_series(tmp_path, orientation=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    volume = load_ct_series(paths)
    assert volume.image.GetDirection() == pytest.approx(np.eye(3).ravel())
    assert volume.image.GetOrigin()[0] == pytest.approx(-16.0 - 31.0)
    np.testing.assert_allclose(_z_profile(volume), 10.0 * np.arange(20))


SPHERE_CENTRE, SPHERE_RADIUS = np.array([2.0, 3.0, 24.0]), 8.0


def _tilted_sphere_series(directory: Path, tilt_deg: float, n: int = 40) -> list[Path]:
    """A sphere (100 HU in -1000 HU) scanned with the gantry tilted by ``tilt_deg`` about x.

    The table moves along z only (1 mm per slice); the slice plane is tilted, so the
    ImagePositionPatient line is not the slice normal.
    """
    directory.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    tilt = np.deg2rad(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    size = 48
    ij = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="xy"), axis=-1)
    paths = []
    for k in range(n):
        ipp = np.array([-24.0, -24.0, 4.0 + k * 1.0])
        points = ipp + ij[..., :1] * row + ij[..., 1:] * col  # (rows, columns, 3) in mm
        inside = np.linalg.norm(points - SPHERE_CENTRE, axis=-1) < SPHERE_RADIUS
        paths.append(
            _write_slice(
                directory / f"{k}.dcm",
                np.where(inside, 100.0, -1000.0),
                position=tuple(ipp),
                orientation=(*row, *col),
                series_uid=series,
                study_uid=study,
            )
        )
    return paths


def test_gantry_tilt_keeps_physical_positions(tmp_path: Path) -> None:
    """A sphere scanned with a 20° tilted gantry is resampled to its true place and shape."""
    centre, radius = SPHERE_CENTRE, SPHERE_RADIUS
    paths = _tilted_sphere_series(tmp_path, 20.0)
    random.Random(5).shuffle(paths)
    volume = load_ct_series(paths)
    assert volume.gantry_tilt_deg == pytest.approx(20.0, abs=1e-6)
    assert volume.coverage_mm == pytest.approx(40.0 * np.cos(np.deg2rad(20.0)))
    resampled = resample_isotropic(volume.image, 1.0)
    direction = np.asarray(resampled.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    array = sitk.GetArrayFromImage(resampled)
    zyx = np.argwhere(array > -450.0)
    points = np.array(
        [resampled.TransformIndexToPhysicalPoint([int(i) for i in v[::-1]]) for v in zyx]
    )
    np.testing.assert_allclose(points.mean(axis=0), centre, atol=0.3)
    volume_ml = len(zyx) / 1000.0
    assert volume_ml == pytest.approx(4 / 3 * np.pi * radius**3 / 1000.0, rel=0.1)
    assert np.linalg.norm(points - centre, axis=1).max() < radius + 1.0


def test_gantry_tilt_above_the_limit_is_refused(tmp_path: Path) -> None:
    steep = _tilted_sphere_series(tmp_path / "steep", 35.0, n=12)
    with pytest.raises(
        GantryTiltError, match=r"gantry tilt of 35\.0 degrees .* limit of 30"
    ) as info:
        load_ct_series(steep)
    assert info.value.tilt_deg == pytest.approx(35.0)
    assert info.value.max_tilt_deg == MAX_TILT_DEG == 30.0
    assert load_ct_series(steep, max_tilt_deg=40.0).gantry_tilt_deg == pytest.approx(35.0)
    mild = _tilted_sphere_series(tmp_path / "mild", 20.0, n=12)
    with pytest.raises(GantryTiltError, match="20.0 degrees"):
        load_ct_series(mild, max_tilt_deg=10.0)
    with pytest.raises(GantryTiltError):
        prepare_head_ct(mild, max_tilt_deg=0.0, min_coverage_mm=None)
    # an untilted series passes a zero limit
    assert load_ct_series(_ramp_series(tmp_path / "flat"), max_tilt_deg=0.0).gantry_tilt_deg == 0


# --------------------------------------------------------------------------------------------
# Decoders and HU: GDCM (SimpleITK) and pydicom, transfer syntaxes, Enhanced CT

RESCALES = ((1.0, -1024.0), (0.3, -1000.7), (2.0, -1000.0), (1.0, -1024.5))


def _rescaled_series(
    directory: Path, n: int = 12, *, jpeg: bool = False
) -> tuple[list[Path], np.ndarray]:
    """Slices 2.5 mm apart with a different RescaleSlope/Intercept (some non-integer) each,
    uncompressed or JPEG Lossless.

    Returns the files (shuffled) and the expected HU: stored × slope + intercept in float64,
    rounded to float32, clipped at -1024.
    """
    directory.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    rng = np.random.default_rng(1)
    paths, expected = [], []
    for k in range(n):
        slope, intercept = RESCALES[k % len(RESCALES)]
        hu = rng.uniform(-1200.0, 2000.0, size=(16, 20))
        path = _write_slice(
            directory / f"{k}.dcm",
            hu,
            position=(0.0, 0.0, 2.5 * k),
            series_uid=series,
            study_uid=study,
            slope=slope,
            intercept=intercept,
        )
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.astype(np.float64)
        value = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        expected.append(np.maximum(value.astype(np.float32), np.float32(HU_AIR)))
        if jpeg:
            _to_jpeg_lossless(path)
        paths.append(path)
    random.Random(11).shuffle(paths)
    return paths, np.stack(expected)


def _to_enhanced(
    paths: Sequence[Path],
    out: Path,
    *,
    sop_class: UID = EnhancedCTImageStorage,
    shared_geometry: bool = True,
) -> Path:
    """Writes the single-frame slices ``paths`` as one multi-frame Enhanced CT object.

    Frames keep the order of ``paths``. Each frame has its own Plane Position and Pixel Value
    Transformation (rescale) groups; Plane Orientation and Pixel Measures are shared groups
    (or per-frame ones with ``shared_geometry=False``). No top-level geometry or rescale.
    """
    slices = [pydicom.dcmread(p) for p in paths]
    first = slices[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = first.SeriesInstanceUID
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(slices)
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1

    def orientation() -> Dataset:
        item = Dataset()
        item.ImageOrientationPatient = first.ImageOrientationPatient
        return item

    def measures() -> Dataset:
        item = Dataset()
        item.PixelSpacing = first.PixelSpacing
        item.SliceThickness = first.SliceThickness
        return item

    shared = Dataset()
    if shared_geometry:
        shared.PlaneOrientationSequence = [orientation()]
        shared.PixelMeasuresSequence = [measures()]
    ds.SharedFunctionalGroupsSequence = [shared]
    groups = []
    for k, s in enumerate(slices):
        group = Dataset()
        position = Dataset()
        position.ImagePositionPatient = s.ImagePositionPatient
        group.PlanePositionSequence = [position]
        rescale = Dataset()
        rescale.RescaleSlope = s.RescaleSlope
        rescale.RescaleIntercept = s.RescaleIntercept
        rescale.RescaleType = "HU"
        group.PixelValueTransformationSequence = [rescale]
        content = Dataset()
        content.InStackPositionNumber = k + 1
        group.FrameContentSequence = [content]
        if not shared_geometry:
            group.PlaneOrientationSequence = [orientation()]
            group.PixelMeasuresSequence = [measures()]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.PixelData = np.stack([s.pixel_array for s in slices]).astype(np.int16).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def _same_volume(a: CTSeriesVolume, b: CTSeriesVolume) -> None:
    """Identical voxels and geometry."""
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(a.image), sitk.GetArrayViewFromImage(b.image)
    )
    assert a.image.GetSize() == b.image.GetSize()
    assert a.image.GetSpacing() == pytest.approx(b.image.GetSpacing())
    assert a.image.GetOrigin() == pytest.approx(b.image.GetOrigin())
    assert a.image.GetDirection() == pytest.approx(b.image.GetDirection())
    assert (a.n_slices, a.StudyInstanceUID, a.SeriesInstanceUID) == (
        b.n_slices,
        b.StudyInstanceUID,
        b.SeriesInstanceUID,
    )


@pytest.mark.parametrize("jpeg", [False, True])
def test_hu_are_rounded_once_by_both_decoders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jpeg: bool
) -> None:
    paths, expected = _rescaled_series(tmp_path, n=40, jpeg=jpeg)
    gdcm_reads: list[int] = []
    gdcm_series = ct_decode._gdcm_series

    def counting(run: Sequence[object], block: np.ndarray) -> bool:
        gdcm_reads.append(len(run))
        return gdcm_series(run, block)  # type: ignore[arg-type]

    monkeypatch.setattr(ct_decode, "_gdcm_series", counting)
    for decoder in ("gdcm", "pydicom"):
        for workers in (1, 3):
            gdcm_reads.clear()
            volume = load_ct_series(paths, decoder=decoder, workers=workers)  # type: ignore[arg-type]
            np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), expected)
            # GDCM reads JPEG Lossless only, in runs of up to 16 files
            uses_gdcm = jpeg and decoder == "gdcm"
            assert sorted(gdcm_reads) == ([8, 16, 16] if uses_gdcm else []), (decoder, workers)


@pytest.mark.parametrize("jpeg", [False, True])
@pytest.mark.parametrize("decoder", ["gdcm", "pydicom"])
def test_pixel_padding_becomes_air(tmp_path: Path, jpeg: bool, decoder: str) -> None:
    """PixelPaddingValue 24 (HU -1000 with intercept -1024) is set to -1024 HU."""
    paths = _ramp_series(tmp_path, n=8)
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.copy()
        stored[:4] = 24  # padding rows
        stored[4, 0] = 25  # -999 HU: kept
        ds.PixelData = stored.tobytes()
        ds.PixelPaddingValue = 24
        ds["PixelPaddingValue"].VR = "SS"
        ds.save_as(path)
        if jpeg:
            _to_jpeg_lossless(path)
    volume = load_ct_series(paths, decoder=decoder)  # type: ignore[arg-type]
    array = sitk.GetArrayViewFromImage(volume.image)
    assert np.all(array[:, :4] == HU_AIR)
    assert np.all(array[:, 4, 0] == -999.0)
    np.testing.assert_array_equal(array[:, 16, 16], 10.0 * np.arange(8))


def test_gdcm_fallbacks_give_the_same_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, expected = _rescaled_series(tmp_path, jpeg=True)
    monkeypatch.setattr(ct_decode, "_gdcm_series", lambda run, block: False)  # file by file
    array = sitk.GetArrayFromImage(load_ct_series(paths).image)
    np.testing.assert_array_equal(array, expected)
    monkeypatch.setattr(ct_decode, "_gdcm_file", lambda item, out: False)  # pydicom
    array = sitk.GetArrayFromImage(load_ct_series(paths).image)
    np.testing.assert_array_equal(array, expected)


def test_truncated_pixel_data_is_an_error(tmp_path: Path) -> None:
    """GDCM would read short native pixel data without complaint; pydicom refuses it."""
    paths = _ramp_series(tmp_path, n=8)
    ds = pydicom.dcmread(paths[2])  # spatial (sorted) slice 2
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[2])
    with pytest.raises(CorruptSliceError, match=r"sorted slice 2 cannot be decoded \(Explicit VR"):
        load_ct_series(paths)


def test_malformed_rle_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """GDCM's RLE decoder dies with SIGFPE on this fragment; pydicom decodes RLE instead."""
    paths = _ramp_series(tmp_path, n=8)
    ds = pydicom.dcmread(paths[7])  # sorted slice 7
    ds.compress(RLELossless)
    ds.PixelData = encapsulate([bytes(64)])  # an RLE header with no segments
    ds.save_as(paths[7])
    with pytest.raises(CorruptSliceError, match=r"sorted slice 7 cannot be decoded \(RLE Lossless"):
        load_ct_series(paths)


@pytest.mark.parametrize(
    "sop_class", [EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage]
)
@pytest.mark.parametrize("shared_geometry", [True, False])
def test_enhanced_ct_equals_its_single_frame_series(
    tmp_path: Path, sop_class: UID, shared_geometry: bool
) -> None:
    paths, expected = _rescaled_series(tmp_path / "single")
    single = load_ct_series(paths)
    enhanced_path = _to_enhanced(
        paths, tmp_path / "enhanced.dcm", sop_class=sop_class, shared_geometry=shared_geometry
    )
    enhanced = load_ct_series([enhanced_path])
    _same_volume(enhanced, single)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(enhanced.image), expected)
    assert enhanced.image.GetSpacing() == pytest.approx((1.0, 1.0, 2.5))


def test_enhanced_ct_with_a_missing_and_tilted_frame_layout(tmp_path: Path) -> None:
    """Frames from a tilted series with one slice left out: same volume as the files."""
    paths = _tilted_sphere_series(tmp_path / "single", 20.0, n=16)
    del paths[7]
    random.Random(2).shuffle(paths)
    enhanced = load_ct_series([_to_enhanced(paths, tmp_path / "enhanced.dcm")])
    _same_volume(enhanced, load_ct_series(paths))
    assert enhanced.n_slices == 15
    assert enhanced.image.GetSize()[2] == 16
    assert enhanced.gantry_tilt_deg == pytest.approx(20.0)


def test_enhanced_ct_supplemental_file_loads(tmp_path: Path) -> None:
    path = pydicom_file("eCT_Supplemental.dcm")  # 2 frames 10 mm apart, RescaleType US
    with pytest.raises(IncompleteSeriesError, match="has 2 image slice.s.; at least 8"):
        load_ct_series([path])
    volume = load_ct_series([path], min_slices=1)
    assert volume.n_slices == 2
    image = volume.image
    assert image.GetSize() == (512, 512, 2)
    assert image.GetSpacing() == pytest.approx((0.388672, 0.388672, 10.0))
    assert image.GetDirection() == pytest.approx(np.eye(3).ravel())  # LPS
    # Rows run towards -x (right) in the file; LPS reorientation flips x.
    assert image.GetOrigin() == pytest.approx((99.5 - 511 * 0.388672, -301.5, -159.0))
    stored = pixel_array(pydicom.dcmread(path)).astype(np.float32)  # frames at z -159, -149
    expected = np.maximum(stored[:, :, ::-1] - 1024.0, np.float32(HU_AIR))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), expected)
    assert volume.coverage_mm == pytest.approx(20.0)


# The 693 slice: lossless files (UNCR and its re-encodings) must match UNCR exactly; the lossy
# J2KI matches the decoded-lossy reference UNCI exactly and UNCR only roughly.
_SYNTAXES_TO_WRITE = (
    JPEGLosslessSV1,  # GDCM's encoder; the syntax GDCM decodes in load_ct_series
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)


def _reencode(source: Path, syntax: UID, directory: Path) -> Path:
    """``source`` written in another transfer syntax (pydicom's encoders, GDCM's for JPEG
    Lossless)."""
    ds = pydicom.dcmread(source)
    out = directory / f"{source.stem}_{syntax.name.split()[0]}_{syntax[-4:]}.dcm"
    if syntax == JPEGLosslessSV1:
        ds.save_as(out, enforce_file_format=True)
        _to_jpeg_lossless(out)
    elif syntax.is_compressed:
        ds.compress(syntax)
        ds.save_as(out, enforce_file_format=True)
    elif syntax == ExplicitVRBigEndian:
        stored = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
        dcmwrite(out, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(out, enforce_file_format=True)
    assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return out


def _slice_hu(path: Path, decoder: str) -> np.ndarray:
    volume = load_ct_series([path], min_slices=1, decoder=decoder)  # type: ignore[arg-type]
    assert volume.n_slices == 1
    return sitk.GetArrayFromImage(volume.image)[0]


def _reference_hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.maximum(hu.astype(np.float32), np.float32(HU_AIR))


@pytest.mark.parametrize("decoder", ["gdcm", "pydicom"])
@pytest.mark.parametrize("name", ["693_UNCR.dcm", "CT_small.dcm"])
def test_lossless_transfer_syntaxes_give_identical_hu(
    tmp_path: Path, name: str, decoder: str
) -> None:
    source = pydicom_file(name)
    reference = _reference_hu(source)
    files = [source] + [_reencode(source, syntax, tmp_path) for syntax in _SYNTAXES_TO_WRITE]
    if name == "693_UNCR.dcm":
        files.append(pydicom_file("693_J2KR.dcm"))  # JPEG 2000 lossless, as shipped
    for path in files:
        np.testing.assert_array_equal(_slice_hu(path, decoder), reference, err_msg=path.name)


@pytest.mark.parametrize("decoder", ["gdcm", "pydicom"])
def test_lossy_jpeg2000_gives_hu_within_tolerance(decoder: str) -> None:
    lossy = _slice_hu(pydicom_file("693_J2KI.dcm"), decoder)
    np.testing.assert_array_equal(lossy, _reference_hu(pydicom_file("693_UNCI.dcm")))
    lossless = _reference_hu(pydicom_file("693_UNCR.dcm"))
    error = np.abs(lossy - lossless)
    assert float(np.median(error)) <= 25.0  # a strongly compressed file: ~17 HU median
    assert float(np.mean(error)) <= 50.0
    assert np.corrcoef(lossy.ravel(), lossless.ravel())[0, 1] > 0.98


# --------------------------------------------------------------------------------------------
# Resampling, mask, crop


def test_resample_isotropic_spacing_extent_and_background() -> None:
    ramp = np.broadcast_to(np.arange(10, dtype=np.int16)[:, None, None], (10, 20, 30))
    image = sitk.GetImageFromArray(np.ascontiguousarray(ramp))  # HU = slice index
    image.SetSpacing((0.5, 0.5, 2.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    out = resample_isotropic(image, 1.0)
    assert out.GetPixelID() == sitk.sitkFloat32
    assert out.GetSpacing() == (1.0, 1.0, 1.0)
    assert out.GetOrigin() == pytest.approx((1.0, 2.0, 3.0))
    assert out.GetSize() == (15, 10, 19)  # floor(extent / 1 mm) + 1
    array = sitk.GetArrayViewFromImage(out)
    np.testing.assert_allclose(array[:, 5, 5], np.arange(19) / 2.0, atol=1e-5)  # linear
    assert resample_isotropic(image, 2.0).GetSpacing() == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="positive"):
        resample_isotropic(image, 0.0)


def test_resample_fills_outside_with_air() -> None:
    image = sitk.GetImageFromArray(np.zeros((4, 4, 4), dtype=np.float32))
    direction = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.6], [0.0, 0.0, 0.8]])  # sheared
    image.SetDirection(direction.ravel().tolist())
    array = sitk.GetArrayFromImage(resample_isotropic(image))
    assert array.max() == 0.0
    assert array.min() == HU_AIR


def _phantom(shape: tuple[int, int, int] = (60, 80, 80)) -> np.ndarray:
    """float32 (z, y, x) HU: a water ball with a skull, an air pocket and a touching table."""
    z, y, x = np.indices(shape)
    r = np.sqrt((z - 30) ** 2 + (y - 38) ** 2 + (x - 40) ** 2)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r < 26] = 1000.0  # skull
    hu[r < 23] = 35.0  # brain
    hu[(r < 5) & (y < 38)] = -1000.0  # a sinus-like air pocket inside
    hu[:, 63:65, 5:75] = 300.0  # a 2 mm plate below the head, touching it
    return hu


def test_head_mask_drops_table_and_fills_holes() -> None:
    hu = _phantom()
    mask = head_mask(hu)
    assert mask.dtype == np.bool_
    assert mask.shape == hu.shape
    z, y, x = np.indices(hu.shape)
    r = np.sqrt((z - 30) ** 2 + (y - 38) ** 2 + (x - 40) ** 2)
    assert mask[r < 25].all()  # the head, its air pocket included
    assert not mask[:, 63:65, :20].any()  # the plate, away from where it touches the head
    assert not mask[:, 63:65, 60:].any()
    assert mask.sum() < (r < 27).sum()


def test_head_mask_of_small_objects_and_empty_images() -> None:
    hu = np.full((10, 10, 10), -1000.0, dtype=np.float32)
    assert not head_mask(hu).any()
    hu[4:6, 4:6, 4:6] = 40.0  # too small for the opening: still found
    hu[0, 0, 0] = 40.0
    mask = head_mask(hu)
    assert mask.sum() == 8
    assert mask[4:6, 4:6, 4:6].all()


def test_crop_to_head_box_margin_and_edges() -> None:
    hu = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    mask = np.zeros(hu.shape, dtype=bool)
    mask[3:6, 0:4, 5:13] = True
    cropped, cropped_mask, start = crop_to_head(hu, mask, margin_vox=2)
    assert start == (1, 0, 3)
    assert cropped.shape == cropped_mask.shape == (7, 6, 11)
    np.testing.assert_array_equal(cropped, hu[1:8, 0:6, 3:14])
    assert cropped_mask.sum() == mask.sum()
    with pytest.raises(PreprocessError, match="no head"):
        crop_to_head(hu, np.zeros(hu.shape, dtype=bool))
    with pytest.raises(ValueError, match="same"):
        crop_to_head(hu, mask[1:])


def test_prepare_head_ct_on_a_synthetic_series(tmp_path: Path) -> None:
    phantom = _phantom((40, 80, 80))
    series, study = generate_uid(), generate_uid()
    paths = [
        _write_slice(
            tmp_path / f"{k}.dcm",
            phantom[k // 2],  # 0.5 mm slices of a 1 mm phantom
            position=(0.0, 0.0, 0.5 * k),
            series_uid=series,
            study_uid=study,
        )
        for k in range(80)
    ]
    with pytest.raises(IncompleteSeriesError, match=r"covers 40\.0 mm .* at least 90 mm"):
        prepare_head_ct(paths)  # HEAD_MIN_COVERAGE_MM
    assert HEAD_MIN_COVERAGE_MM == 90.0
    head = prepare_head_ct(paths, min_coverage_mm=None)
    assert isinstance(head, HeadCT)
    assert head.spacing_mm == (1.0, 1.0, 1.0)
    assert head.hu.dtype == np.float32
    assert head.hu.shape == head.head_mask.shape
    z0, y0, x0 = head.crop_start
    dz, dy, dx = head.hu.shape
    full = sitk.GetArrayViewFromImage(head.resampled)
    np.testing.assert_array_equal(head.hu, full[z0 : z0 + dz, y0 : y0 + dy, x0 : x0 + dx])
    assert head.hu.shape[2] < 60  # the plate (x 5..74) is cropped away
    assert (head.StudyInstanceUID, head.SeriesInstanceUID) == (study, series)


# --------------------------------------------------------------------------------------------
# Windows and transforms


def test_window_presets() -> None:
    assert WindowPreset.brain.hu_range == (0.0, 80.0)
    assert WindowPreset.subdural.hu_range == (-32.5, 182.5)
    assert WindowPreset.stroke.hu_range == (20.0, 60.0)
    assert WindowPreset.bone.hu_range == (-800.0, 2000.0)
    assert (WindowPreset.bone.level, WindowPreset.bone.width) == (600.0, 2800.0)


def test_clip_and_scale_hu_numpy_and_torch() -> None:
    transform = ClipAndScaleHU(-15.0, 100.0)
    hu = np.array([-1000.0, -15.0, 42.5, 100.0, 3000.0])
    expected = np.array([-1.0, -1.0, 0.0, 1.0, 1.0], dtype=np.float32)
    out = transform(hu)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    tensor = transform(torch.tensor(hu, dtype=torch.float64))
    assert isinstance(tensor, torch.Tensor)
    assert tensor.dtype == torch.float32
    assert transform(torch.tensor([-2000, 2000], dtype=torch.int16)).tolist() == [-1.0, 1.0]
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-6)
    meta = transform(MetaTensor(torch.tensor(hu), meta={"spacing": (1.0, 1.0, 1.0)}))
    assert isinstance(meta, MetaTensor)
    assert meta.meta["spacing"] == (1.0, 1.0, 1.0)
    brain = ClipAndScaleHU.from_window(WindowPreset.brain)
    np.testing.assert_allclose(brain(np.array([0.0, 40.0, 80.0])), [-1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="below"):
        ClipAndScaleHU(100.0, 100.0)


def test_clip_and_scale_hu_dict() -> None:
    data = {IMAGE_KEY: np.array([[-15.0, 100.0]]), "label": np.array([[0, 1]])}
    out = ClipAndScaleHUd(IMAGE_KEY, lo=-15.0, hi=100.0)(data)
    np.testing.assert_allclose(out[IMAGE_KEY], [[-1.0, 1.0]])
    np.testing.assert_array_equal(out["label"], [[0, 1]])
    np.testing.assert_array_equal(data[IMAGE_KEY], [[-15.0, 100.0]])  # input untouched
    with pytest.raises(KeyError):
        ClipAndScaleHUd("missing", lo=0.0, hi=1.0)(data)
    assert ClipAndScaleHUd("missing", lo=0.0, hi=1.0, allow_missing_keys=True)(data).keys() == {
        IMAGE_KEY,
        "label",
    }


# --------------------------------------------------------------------------------------------
# The real series (CQ500, 238 slices, JPEG Lossless process 14, 8.5° gantry tilt)


@pytest.fixture(scope="module")
def real_paths(cq500_dir: Path) -> list[Path]:
    return sorted(cq500_dir.glob("*.dcm"))


@pytest.fixture(scope="module")
def real_volume(real_paths: list[Path]) -> CTSeriesVolume:
    return load_ct_series(real_paths)


@pytest.fixture(scope="module")
def real_head(real_paths: list[Path]) -> HeadCT:
    shuffled = list(real_paths)
    random.Random(7).shuffle(shuffled)
    return prepare_head_ct(shuffled)


@pytest.mark.realdata
def test_real_series_loads(real_volume: CTSeriesVolume) -> None:
    assert real_volume.n_slices == 238
    image = real_volume.image
    # One slice (instance 237) is missing: it is interpolated onto the regular 0.625 mm grid.
    assert image.GetSize() == (512, 512, 239)
    assert image.GetSpacing() == pytest.approx((0.443359, 0.443359, 0.625))
    assert image.GetPixelID() == sitk.sitkFloat32
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        image.GetDirection()
    )
    assert orientation == "LPS"


@pytest.mark.realdata
@pytest.mark.slow
def test_real_series_matches_simpleitk(real_paths: list[Path], real_volume: CTSeriesVolume) -> None:
    """Same HU as SimpleITK/GDCM on every source slice (padding clipped to -1024 HU)."""
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    positions = np.array(
        [pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient for p in real_paths]
    )
    order = np.argsort(positions[:, 2])
    reader.SetFileNames([str(real_paths[i]) for i in order])
    reference = np.maximum(sitk.GetArrayFromImage(reader.Execute()), HU_AIR)
    slots = np.rint((positions[order, 2] - positions[order[0], 2]) / 0.625).astype(int)
    ours = sitk.GetArrayViewFromImage(real_volume.image)[slots]
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.realdata
def test_real_head_is_isotropic_and_order_independent(
    real_volume: CTSeriesVolume, real_head: HeadCT
) -> None:
    assert real_head.spacing_mm == (1.0, 1.0, 1.0)
    assert real_head.resampled.GetSpacing() == (1.0, 1.0, 1.0)
    assert real_head.hu.dtype == np.float32
    assert real_head.head_mask.shape == real_head.hu.shape
    from_sorted = sitk.GetArrayFromImage(resample_isotropic(real_volume.image))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(real_head.resampled), from_sorted)


@pytest.mark.realdata
def test_real_head_hu_are_plausible(real_head: HeadCT) -> None:
    full = sitk.GetArrayViewFromImage(real_head.resampled)
    assert -1030.0 <= float(np.median(full[:, :10, :10])) <= -950.0  # air in a corner
    dz, dy, dx = real_head.hu.shape
    brain = real_head.hu[int(0.6 * dz) - 8 : int(0.6 * dz) + 8, dy // 2 - 10 : dy // 2 + 10]
    brain = brain[:, :, dx // 2 - 10 : dx // 2 + 10]
    assert 20.0 <= float(np.median(brain)) <= 45.0
    assert 1500 < real_head.head_mask.sum() / 1000 < 4500  # head volume in ml


@pytest.mark.realdata
def test_real_crop_holds_the_head_and_little_air(real_head: HeadCT) -> None:
    full = sitk.GetArrayViewFromImage(real_head.resampled)
    whole_mask = head_mask(full)
    assert real_head.head_mask.sum() == whole_mask.sum()  # nothing of the head is cut off
    z0, y0, x0 = real_head.crop_start
    dz, dy, dx = real_head.hu.shape
    np.testing.assert_array_equal(real_head.hu, full[z0 : z0 + dz, y0 : y0 + dy, x0 : x0 + dx])
    air = full < -500.0
    air_in_crop = air[z0 : z0 + dz, y0 : y0 + dy, x0 : x0 + dx].sum()
    assert air_in_crop / air.sum() < 0.5
    assert real_head.hu.size < 0.6 * full.size


@pytest.mark.realdata
def test_real_series_geometry_facts(real_paths: list[Path], real_volume: CTSeriesVolume) -> None:
    assert real_volume.gantry_tilt_deg == pytest.approx(8.5, abs=0.1)
    assert 140.0 < real_volume.coverage_mm < 150.0
    with pytest.raises(GantryTiltError, match=r"gantry tilt of 8\.5 degrees"):
        load_ct_series(real_paths, max_tilt_deg=5.0)  # refused before any decoding


@pytest.mark.realdata
def test_real_series_file_order_and_threads_do_not_matter(
    real_paths: list[Path], real_volume: CTSeriesVolume
) -> None:
    shuffled = list(real_paths)
    random.Random(13).shuffle(shuffled)
    _same_volume(load_ct_series(shuffled), real_volume)
    _same_volume(load_ct_series(list(reversed(real_paths)), workers=1), real_volume)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_series_pydicom_decoder_matches_gdcm(
    real_paths: list[Path], real_volume: CTSeriesVolume
) -> None:
    """pylibjpeg (through pydicom) and GDCM decode the JPEG lossless series identically."""
    _same_volume(load_ct_series(real_paths, decoder="pydicom"), real_volume)
