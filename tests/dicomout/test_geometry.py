"""The haemorrhage overlay laid back onto the source images: a cube of blood at a known place in
patient space comes back on exactly the source pixels it occupies (within one model voxel at
its border), whatever the slice order, gantry tilt or spacing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.dicomout.builders import (
    BLEED_HU,
    BRAIN_HU,
    CUBE_CENTRE,
    Layout,
    in_cube,
    model_output,
    pixel_centres,
    write_cube_series,
)
from triage.dicomout.geometry import labels_on_source
from triage.dicomout.seg import make_segmentation
from triage.domain import ModelRef
from triage.preprocess.ct import prepare_head_ct
from triage.preprocess.ct_headers import read_headers
from triage.results import Overlay, load_overlay, save_overlay

#: Mapping tolerance at the cube's border: one model voxel (1 mm).
TOLERANCE_MM = 1.0
LAYOUTS: tuple[Layout, ...] = (
    "axial",
    "reversed",
    "tilted_plane",
    "tilted_positions",
    "missing_slice",
)


def _bleed_overlay(paths: list[Path], tmp_path: Path) -> Overlay:
    """Threshold the prepared volume at the bleed, through the model's interpret, saved and
    loaded back."""
    prepared = prepare_head_ct(paths, min_coverage_mm=None)
    labels = (prepared.head_mask & (prepared.hu > (BRAIN_HU + BLEED_HU) / 2)).astype(np.uint8)
    assert labels.sum() > 500  # about 1 ml at 1 mm
    overlay, _ = model_output(prepared, labels, prepared.SeriesInstanceUID)
    path = tmp_path / "overlay.npz"
    save_overlay(path, overlay)
    return load_overlay(path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_bleed_lands_on_its_source_pixels(tmp_path: Path, layout: Layout) -> None:
    series = write_cube_series(tmp_path / "series", layout)
    overlay = _bleed_overlay(series.paths, tmp_path)
    sources = read_headers(series.paths)  # file order: top-down for "reversed"
    on_source = labels_on_source(overlay, sources)

    assert [s.dataset.SOPInstanceUID for s in on_source.slices] == [
        ds.SOPInstanceUID for ds in sources
    ]
    by_instance = on_source.by_instance()
    labelled_total = truth_total = 0
    for ds in sources:
        labels = by_instance[(ds.SOPInstanceUID, None)]
        points = pixel_centres(
            np.asarray(ds.ImagePositionPatient, dtype=float),
            np.asarray(ds.ImageOrientationPatient, dtype=float),
            (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            ds.Rows,
            ds.Columns,
        )
        labelled = labels == 1
        assert set(np.unique(labels)) <= {0, 1}
        # Every pixel well inside the cube is labelled; nothing beyond its border is.
        assert not np.any(in_cube(points, -TOLERANCE_MM) & ~labelled), ds.InstanceNumber
        assert not np.any(labelled & ~in_cube(points, TOLERANCE_MM)), ds.InstanceNumber
        labelled_total += int(labelled.sum())
        truth_total += int(in_cube(points).sum())
    assert labelled_total == pytest.approx(truth_total, rel=0.1)
    assert on_source.voxel_counts()["IPH"] == labelled_total


def test_the_overlay_keeps_the_model_grid_in_patient_space(tmp_path: Path) -> None:
    series = write_cube_series(tmp_path / "series", "tilted_plane")
    prepared = prepare_head_ct(series.paths, min_coverage_mm=None)
    labels = (prepared.head_mask & (prepared.hu > (BRAIN_HU + BLEED_HU) / 2)).astype(np.uint8)
    overlay, _ = model_output(prepared, labels, prepared.SeriesInstanceUID)
    z, y, x = prepared.crop_start
    resampled = prepared.resampled
    assert overlay.grid_origin == pytest.approx(resampled.TransformIndexToPhysicalPoint((x, y, z)))
    assert overlay.grid_spacing == pytest.approx(resampled.GetSpacing())
    assert overlay.grid_direction == pytest.approx(resampled.GetDirection())
    # The labelled voxels' centres, placed with the overlay's geometry, are the cube's.
    direction = np.asarray(overlay.grid_direction).reshape(3, 3)
    zyx = np.argwhere(overlay.data == 1)
    points = (
        np.asarray(overlay.grid_origin)
        + (direction @ (np.asarray(overlay.grid_spacing)[:, None] * zyx[:, ::-1].T)).T
    )
    assert np.all(in_cube(points, TOLERANCE_MM))
    assert points.mean(axis=0) == pytest.approx(CUBE_CENTRE, abs=0.3)


def test_an_overlay_written_before_the_geometry_was_kept(tmp_path: Path) -> None:
    old = Overlay("labels", np.ones((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.int16),
                  ("IPH",), (0, 0, 0), "1.2.3")  # fmt: skip
    path = tmp_path / "old.npz"
    save_overlay(path, old)
    with np.load(path) as npz:
        assert "grid_origin" not in npz
    loaded = load_overlay(path)
    assert loaded.grid_origin is None and loaded.grid_spacing is None
    assert loaded.grid_direction is None and not loaded.has_geometry
    series = write_cube_series(tmp_path / "series", "axial", n=10)
    with pytest.raises(ValueError, match="no grid geometry"):
        labels_on_source(loaded, read_headers(series.paths))


def test_sources_of_another_series_are_refused(tmp_path: Path) -> None:
    series = write_cube_series(tmp_path / "series", "axial")
    overlay = _bleed_overlay(series.paths, tmp_path)
    other = write_cube_series(tmp_path / "other", "axial", n=10)
    with pytest.raises(ValueError, match="not of the overlay's series"):
        labels_on_source(overlay, read_headers(other.paths))


def test_enhanced_ct_frames_are_placed_by_their_functional_groups() -> None:
    """pydicom's two-frame Enhanced CT (frames at z = -159 and -149 mm): a labelled box that
    holds only the second frame's plane lands on that frame only, at its exact pixels."""
    path = get_testdata_file("eCT_Supplemental.dcm")
    assert path is not None
    source = pydicom.dcmread(path, stop_before_pixels=True)
    box = np.ones((5, 50, 50), dtype=np.uint8)  # (z, y, x), 1 mm voxels
    overlay = Overlay(
        "labels", box, np.zeros(box.shape, np.int16), ("IPH",), (0, 0, 0),
        str(source.SeriesInstanceUID), grid_origin=(-50.0, -250.0, -151.0),
        grid_spacing=(1.0, 1.0, 1.0), grid_direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
    )  # fmt: skip
    on_source = labels_on_source(overlay, [source])
    assert [s.frame for s in on_source.slices] == [0, 1]
    assert not on_source.labels[0].any()
    frame = on_source.slices[1]
    points = pixel_centres(
        frame.position, frame.orientation, frame.pixel_spacing, frame.rows, frame.columns
    )
    expected = (
        (points[..., 0] >= -50.5) & (points[..., 0] < 49 - 50 + 0.5)
        & (points[..., 1] >= -250.5) & (points[..., 1] < -250 + 49 + 0.5)
    )  # fmt: skip
    assert np.array_equal(on_source.labels[1] == 1, expected)
    # A Segmentation of one multi-frame source: its one frame derives from frame 2.
    seg = make_segmentation(on_source, ModelRef("m", "1"), series_number=90)
    assert seg.NumberOfFrames == 1
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    reference = derivation.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert int(reference.ReferencedFrameNumber) == 2
