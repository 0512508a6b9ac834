"""The analysis path's routing on real files: what runs, and what a study is told."""

from __future__ import annotations

from pathlib import Path

import pydicom

from tests.conftest import pydicom_file
from triage.demo.phantom import PhantomSpec, write_head_ct_series
from triage.domain import AIStatus
from triage.pipeline import Analyzer, SeriesFiles, route_series


def analyzer(tmp_path: Path) -> Analyzer:
    # No weights: the paths below never load the model.
    return Analyzer(model_cache_dir=tmp_path / "models", model_mirror=str(tmp_path / "none"))


def test_radiograph_has_no_applicable_model_with_the_reason(tmp_path: Path) -> None:
    path = pydicom_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    result = analyzer(tmp_path).analyze(
        str(ds.StudyInstanceUID), [SeriesFiles(str(ds.SeriesInstanceUID), [path])]
    )
    assert result.ai_status == AIStatus.no_applicable_model
    assert result.routing["model"] is None
    assert "reads CT HEAD" in result.routing["reason"]
    assert result.routing["modalities"] == ["CR"]


def test_partial_head_ct_is_an_incomplete_series(tmp_path: Path) -> None:
    paths = sorted(write_head_ct_series(tmp_path / "ct", PhantomSpec(seed=3)))[:4]
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    result = analyzer(tmp_path).analyze("1.2.3", [SeriesFiles(uid, paths)])
    assert result.ai_status == AIStatus.incomplete_series
    assert result.error and "needs at least 90 mm" in result.error


def test_route_series_picks_the_head_series_and_keeps_its_files(tmp_path: Path) -> None:
    head = write_head_ct_series(tmp_path / "ct", PhantomSpec(seed=4))
    uid = str(pydicom.dcmread(head[0], stop_before_pixels=True).SeriesInstanceUID)
    xray = pydicom_file("RG1_UNCR.dcm")
    series = [SeriesFiles("x", [xray]), SeriesFiles(uid, list(head))]
    decision, files = route_series(series)
    (run,) = decision.runs
    assert run.series is not None and files[run.series.SeriesInstanceUID].paths == list(head)
    assert decision.to_json()["modalities"] == ["CR", "CT"]


def _variant(paths: list[Path], out: Path, **attrs: object) -> list[Path]:
    """A copy of a series as another series of the same study, with changed attributes."""
    out.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    written = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        ds.save_as(out / path.name, enforce_file_format=True)
        written.append(out / path.name)
    return written


def test_localizer_bone_and_soft_tissue_files_soft_tissue_is_chosen(tmp_path: Path) -> None:
    soft = sorted(write_head_ct_series(tmp_path / "soft", PhantomSpec(seed=5)))
    bone = _variant(soft, tmp_path / "bone", ConvolutionKernel="BONE", SeriesDescription="Bone")
    scout = _variant(
        soft[:1],
        tmp_path / "scout",
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        SeriesDescription="Scout",
    )
    series = []
    for paths in (scout, bone, soft):
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        series.append(SeriesFiles(uid, paths))
    decision, files = route_series(series)
    (run,) = decision.runs
    assert run.series is not None and files[run.series.SeriesInstanceUID].paths == soft
    verdicts = decision.to_json()["models"][0]["series"]
    assert [v["eligible"] for v in verdicts] == [False, True, True]
