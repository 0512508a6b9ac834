"""Tests of head-CT preprocessing: synthetic series built here, plus the real CQ500 series."""

from __future__ import annotations

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
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from triage.preprocess.ct import (
    HU_AIR,
    IMAGE_KEY,
    ClipAndScaleHU,
    ClipAndScaleHUd,
    CTSeriesVolume,
    HeadCT,
    PreprocessError,
    WindowPreset,
    crop_to_head,
    head_mask,
    load_ct_series,
    prepare_head_ct,
    resample_isotropic,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# --------------------------------------------------------------------------------------------
# Synthetic series


def _write_slice(
    path: Path,
    hu: np.ndarray,
    *,
    position: Sequence[float],
    series_uid: str,
    study_uid: str,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    instance: int = 1,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> Path:
    """Writes one uncompressed CT slice whose HU are ``hu`` (float (rows, columns))."""
    stored = np.rint((hu - intercept) / slope).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp_series(
    directory: Path,
    n: int = 20,
    *,
    size: int = 32,
    spacing: float = 2.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    skip: Sequence[int] = (),
    **kwargs: object,
) -> list[Path]:
    """Axial slices k = 0..n-1 at z = 10 + k × spacing, each filled with HU 10 × k.

    File names and InstanceNumbers run against the spatial order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    paths = []
    for k in range(n):
        if k in skip:
            continue
        paths.append(
            _write_slice(
                directory / f"{series_uid[-6:]}_{n - k:03d}.dcm",
                np.full((size, size), 10.0 * k),
                position=(-16.0, -16.0, 10.0 + k * spacing),
                series_uid=series_uid,
                study_uid=study_uid,
                instance=n - k,
                **kwargs,  # type: ignore[arg-type]
            )
        )
    return paths


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


def test_missing_slices_are_rejected(tmp_path: Path) -> None:
    paths = _ramp_series(tmp_path, skip=(9, 10))  # a 3x gap
    with pytest.raises(PreprocessError, match=r"missing slices: gap of 6\.00 mm"):
        load_ct_series(paths)


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
        ("orientation", "inconsistent ImageOrientationPatient"),
        ("few", "at least 8"),
    ],
)
def test_inconsistent_series_are_rejected(tmp_path: Path, change: str, message: str) -> None:
    series, study = generate_uid(), generate_uid()
    n = 5 if change == "few" else 10
    _ramp_series(tmp_path, n=n, series_uid=series, study_uid=study)
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
    with pytest.raises(PreprocessError, match=message):
        load_ct_series(sorted(tmp_path.glob("*.dcm")))


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


def test_gantry_tilt_keeps_physical_positions(tmp_path: Path) -> None:
    """A sphere scanned with a 20° tilted gantry is resampled to its true place and shape."""
    series, study = generate_uid(), generate_uid()
    tilt = np.deg2rad(20.0)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    centre, radius, size = np.array([2.0, 3.0, 24.0]), 8.0, 48
    ij = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="xy"), axis=-1)
    paths = []
    for k in range(40):
        ipp = np.array([-24.0, -24.0, 4.0 + k * 1.0])  # the table moves along z only
        points = ipp + ij[..., :1] * row + ij[..., 1:] * col  # (rows, columns, 3) in mm
        inside = np.linalg.norm(points - centre, axis=-1) < radius
        hu = np.where(inside, 100.0, -1000.0)
        position = tuple(ipp)
        orientation = (*row, *col)
        paths.append(
            _write_slice(
                tmp_path / f"{k}.dcm",
                hu,
                position=position,
                orientation=orientation,
                series_uid=series,
                study_uid=study,
            )
        )
    resampled = resample_isotropic(load_ct_series(paths).image, 1.0)
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
    head = prepare_head_ct(paths)
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
