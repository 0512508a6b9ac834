"""DICOM Segmentation and TID 1500 report of a label map on a head CT: read back by highdicom,
referencing the source images, volumes matching the mask on the source grid, and valid to
dicom3tools' ``dciodvfy`` (no Error lines; warnings are printed).

The demo's synthetic head CT and the real one (../shared/data/cq500-ct0, 238 slices, tilted by
8.5 degrees, no FrameOfReferenceUID) get a synthetic lesion blob on the model grid: the network
does not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from tests.dicomout.builders import dciodvfy, dciodvfy_path, model_output
from triage.demo.phantom import PhantomSpec, write_head_ct_series
from triage.dicomout.geometry import SourceLabels, labels_on_source
from triage.dicomout.seg import make_segmentation, segment_classes
from triage.dicomout.sr import make_measurement_report
from triage.dicomout.terminology import CONTENT_LABEL, NOT_FOR_DIAGNOSTIC_USE
from triage.domain import Finding, ModelRef
from triage.preprocess.ct import HEAD_MIN_COVERAGE_MM, prepare_head_ct
from triage.preprocess.ct_headers import read_headers
from triage.results import Overlay, load_overlay, save_overlay

WEIGHTS = ("0" * 63 + "1", "0" * 63 + "2")


@dataclass(frozen=True)
class Case:
    sources: list[pydicom.Dataset]
    overlay: Overlay
    finding: Finding
    on_source: SourceLabels


def _blob_labels(head_mask: np.ndarray) -> np.ndarray:
    """IPH: a 12 mm-radius ball inside the head; IVH: a 5 mm ball next to it (1 mm voxels)."""
    inside = np.argwhere(head_mask)
    centre = inside.mean(axis=0)
    z, y, x = np.ogrid[tuple(slice(0, n) for n in head_mask.shape)]

    def ball(c: np.ndarray, r: float) -> np.ndarray:
        return (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2

    labels = np.zeros(head_mask.shape, dtype=np.uint8)
    labels[ball(centre + [0, -15, 25], 12.0)] = 1
    labels[ball(centre + [5, 10, -5], 5.0)] = 4
    labels[~head_mask] = 0
    return labels


def _case(paths: list[Path], overlay_dir: Path, *, min_coverage_mm: float | None) -> Case:
    prepared = prepare_head_ct(paths, min_coverage_mm=min_coverage_mm)
    overlay, finding = model_output(
        prepared, _blob_labels(prepared.head_mask), prepared.SeriesInstanceUID
    )
    finding = Finding(**{**vars(finding), "model": ModelRef("blast-ct-v1", "1.0.0", WEIGHTS)})
    path = overlay_dir / "overlay.npz"
    save_overlay(path, overlay)
    overlay = load_overlay(path)
    sources = read_headers(paths)
    return Case(sources, overlay, finding, labels_on_source(overlay, sources))


@pytest.fixture(
    scope="module",
    params=[
        "phantom",
        pytest.param("cq500", marks=[pytest.mark.realdata, pytest.mark.slow]),
    ],
)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The demo's synthetic head CT (complete headers, FrameOfReferenceUID, 52 axial slices of
    2.5 mm), or the real one (238 tilted slices of 0.625 mm, no FrameOfReferenceUID)."""
    work = tmp_path_factory.mktemp(request.param)
    if request.param == "phantom":
        paths = write_head_ct_series(work / "series", PhantomSpec(haemorrhage=True, seed=3))
        return _case(paths, work, min_coverage_mm=None)
    cq500_dir: Path = request.getfixturevalue("cq500_dir")
    return _case(sorted(cq500_dir.glob("*.dcm")), work, min_coverage_mm=HEAD_MIN_COVERAGE_MM)


