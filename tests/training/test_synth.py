"""Synthetic head CTs with haemorrhage and chest radiographs with pneumothorax
(``training.synth``): the dataset format, the lesions' volume, density and place, the masks'
geometry, determinism, and that the studies flow through the real preprocessing and router."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from tests.conftest import CHEST_MODEL, make_analyzer
from training.format import (
    FORMAT,
    HAEMORRHAGE,
    HAEMORRHAGE_SUBTYPES,
    LABEL_COLUMNS,
    LABELS_FILE,
    META_FILE,
    PNEUMOTHORAX,
)
from training.synth import (
    BLOOD_HU,
    SynthReport,
    SynthStudy,
    head_anatomy,
    insert_haemorrhage,
    insert_pneumothorax,
    lung_masks,
    synth_ct_dataset,
    synth_xray_dataset,
)
from training.synth.ct import OEDEMA_CLASS
from triage.analysis import SeriesFiles
from triage.analysis.analyzer import route_series
from triage.demo.phantom import PhantomSpec, head_ct_phantom
from triage.preprocess.ct import load_ct_series, prepare_head_ct
from triage.preprocess.head import head_mask
from triage.preprocess.xray import load_radiograph, prepare_radiograph

BLOOD_CLASSES = {1, 2, 4}


def _rows(dataset: Path) -> list[dict[str, str]]:
    with (dataset / LABELS_FILE).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _series(study: SynthStudy) -> SeriesFiles:
    return SeriesFiles(study.SeriesInstanceUID, list(study.files))


def _ct_and_mask(report: SynthReport, study: SynthStudy) -> tuple[sitk.Image, np.ndarray]:
    """The series as loaded by serving code, and its mask resampled onto that grid."""
    image = load_ct_series(list(study.files)).image
    assert study.mask is not None
    mask = sitk.ReadImage(str(report.dataset / study.mask))
    on_grid = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return image, sitk.GetArrayFromImage(on_grid)


# ---- head CT on the phantom (no ../shared needed) --------------------------------------------


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> SynthReport:
    """Ten small phantom studies: every subtype, two normals, patients with two studies."""
    out = tmp_path_factory.mktemp("synth-ct") / "ich"
    return synth_ct_dataset(
        out, n_studies=10, seed=11, base="phantom", size="small", normal_fraction=0.2
    )


def test_ct_dataset_follows_the_format(ct: SynthReport) -> None:
    meta = json.loads((ct.dataset / META_FILE).read_text())
    assert meta["format"] == FORMAT
    assert (meta["task"], meta["source"]) == ("haemorrhage", "synth")
    assert meta["base"]["kind"] == "phantom" and ct.base == "phantom"
    rows = _rows(ct.dataset)
    assert list(rows[0]) == list(LABEL_COLUMNS)
    assert [r["StudyInstanceUID"] for r in rows] == [s.uid for s in ct.studies]
    for row, study in zip(rows, ct.studies, strict=True):
        assert row["finding"] == HAEMORRHAGE
        assert row["label"] == ("0" if row["subtype"] == "normal" else "1")
        assert row["SeriesInstanceUID"] == study.SeriesInstanceUID
        assert (ct.dataset / row["mask"]).is_file()
        assert all(p.is_relative_to(ct.dataset / "dicom") for p in study.files)
    assert {r["subtype"] for r in rows} == {"normal", *HAEMORRHAGE_SUBTYPES}
    per_patient: dict[str, int] = {}
    for r in rows:
        per_patient[r["PatientID"]] = per_patient.get(r["PatientID"], 0) + 1
    assert max(per_patient.values()) == 2  # splitting by patient matters
    assert len(per_patient) < len(rows)


def test_mask_volume_is_the_labelled_volume_and_near_the_request(ct: SynthReport) -> None:
    rows = {r["StudyInstanceUID"]: r for r in _rows(ct.dataset)}
    for study in ct.studies:
        assert study.mask is not None
        mask = sitk.ReadImage(str(ct.dataset / study.mask))
        labels = sitk.GetArrayFromImage(mask)
        voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
        blood_ml = float(np.isin(labels, list(BLOOD_CLASSES)).sum()) * voxel_ml
        assert float(rows[study.uid]["volume_ml"]) == pytest.approx(blood_ml, abs=1e-3)
        if study.subtype == "normal":
            assert not labels.any()
        else:
            assert study.requested_ml is not None
            assert blood_ml == pytest.approx(study.requested_ml, rel=0.15)


def test_each_subtype_is_labelled_with_its_blast_ct_class(ct: SynthReport) -> None:
    for study in ct.studies:
        if study.subtype == "normal":
            continue
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ct.dataset / study.mask)))
        present = set(np.unique(labels).tolist()) - {0}
        expected = HAEMORRHAGE_SUBTYPES[study.subtype]
        assert expected in present
        assert present - {expected} <= (
            {OEDEMA_CLASS} if study.subtype == "intraparenchymal" else set()
        )


def test_lesion_hu_in_the_subtypes_range_and_the_mask_lines_up(ct: SynthReport) -> None:
    """Read back through serving code: the mask (NIfTI, resampled onto the series' grid) lies
    on blood-density voxels, clearly denser than the tissue just around it."""
    for study in ct.studies:
        if study.subtype == "normal":
            continue
        image, labels = _ct_and_mask(ct, study)
        hu = sitk.GetArrayFromImage(image)
        blood = labels == HAEMORRHAGE_SUBTYPES[study.subtype]
        lo, hi = BLOOD_HU[study.subtype]
        median = float(np.median(hu[blood]))
        assert lo - 8.0 <= median <= hi, (study.subtype, median)
        assert np.percentile(hu[blood], 90) <= hi + 10.0
        around = ndimage.binary_dilation(labels > 0, iterations=2) & (labels == 0)
        around &= (hu > -50) & (hu < 100)  # brain and CSF, not bone
        assert float(np.median(hu[around])) < median - 10.0, study.subtype


def test_lesions_lie_inside_the_skull(ct: SynthReport) -> None:
    for study in ct.studies:
        if study.subtype == "normal":
            continue
        image, labels = _ct_and_mask(ct, study)
        hu = sitk.GetArrayFromImage(image)
        lesion = labels > 0
        assert not (lesion & ~head_mask(hu)).any()  # nothing outside the head
        assert hu[lesion].max() < 150.0  # no bone in the mask
        for z in np.flatnonzero(lesion.any(axis=(1, 2))):
            # enclosed by the skull in its slice
            skull = ndimage.binary_closing(hu[z] > 300, iterations=3)
            assert not (lesion[z] & ~ndimage.binary_fill_holes(skull)).any(), (study.subtype, z)


def test_ct_series_is_valid_routed_and_prepared(ct: SynthReport, tmp_path: Path) -> None:
    study = next(s for s in ct.studies if s.subtype == "intraparenchymal")
    datasets = [pydicom.dcmread(p) for p in study.files]
    first = datasets[0]
    assert first.Modality == "CT" and first.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert first.BodyPartExamined == "HEAD"
    assert (first.StudyDescription, first.SeriesDescription) == ("CT HEAD", "HEAD WO")
    assert str(first.PatientName).startswith("SYNTH^")
    assert first.PatientID == study.PatientID
    assert 2.5 <= float(first.SliceThickness) <= 5.0
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, -1024.0)
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert {ds.SeriesInstanceUID for ds in datasets} == {study.SeriesInstanceUID}
    # the mask's geometry is the series'
    mask = sitk.ReadImage(str(ct.dataset / study.mask))
    image = load_ct_series(list(study.files)).image
    assert mask.GetSize() == image.GetSize()
    assert np.allclose(mask.GetSpacing(), image.GetSpacing())
    assert np.allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.allclose(mask.GetDirection(), image.GetDirection())
    # the real preprocessing and router take it
    head = prepare_head_ct(list(study.files))
    assert head.hu.shape[0] > 100 and head.head_mask.any()
    decision, files = route_series([_series(study)], make_analyzer(tmp_path).registry)
    (run,) = decision.runs
    assert run.model == "blast-ct-v1"
    assert run.series is not None and files[run.series.SeriesInstanceUID].paths == list(study.files)


def test_small_size_is_a_small_grid(ct: SynthReport) -> None:
    ds = pydicom.dcmread(ct.studies[0].files[0], stop_before_pixels=True)
    assert (ds.Rows, ds.Columns, len(ct.studies[0].files)) == (128, 128, 30)
    assert float(ds.PixelSpacing[0]) == pytest.approx(1.8)


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    def make(name: str, seed: int) -> SynthReport:
        return synth_ct_dataset(
            tmp_path / name,
            n_studies=3,
            seed=seed,
            subtypes=["subdural", "intraventricular"],
            base="phantom",
            size="small",
            normal_fraction=0.0,
        )

    a, b, c = make("a", 4), make("b", 4), make("c", 5)
    for sa, sb in zip(a.studies, b.studies, strict=True):
        assert sa.uid == sb.uid and sa.volume_ml == sb.volume_ml
        assert [p.read_bytes() for p in sa.files] == [p.read_bytes() for p in sb.files]
        assert (a.dataset / sa.mask).read_bytes() == (b.dataset / sb.mask).read_bytes()
    assert a.studies[0].uid != c.studies[0].uid
    pixels_a = pydicom.dcmread(a.studies[0].files[10]).PixelData
    assert pixels_a != pydicom.dcmread(c.studies[0].files[10]).PixelData


def test_full_size_phantom_is_routed_and_prepared(tmp_path: Path) -> None:
    report = synth_ct_dataset(
        tmp_path / "full",
        n_studies=1,
        seed=2,
        subtypes=["epidural"],
        volumes_ml=[10],
        normal_fraction=0.0,
        base="phantom",
    )
    (study,) = report.studies
    ds = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (256, 256)
    assert study.volume_ml == pytest.approx(10.0, rel=0.15)
    prepare_head_ct(list(study.files))
    decision, _ = route_series([_series(study)], make_analyzer(tmp_path).registry)
    assert [r.model for r in decision.runs] == ["blast-ct-v1"]


def test_insert_haemorrhage_on_a_phantom_volume() -> None:
    p = head_ct_phantom(
        PhantomSpec(
            seed=8, rows=128, columns=128, pixel_spacing_mm=1.8, slice_thickness_mm=5.0, slices=30
        )
    )
    anatomy = head_anatomy(p.hu, p.spacing_mm)
    assert anatomy.intracranial.sum() * np.prod(p.spacing_mm) / 1000 > 800  # adult brain, ml
    assert anatomy.ventricles.any()
    for subtype in HAEMORRHAGE_SUBTYPES:
        lesion = insert_haemorrhage(
            p.hu, p.spacing_mm, subtype, 5.0, np.random.default_rng(1), anatomy=anatomy
        )
        assert lesion.volume_ml == pytest.approx(5.0, rel=0.15)
        assert not (lesion.labels.astype(bool) & ~anatomy.intracranial).any()
        # partial volume reaches at most two voxels beyond the labelled ones
        untouched = ndimage.binary_dilation(lesion.labels > 0, iterations=2)
        assert np.array_equal(lesion.hu[~untouched], p.hu[~untouched].astype(np.float32))


def test_ct_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_studies"):
        synth_ct_dataset(tmp_path, n_studies=0, seed=0, base="phantom")
    with pytest.raises(ValueError, match="subtypes"):
        synth_ct_dataset(tmp_path, n_studies=1, seed=0, subtypes=["chronic"], base="phantom")
    with pytest.raises(ValueError, match="volumes_ml"):
        synth_ct_dataset(tmp_path, n_studies=1, seed=0, volumes_ml=[500], base="phantom")
    with pytest.raises(FileNotFoundError):
        synth_ct_dataset(tmp_path, n_studies=1, seed=0, base="cq500", shared_dir=tmp_path)


def test_auto_base_is_the_phantom_without_shared_data(tmp_path: Path) -> None:
    report = synth_ct_dataset(
        tmp_path / "d", n_studies=1, seed=0, base="auto", shared_dir=tmp_path, size="small"
    )
    assert report.base == "phantom"


# ---- head CT on the real CQ500 series ---------------------------------------------------------


@pytest.mark.realdata
def test_cq500_base_keeps_attribution_and_lesion_properties(
    cq500_dir: Path, tmp_path: Path
) -> None:
    report = synth_ct_dataset(
        tmp_path / "cq",
        n_studies=3,
        seed=1,
        subtypes=["intraparenchymal", "subarachnoid", "intraventricular"],
        volumes_ml=[10],
        normal_fraction=0.0,
        base="auto",
        shared_dir=cq500_dir.parents[1],
        size="small",
    )
    assert report.base == "cq500"
    meta = json.loads((report.dataset / META_FILE).read_text())
    assert "CC BY-NC-SA" in meta["base"]["licence"] and "Chilamkurthy" in meta["base"]["citation"]
    for study in report.studies:
        assert study.volume_ml == pytest.approx(10.0, rel=0.15)
        image, labels = _ct_and_mask(report, study)
        hu = sitk.GetArrayFromImage(image)
        lo, hi = BLOOD_HU[study.subtype]
        assert lo - 8.0 <= float(np.median(hu[labels == HAEMORRHAGE_SUBTYPES[study.subtype]])) <= hi
    prepare_head_ct(list(report.studies[0].files))


# ---- the real haemorrhage model on a synthetic bleed ------------------------------------------


@pytest.mark.slow
@pytest.mark.realdata
def test_pretrained_model_sees_a_synthetic_intraparenchymal_bleed(
    weights_mirror: Path, tmp_path: Path
) -> None:
    """BLAST-CT (one member, CPU) through ``Analyzer`` on a small 25 ml phantom IPH (~30 s)."""
    report = synth_ct_dataset(
        tmp_path / "iph",
        n_studies=1,
        seed=0,
        subtypes=["intraparenchymal"],
        volumes_ml=[25],
        normal_fraction=0.0,
        base="phantom",
        size="small",
    )
    (study,) = report.studies
    analyzer = make_analyzer(tmp_path / "cache", weights_mirror, models=["blast-ct-v1"])
    result = analyzer.analyze(study.uid, [_series(study)])
    assert result.ai_status.value == "ok", result.error
    (finding,) = result.findings
    assert finding.details["blood_volume_ml"] > 5.0


# ---- chest radiographs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xr(tmp_path_factory: pytest.TempPathFactory) -> SynthReport:
    out = tmp_path_factory.mktemp("synth-xr") / "ptx"
    return synth_xray_dataset(out, n_studies=4, seed=3, prevalence=0.5, size="small")


def test_xray_dataset_follows_the_format(xr: SynthReport) -> None:
    meta = json.loads((xr.dataset / META_FILE).read_text())
    assert (meta["format"], meta["task"], meta["source"]) == (FORMAT, "chest", "synth")
    assert meta["base"]["images"]  # attribution of every base image used
    rows = _rows(xr.dataset)
    assert list(rows[0]) == list(LABEL_COLUMNS)
    assert {r["finding"] for r in rows} == {PNEUMOTHORAX}
    assert sorted(r["label"] for r in rows) == ["0", "0", "1", "1"]
    for row, study in zip(rows, xr.studies, strict=True):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(xr.dataset / row["mask"])))
        ds = pydicom.dcmread(study.files[0])
        assert mask.shape == (ds.Rows, ds.Columns)
        assert bool(mask.any()) == (row["label"] == "1")
        assert row["subtype"] == ("pneumothorax" if row["label"] == "1" else "normal")


def test_radiographs_are_routed_to_the_chest_model_and_prepared(
    xr: SynthReport, tmp_path: Path
) -> None:
    registry = make_analyzer(tmp_path).registry
    for study in xr.studies:
        ds = pydicom.dcmread(study.files[0], stop_before_pixels=True)
        assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("CR", "CHEST", "PA")
        decision, _ = route_series([_series(study)], registry)
        assert [r.model for r in decision.runs] == [CHEST_MODEL]
        prepared = prepare_radiograph(study.files[0], (224, 224))
        assert prepared.view_position == "PA" and prepared.body_part == "CHEST"


def test_pneumothorax_is_dark_texture_free_with_a_pleural_line(xr: SynthReport) -> None:
    study = next(s for s in xr.studies if s.label == 0)
    base = load_radiograph(study.files[0]).pixels
    spacing = float(study.extra["pixel_spacing_mm"])
    ptx = insert_pneumothorax(base, np.random.default_rng(0), pixel_spacing_mm=spacing)
    region = ptx.mask
    assert region.sum() > 0.005 * region.size
    right, left = lung_masks(base)
    assert not (region & ~(right | left)).any()  # inside the lung field
    assert ptx.pixels[region].mean() < base[region].mean() - 0.02  # darker
    sigma = max(1.0, 1.5 / spacing)  # keeps structures finer than ~1.5 mm: lung markings
    detail_before = base - ndimage.gaussian_filter(base, sigma)
    detail_after = ptx.pixels - ndimage.gaussian_filter(ptx.pixels, sigma)
    inner = ndimage.binary_erosion(region, iterations=3)
    assert detail_after[inner].std() < 0.8 * detail_before[inner].std()  # markings gone
    lung = right if ptx.side == "right" else left
    edge = lung & ~region & ndimage.binary_dilation(region, iterations=2)
    gap = region & ndimage.binary_dilation(edge, iterations=2)
    assert ptx.pixels[edge].mean() > ptx.pixels[gap].mean() + 0.02  # bright visceral line


def test_xray_same_seed_same_files(tmp_path: Path) -> None:
    a = synth_xray_dataset(tmp_path / "a", n_studies=2, seed=9, prevalence=1.0, size="small")
    b = synth_xray_dataset(tmp_path / "b", n_studies=2, seed=9, prevalence=1.0, size="small")
    for sa, sb in zip(a.studies, b.studies, strict=True):
        assert sa.files[0].read_bytes() == sb.files[0].read_bytes()
        assert (a.dataset / sa.mask).read_bytes() == (b.dataset / sb.mask).read_bytes()


def test_xray_without_shared_data_uses_the_pydicom_data_radiograph(tmp_path: Path) -> None:
    report = synth_xray_dataset(
        tmp_path / "d", n_studies=1, seed=0, prevalence=1.0, shared_dir=tmp_path, size="small"
    )
    assert report.base == "pydicom-data"
    assert report.studies[0].label == 1


@pytest.mark.realdata
def test_xray_uses_the_real_radiographs_when_present(xray_dir: Path, tmp_path: Path) -> None:
    report = synth_xray_dataset(
        tmp_path / "d", n_studies=3, seed=0, shared_dir=xray_dir.parents[1], size="small"
    )
    assert report.base == "siim+nih"
    assert len({s.extra["base"] for s in report.studies}) >= 2
