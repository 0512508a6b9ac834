"""Tests of the demo studies: synthetic head CT phantoms and the real demo radiograph."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from triage.demo.phantom import (
    HeadPhantom,
    PhantomSpec,
    head_ct_phantom,
    head_ct_volume,
    phantom_uids,
    write_head_ct_series,
)
from triage.demo.xray import demo_radiograph_paths, write_demo_radiograph

WHEN = datetime(2024, 5, 17, 9, 30, 0)


@pytest.fixture(scope="module")
def normal() -> HeadPhantom:
    return head_ct_phantom(PhantomSpec(seed=0))


@pytest.fixture(scope="module")
def iph() -> HeadPhantom:
    return head_ct_phantom(PhantomSpec(haemorrhage=True, kind="iph", seed=1))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomSpec, list[Path]]:
    spec = PhantomSpec(haemorrhage=True, seed=3)
    out = tmp_path_factory.mktemp("phantom")
    return spec, write_head_ct_series(out, spec, study_datetime=WHEN)


def _read_sorted(paths: list[Path]) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in paths]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


# ---- volumes ---------------------------------------------------------------------------------


def test_volume_shape_dtype_spacing(normal: HeadPhantom) -> None:
    spec = normal.spec
    assert normal.hu.shape == (spec.slices, spec.rows, spec.columns)
    assert normal.hu.dtype == np.int16
    assert normal.spacing_mm == (
        spec.slice_thickness_mm,
        spec.pixel_spacing_mm,
        spec.pixel_spacing_mm,
    )
    assert 32 <= spec.slices <= 64
    hu, spacing = head_ct_volume(spec)
    np.testing.assert_array_equal(hu, normal.hu)
    assert spacing == normal.spacing_mm


def test_anatomy_hu_ranges(normal: HeadPhantom) -> None:
    hu = normal.hu
    # air outside the head (corners)
    assert np.median(hu[:, :10, :10]) < -950
    # bone present and dense
    assert np.count_nonzero(hu > 700) * normal.voxel_volume_ml > 100  # > 100 ml of bone
    # brain parenchyma: a large amount of tissue in 20..45 HU, centred near 30
    mid = hu[hu.shape[0] // 2]
    brain = mid[(mid > 15) & (mid < 50)]
    assert brain.size * normal.spacing_mm[1] ** 2 > 8000  # > 80 cm^2 in the mid slice
    assert 26 <= float(np.median(brain)) <= 36
    # CSF (ventricles, sulci) exists
    assert np.count_nonzero((hu > -5) & (hu < 12)) > 1000
    # no blood-like tissue beyond noise in a normal: few voxels in 60-90 HU away from bone
    assert normal.bleed_volume_ml == 0.0
    assert not normal.bleed_mask.any()


def test_head_size_is_adult(normal: HeadPhantom) -> None:
    body = normal.hu > -300
    z = np.flatnonzero(body.any(axis=(1, 2)))
    widths_mm = [np.ptp(np.flatnonzero(body[k].any(axis=0))) * normal.spacing_mm[2] for k in z]
    lengths_mm = [np.ptp(np.flatnonzero(body[k].any(axis=1))) * normal.spacing_mm[1] for k in z]
    assert 140 <= max(widths_mm) <= 175
    assert 175 <= max(lengths_mm) <= 210
    # the head ends inside the field of view (air above the vertex)
    assert not body[-1].any()


def test_noise_level(normal: HeadPhantom) -> None:
    # difference of neighbouring pixels in white matter ~ noise (structure varies slowly)
    spec = PhantomSpec(seed=0, noise_hu=0.0)
    clean = head_ct_phantom(spec).hu.astype(np.float32)
    noise = normal.hu.astype(np.float32) - clean
    inside = (clean > 20) & (clean < 45)
    std = float(noise[inside].std())
    assert 2.5 <= std <= 5.0


def test_deterministic_per_seed(normal: HeadPhantom) -> None:
    again = head_ct_phantom(PhantomSpec(seed=0))
    np.testing.assert_array_equal(again.hu, normal.hu)
    other = head_ct_phantom(PhantomSpec(seed=1))
    assert not np.array_equal(other.hu, normal.hu)


@pytest.mark.parametrize(("kind", "volume_ml"), [("iph", 25.0), ("iph", 15.0), ("sdh", 30.0)])
def test_bleed_volume_matches_spec(kind: str, volume_ml: float) -> None:
    p = head_ct_phantom(PhantomSpec(haemorrhage=True, kind=kind, seed=2, bleed_volume_ml=volume_ml))
    assert p.bleed_volume_ml == pytest.approx(volume_ml, rel=0.1)
    blood = p.hu[p.bleed_mask].astype(np.float32)
    assert 58 <= float(np.median(blood)) <= 75  # acute blood
    if kind == "iph":
        assert p.oedema_mask.any()
        assert not (p.oedema_mask & p.bleed_mask).any()
        oedema = p.hu[p.oedema_mask].astype(np.float32)
        assert float(np.median(oedema)) < 26
        # in one hemisphere
        xs = np.nonzero(p.bleed_mask)[2]
        centre = (p.spec.columns - 1) / 2
        assert np.all(xs > centre) or np.all(xs < centre)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        PhantomSpec(kind="edh")
    with pytest.raises(ValueError, match="bleed_volume_ml"):
        PhantomSpec(bleed_volume_ml=500)


# ---- DICOM series ----------------------------------------------------------------------------


def test_series_is_valid_ct(series: tuple[PhantomSpec, list[Path]]) -> None:
    spec, paths = series
    assert len(paths) == spec.slices
    assert [p.name for p in paths] == [f"CT{i:04d}.dcm" for i in range(1, spec.slices + 1)]
    for ds in _read_sorted(paths):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage
        assert ds.Modality == "CT"
        assert ds.BodyPartExamined == "HEAD"
        assert ds.StudyDescription == "CT HEAD WO CONTRAST"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.Manufacturer == "triage-phantom"
        assert ds.PatientID == "PHANTOM-0003"
        assert str(ds.PatientName) == "PHANTOM^IPH"
        assert ds.StudyDate == "20240517" and ds.StudyTime == "093000"
        assert float(ds.WindowCenter) == 40 and float(ds.WindowWidth) == 80
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert ds.PixelRepresentation == 0 and ds.BitsAllocated == 16
        assert ds.ConvolutionKernel and ds.KVP and ds.SeriesDescription


def test_hu_round_trip_and_geometry(series: tuple[PhantomSpec, list[Path]]) -> None:
    spec, paths = series
    phantom = head_ct_phantom(spec)
    datasets = _read_sorted(paths)
    hu = np.stack(
        [
            ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in datasets
        ]
    )
    assert np.abs(hu - phantom.hu).max() <= 1
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    np.testing.assert_allclose(np.diff(z), spec.slice_thickness_mm, atol=1e-3)
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, spec.slices + 1))
    for ds in datasets:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [spec.pixel_spacing_mm] * 2
        assert float(ds.SliceThickness) == spec.slice_thickness_mm
        assert (ds.Rows, ds.Columns) == (spec.rows, spec.columns)
        x0, y0 = (float(v) for v in ds.ImagePositionPatient[:2])
        assert (x0, y0) == pytest.approx(phantom.origin_mm[:2], abs=1e-3)
        # the field of view is centred on the head
        assert x0 + (spec.columns - 1) / 2 * spec.pixel_spacing_mm == pytest.approx(0, abs=1e-3)


def test_uids_valid_unique_and_deterministic(
    series: tuple[PhantomSpec, list[Path]], tmp_path: Path
) -> None:
    spec, paths = series
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    sops = [ds.SOPInstanceUID for ds in datasets]
    assert len(set(sops)) == len(sops)
    for uid in [*sops, datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID]:
        assert uid.is_valid
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    # the same spec gives the same UIDs ...
    study, series_uid, sop_list = phantom_uids(spec)
    assert study == datasets[0].StudyInstanceUID
    assert series_uid == datasets[0].SeriesInstanceUID
    assert sop_list == sops
    # ... another spec, or a given study UID, gives different ones
    other = phantom_uids(PhantomSpec(haemorrhage=False, seed=3))
    assert other[0] != study and not set(other[2]) & set(sops)
    given = "1.2.826.0.1.3680043.8.498.12345"
    s2, se2, sops2 = phantom_uids(spec, StudyInstanceUID=given)
    assert s2 == given and se2 != series_uid and not set(sops2) & set(sops)
    written = write_head_ct_series(
        tmp_path, PhantomSpec(slices=32), StudyInstanceUID=given, patient_name="DEMO^A"
    )
    ds = pydicom.dcmread(written[0], stop_before_pixels=True)
    assert ds.StudyInstanceUID == given and str(ds.PatientName) == "DEMO^A"


def test_series_files_identical_across_runs(tmp_path: Path) -> None:
    spec = PhantomSpec(seed=5, slices=32)
    a = write_head_ct_series(tmp_path / "a", spec, study_datetime=WHEN)
    b = write_head_ct_series(tmp_path / "b", spec, study_datetime=WHEN)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


# ---- X-ray demo ------------------------------------------------------------------------------


def test_demo_radiograph_reads() -> None:
    paths = demo_radiograph_paths()
    assert len(paths) == 1 and paths[0].is_file()
    ds = pydicom.dcmread(paths[0])
    assert ds.Modality in ("CR", "DX")
    assert ds.pixel_array.ndim == 2


def test_write_demo_radiograph(tmp_path: Path) -> None:
    source = pydicom.dcmread(demo_radiograph_paths()[0])
    study = "1.2.826.0.1.3680043.8.498.777"
    (path,) = write_demo_radiograph(tmp_path / "x", StudyInstanceUID=study)
    ds = pydicom.dcmread(path)
    assert ds.Modality in ("CR", "DX")
    assert ds.StudyInstanceUID == study
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.PatientName != source.PatientName and ds.PatientID != source.PatientID
    assert "PatientBirthDate" not in ds and "InstitutionName" not in ds
    assert all(float(v) > 0 for v in ds.get("PixelSpacing", [1.0]))
    assert ds.PixelData == source.PixelData
    np.testing.assert_array_equal(ds.pixel_array, source.pixel_array)
    (again,) = write_demo_radiograph(tmp_path / "y")
    ds2 = pydicom.dcmread(again, stop_before_pixels=True)
    assert ds2.StudyInstanceUID != ds.StudyInstanceUID
    assert ds2.SOPInstanceUID != ds.SOPInstanceUID