def _source_voxel_ml(sources: list[pydicom.Dataset]) -> float:
    """Volume of one source voxel: pixel area x the spacing of the slice planes along their
    normal."""
    iop = np.asarray(sources[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    along = np.sort([float(np.dot(normal, ds.ImagePositionPatient)) for ds in sources])
    row, col = (float(v) for v in sources[0].PixelSpacing)
    return row * col * float(np.median(np.diff(along))) / 1000.0


def _validate(path: Path) -> None:
    if dciodvfy_path() is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    result = dciodvfy(path)
    for line in result.warnings:
        print(f"dciodvfy {path.name}: {line}")
    assert result.errors == []


def test_segmentation_and_report_of_a_head_ct(case: Case, tmp_path: Path) -> None:
    source_uids = {str(ds.SOPInstanceUID) for ds in case.sources}
    counts = case.on_source.voxel_counts()
    assert counts["IPH"] > 0 and counts["IVH"] > 0 and counts["EAH"] == 0

    had_frame_of_reference = ["FrameOfReferenceUID" in ds for ds in case.sources]
    seg = make_segmentation(case.on_source, case.finding.model, series_number=901)
    assert ["FrameOfReferenceUID" in ds for ds in case.sources] == had_frame_of_reference
    if all(had_frame_of_reference):
        assert seg.FrameOfReferenceUID == case.sources[0].FrameOfReferenceUID
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)
    report = make_measurement_report(case.finding, case.sources, seg, series_number=902)
    sr_path = tmp_path / "sr.dcm"
    report.save_as(sr_path)

    # The Segmentation, read back.
    seg_back = hd.seg.segread(seg_path)
    assert seg_back.SegmentationType == "BINARY"
    assert seg_back.Manufacturer == "triage"
    assert seg_back.ContentLabel == CONTENT_LABEL
    assert NOT_FOR_DIAGNOSTIC_USE in seg_back.SeriesDescription
    assert segment_classes(seg_back) == {"IPH": 1, "IVH": 2}
    for segment in seg_back.SegmentSequence:
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("blast-ct-v1", "1.0.0")
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        assert WEIGHTS[0] in algorithm.AlgorithmParameters
    assert {uid for _, _, uid in seg_back.get_source_image_uids()} == source_uids
    # Only frames with a segment's pixels, each derived from the source image it lies on.
    by_instance = case.on_source.by_instance()
    expected_frames = sum(
        int(np.any(labels == value)) for labels in case.on_source.labels for value in (1, 4)
    )
    assert seg_back.NumberOfFrames == expected_frames
    for item in seg_back.PerFrameFunctionalGroupsSequence:
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert str(ref.ReferencedSOPInstanceUID) in source_uids
        assert np.any(by_instance[(str(ref.ReferencedSOPInstanceUID), None)] == (1, 4)[number - 1])
    # The pixels, segment by segment, are the labels on the source images.
    for value, number in ((1, 1), (4, 2)):
        for uid, labels in ((k[0], v) for k, v in by_instance.items()):
            if not np.any(labels == value):
                continue
            frame = seg_back.get_pixels_by_source_instance(
                [uid], segment_numbers=[number], combine_segments=True
            )[0]
            assert np.array_equal(frame != 0, labels == value)
            break

    # The report, read back.
    sr_back = hd.sr.srread(sr_path)
    assert isinstance(sr_back, hd.sr.Comprehensive3DSR)
    assert sr_back.Manufacturer == "triage"
    assert NOT_FOR_DIAGNOSTIC_USE in sr_back.SeriesDescription
    assert sr_back.CompletionFlag == "COMPLETE" and sr_back.VerificationFlag == "UNVERIFIED"
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for study in sr_back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == source_uids | {str(seg.SOPInstanceUID)}
    content = sr_back.content
    groups = content.get_volumetric_roi_measurement_groups()
    voxel_ml = _source_voxel_ml(case.sources)
    assert [str(g.tracking_identifier) for g in groups] == ["IPH", "IVH"]
    for group, name, number in zip(groups, ("IPH", "IVH"), (1, 2), strict=True):
        segment = group.referenced_segment
        assert segment is not None
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment.referenced_segment_numbers == [number]
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit.value == "ml"
        assert volume.value == pytest.approx(case.finding.volumes_ml[name])
        # The finding's volume (model grid) agrees with the mask on the source grid, within
        # 3 % and the sampling of the ball's surface (a few dozen source voxels either way:
        # 0.05 ml on the phantom's 2.5 mm slices, 0.003 ml on the real CT's 0.625 mm ones).
        expected = counts[name] * voxel_ml
        assert volume.value == pytest.approx(expected, rel=0.03, abs=25 * voxel_ml)
        (algorithm,) = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmName)
        assert algorithm.TextValue == "blast-ct-v1"
    (study_group,) = content.get_image_measurement_groups()
    (score,) = study_group.get_measurements(name=codes.SCT.Score)  # SCT 246262008
    assert score.value == pytest.approx(case.finding.score) and score.unit.value == "1"
    (total,) = study_group.get_measurements(name=codes.SCT.Volume)
    assert total.value == pytest.approx(case.finding.details["blood_volume_ml"])
    (evaluation,) = study_group.get_qualitative_evaluations(codes.SCT.IntracranialHemorrhage)
    present = codes.SCT.Present if case.finding.flag else codes.SCT.Absent
    assert evaluation.value.value == present.value
    (comment,) = hd.sr.utils.find_content_items(content[0], name=codes.DCM.Comment)
    assert NOT_FOR_DIAGNOSTIC_USE in comment.TextValue

    _validate(seg_path)
    _validate(sr_path)


def test_a_negative_finding_is_reported_without_a_segmentation(tmp_path: Path) -> None:
    spec = PhantomSpec(rows=128, columns=128, pixel_spacing_mm=1.8, slice_thickness_mm=5.0,
                       slices=26)  # fmt: skip
    paths = write_head_ct_series(tmp_path / "series", spec)
    prepared = prepare_head_ct(paths, min_coverage_mm=None)
    empty = np.zeros(prepared.hu.shape, dtype=np.uint8)
    overlay, finding = model_output(prepared, empty, prepared.SeriesInstanceUID)
    sources = read_headers(paths)
    on_source = labels_on_source(overlay, sources)
    assert not on_source.labels.any()
    with pytest.raises(ValueError, match="nothing to segment"):
        make_segmentation(on_source, finding.model, series_number=901)
    assert finding.flag is False
    report = make_measurement_report(finding, sources, None, series_number=902)
    path = tmp_path / "sr.dcm"
    report.save_as(path)
    content = hd.sr.srread(path).content
    assert content.get_volumetric_roi_measurement_groups() == []
    (group,) = content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations(codes.SCT.IntracranialHemorrhage)
    assert evaluation.value.value == codes.SCT.Absent.value
    _validate(path)
