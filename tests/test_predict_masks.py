"""``triage predict --masks``: the haemorrhage model's label map written as NIfTI (on the model's
1 mm grid, or on the source series' voxels) or as the product's DICOM Segmentation, each with a
JSON sidecar, for scoring outside the product.

The fast tests put a cube of "blood" at a known place in patient space (the same synthetic
series as the DICOM Segmentation tests) through the real preprocessing and the model's own
``interpret``; the slow ones run the real BLAST-CT network on the demo phantom with a bleed
through the real ``triage predict`` command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests.conftest import run_cli
from tests.dicomout.builders import (
    BLEED_HU,
    BRAIN_HU,
    Layout,
    in_cube,
    model_output,
    write_cube_series,
)
from triage.domain import Finding, ModelRef
from triage.mask_export import MaskFile, export_study_masks, mask_name, study_key
from triage.preprocess.ct import prepare_head_ct
from triage.results import Overlay

WEIGHTS = ("ab" * 32,)
STUDY = "1.2.826.0.1.3680043.8.498.1"
FINDING = "intracranial_haemorrhage"
BASE = f"blast-ct-v1__{FINDING}"


def _cube(
    tmp_path: Path, layout: Layout = "axial", *, empty: bool = False
) -> tuple[list[Path], Overlay, Finding]:
    """A series with a 10 mm cube of blood, and the model's overlay and finding for it."""
    series = write_cube_series(tmp_path / "series", layout)
    prepared = prepare_head_ct(series.paths, min_coverage_mm=None)
    labels = prepared.head_mask & (prepared.hu > (BRAIN_HU + BLEED_HU) / 2)
    if empty:
        labels[:] = False
    overlay, finding = model_output(prepared, labels.astype(np.uint8), prepared.SeriesInstanceUID)
    finding = dataclasses.replace(
        finding, model=ModelRef("blast-ct-v1", "1.0.0", weights_sha256=WEIGHTS)
    )
    return series.paths, overlay, finding


def _export(
    tmp_path: Path, paths: list[Path], overlay: Overlay, finding: Finding, **kwargs: Any
) -> MaskFile:
    (made,) = export_study_masks(
        tmp_path / "masks",
        study_uid=STUDY,
        findings=[finding],
        overlays={finding.finding: overlay},
        series_paths={overlay.SeriesInstanceUID: paths},
        **kwargs,
    )
    return made


def _series_image(paths: list[Path]) -> sitk.Image:
    """The source series as an ITK reader (GDCM, sorted by position) makes it."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(paths[0].parent)))
    return reader.Execute()


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def _voxel_centres(image: sitk.Image) -> np.ndarray:
    """LPS centres (z, y, x, 3) of every voxel of the image."""
    x, y, z = image.GetSize()
    index = np.stack(np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij"), -1)
    steps = index[..., ::-1] * np.asarray(image.GetSpacing())  # (i, j, k) in mm
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + steps @ direction.T


def test_model_grid_mask_is_the_overlay_with_its_volumes(tmp_path: Path) -> None:
    paths, overlay, finding = _cube(tmp_path)
    made = _export(tmp_path, paths, overlay, finding)
    assert made.error is None and made.path is not None and made.sidecar is not None
    assert made.path == tmp_path / "masks" / STUDY / f"{BASE}.nii.gz"
    image = sitk.ReadImage(str(made.path))
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), overlay.data)
    assert overlay.grid_origin and overlay.grid_spacing and overlay.grid_direction
    np.testing.assert_allclose(image.GetOrigin(), overlay.grid_origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), overlay.grid_spacing, rtol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), overlay.grid_direction, atol=1e-6)
    counts = np.bincount(sitk.GetArrayViewFromImage(image).ravel(), minlength=5)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    for value, name in enumerate(overlay.classes, start=1):
        assert counts[value] * voxel_ml == pytest.approx(finding.volumes_ml[name], abs=5e-4)
    assert finding.volumes_ml["IPH"] == pytest.approx(1.0, abs=0.15)  # the 10 mm cube

    side = json.loads(made.sidecar.read_text())
    assert side["mask"] == f"{BASE}.nii.gz" and side["format"] == "nifti"
    assert side["model"] == {
        "name": "blast-ct-v1",
        "version": "1.0.0",
        "weights_sha256": [*WEIGHTS],
    }
    assert side["finding"] == FINDING
    assert side["classes"] == {"0": "background", "1": "IPH", "2": "EAH", "3": "oedema", "4": "IVH"}
    assert side["grid"]["kind"] == "model"
    assert side["grid"]["size"] == list(image.GetSize())
    np.testing.assert_allclose(side["grid"]["origin"], overlay.grid_origin)
    assert side["volumes_ml"] == pytest.approx(finding.volumes_ml, abs=5e-4)
    assert side["SeriesInstanceUID"] == overlay.SeriesInstanceUID
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(side)


@pytest.mark.parametrize("layout", ["axial", "reversed"])
def test_source_grid_mask_lies_on_the_source_voxels(tmp_path: Path, layout: Layout) -> None:
    paths, overlay, finding = _cube(tmp_path, layout)
    made = _export(tmp_path, paths, overlay, finding, grid="source")
    assert made.error is None and made.path is not None and made.sidecar is not None
    image = sitk.ReadImage(str(made.path))
    _same_grid(image, _series_image(paths))
    labelled = sitk.GetArrayFromImage(image) == 1
    centres = _voxel_centres(image)
    # Within one model voxel (1 mm) of the cube's faces, the labels are the cube's.
    assert not np.any(labelled & ~in_cube(centres, grow_mm=1.0))
    assert np.all(labelled[in_cube(centres, grow_mm=-1.0)])
    side = json.loads(made.sidecar.read_text())
    assert side["grid"]["kind"] == "source"
    assert side["grid"]["size"] == list(image.GetSize())
    assert side["volumes_ml"]["IPH"] == pytest.approx(finding.volumes_ml["IPH"], rel=0.15)


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        ("tilted_plane", "gantry tilt"),
        ("tilted_positions", "gantry tilt"),
        ("missing_slice", "misses 1 slice"),
    ],
)
def test_no_source_grid_mask_where_the_slices_are_no_regular_grid(
    tmp_path: Path, layout: Layout, reason: str
) -> None:
    paths, overlay, finding = _cube(tmp_path, layout)
    refused = _export(tmp_path, paths, overlay, finding, grid="source")
    assert refused.path is None and refused.error is not None
    assert reason in refused.error and "--mask-grid model" in refused.error
    assert not list((tmp_path / "masks").rglob("*.nii.gz"))
    made = _export(tmp_path, paths, overlay, finding)  # the model's grid still holds it
    assert made.error is None and made.path is not None


def test_seg_format_writes_the_products_segmentation(tmp_path: Path) -> None:
    from triage.dicomout.results import SEG_SERIES_NUMBER
    from triage.dicomout.seg import segment_classes

    paths, overlay, finding = _cube(tmp_path)
    _export(tmp_path, paths, overlay, finding)  # an earlier run's NIfTI: replaced
    made = _export(tmp_path, paths, overlay, finding, mask_format="seg")
    assert made.error is None and made.path is not None and made.sidecar is not None
    assert made.path.name == f"{BASE}.dcm" and made.grid == "source"
    assert sorted(p.name for p in made.path.parent.iterdir()) == [f"{BASE}.dcm", f"{BASE}.json"]
    seg = pydicom.dcmread(made.path)
    assert seg.Modality == "SEG" and int(seg.SeriesNumber) == SEG_SERIES_NUMBER
    assert segment_classes(seg) == {"IPH": 1}
    side = json.loads(made.sidecar.read_text())
    assert side["format"] == "dicom-seg" and side["mask"] == f"{BASE}.dcm"
    assert side["volumes_ml"]["IPH"] == pytest.approx(finding.volumes_ml["IPH"], rel=0.15)


def test_a_finding_without_a_labelled_voxel(tmp_path: Path) -> None:
    """NIfTI: an all-background mask (a negative to score); SEG: only the sidecar, since a
    Segmentation needs a segment."""
    paths, overlay, finding = _cube(tmp_path, empty=True)
    nifti = _export(tmp_path, paths, overlay, finding, grid="source")
    assert nifti.path is not None
    assert not sitk.GetArrayViewFromImage(sitk.ReadImage(str(nifti.path))).any()
    seg = _export(tmp_path, paths, overlay, finding, mask_format="seg")
    assert seg.error is None and seg.path is None and seg.sidecar is not None
    assert json.loads(seg.sidecar.read_text())["mask"] is None
    assert not nifti.path.exists()  # the earlier mask does not outlive the sidecar


def test_folder_and_file_names_come_from_no_header_text() -> None:
    assert study_key(STUDY) == STUDY
    for bad in ("../../etc", "1.2.3/../x", "1." + "2" * 70, "01.2"):
        key = study_key(bad)
        assert len(key) == 24 and all(c in "0123456789abcdef" for c in key)
    assert mask_name("blast-ct-v1", FINDING) == BASE
    model, finding = mask_name("../m", "f/g").split("__")
    assert "/" not in model + finding and not model.startswith(".")


# ---- the command: mistakes are one line and exit 2, before any model runs ------------------


def _error_line(out: Any) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return str(lines[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--masks", "{file}"], "not a folder"),
        (["--masks", "{file}/sub"], "cannot write there"),
        (["--mask-format", "seg"], "need --masks"),
        (["--masks", "{dir}/m", "--mask-format", "seg", "--mask-grid", "model"], "source images"),
    ],
)
def test_mask_option_mistakes(tmp_path: Path, args: list[str], message: str) -> None:
    afile = tmp_path / "taken.txt"
    afile.write_text("x")
    argv = [a.format(file=afile, dir=tmp_path) for a in args]
    out = run_cli(["predict", str(tmp_path), *argv], tmp_path / "data", timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    line = _error_line(out)
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "data").exists()  # refused before anything was made


# ---- the real network on the demo phantom --------------------------------------------------


@pytest.fixture(scope="module")
def bleed_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from triage.demo.phantom import PhantomSpec, write_head_ct_series

    folder = tmp_path_factory.mktemp("phantom") / "ct"
    write_head_ct_series(folder, PhantomSpec(haemorrhage=True, seed=2))
    return folder


def _predict_masks(
    series: Path, weights_mirror: Path, tmp_path: Path, *options: str
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``triage predict --json --masks`` on the phantom: (finding, mask entry, stderr)."""
    out = run_cli(
        ["predict", str(series), "--json", "--masks", str(tmp_path / "masks"), *options],
        tmp_path / "data",
        timeout=900,
        TRIAGE_MODEL_MIRROR=str(weights_mirror),
        TRIAGE_DEVICE="cpu",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PHANTOM" not in out.stderr  # no patient data in what the command logs
    (study,) = json.loads(out.stdout)["studies"]
    (finding,) = study["findings"]
    assert finding["flag"] is True
    (mask,) = study["masks"]
    assert mask["error"] is None, mask
    assert f"masks: 1 written to {tmp_path / 'masks'}" in out.stderr
    assert Path(mask["path"]).parent == tmp_path / "masks" / study["StudyInstanceUID"]
    sidecar = Path(mask["sidecar"]).read_text()
    assert "PHANTOM" not in sidecar  # no patient name or ID
    return finding, mask, out.stderr


@pytest.mark.realdata
@pytest.mark.slow
def test_predict_writes_the_model_grid_mask(
    bleed_series: Path, weights_mirror: Path, tmp_path: Path
) -> None:
    finding, mask, _ = _predict_masks(bleed_series, weights_mirror, tmp_path)
    image = sitk.ReadImage(mask["path"])
    side = json.loads(Path(mask["sidecar"]).read_text())
    assert list(image.GetSize()) == side["grid"]["size"]
    np.testing.assert_allclose(image.GetOrigin(), side["grid"]["origin"], atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), (1.0, 1.0, 1.0), rtol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), side["grid"]["direction"], atol=1e-6)
    assert side["model"] == finding["model"]
    assert len(side["model"]["weights_sha256"][0]) == 64
    counts = np.bincount(sitk.GetArrayViewFromImage(image).ravel(), minlength=5)
    for value, name in enumerate(["IPH", "EAH", "oedema", "IVH"], start=1):
        assert counts[value] * 0.001 == pytest.approx(finding["volumes_ml"][name], abs=5e-4)
    assert finding["volumes_ml"]["IPH"] > 10


@pytest.mark.realdata
@pytest.mark.slow
def test_predict_writes_the_source_grid_mask_where_the_bleed_is(
    bleed_series: Path, weights_mirror: Path, tmp_path: Path
) -> None:
    from triage.demo.phantom import PhantomSpec, head_ct_phantom

    _, mask, _ = _predict_masks(bleed_series, weights_mirror, tmp_path, "--mask-grid", "source")
    image = sitk.ReadImage(mask["path"])
    _same_grid(image, _series_image(sorted(bleed_series.iterdir())))
    blood = np.isin(sitk.GetArrayFromImage(image), [1, 2, 4])  # IPH, EAH, IVH
    truth = head_ct_phantom(PhantomSpec(haemorrhage=True, seed=2)).bleed_mask
    assert blood.shape == truth.shape  # both (slice, row, column), inferior slice first
    dice = 2 * np.count_nonzero(blood & truth) / (np.count_nonzero(blood) + truth.sum())
    assert dice > 0.85


@pytest.mark.realdata
@pytest.mark.slow
def test_predict_writes_the_segmentation(
    bleed_series: Path, weights_mirror: Path, tmp_path: Path
) -> None:
    _, mask, _ = _predict_masks(bleed_series, weights_mirror, tmp_path, "--mask-format", "seg")
    seg = pydicom.dcmread(mask["path"])
    assert seg.Modality == "SEG"
    assert "IPH" in {str(s.TrackingID) for s in seg.SegmentSequence}
