"""The analysis path on real files: which models run on which series, each failing open."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest

from tests.conftest import CHEST_MODEL, make_analyzer, pydicom_file, write_chest_weights
from tests.fake_models import exploding, fixed_haemorrhage
from triage.analysis import SeriesFiles
from triage.analysis.analyzer import route_series
from triage.demo.phantom import PhantomSpec, write_head_ct_series
from triage.domain import AIStatus, Finding, ModelRef


def _series(paths: Sequence[Path]) -> SeriesFiles:
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    return SeriesFiles(uid, list(paths))


def _radiograph(out: Path, source: str = "RG1_UNCR.dcm", **attrs: object) -> Path:
    """A copy of a pydicom-data radiograph as a new series, with changed attributes."""
    ds = pydicom.dcmread(pydicom_file(source))
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_extremity_radiograph_has_no_applicable_model_with_the_reason(tmp_path: Path) -> None:
    path = pydicom_file("RG3_UNCR.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    result = make_analyzer(tmp_path).analyze(
        str(ds.StudyInstanceUID), [SeriesFiles(str(ds.SeriesInstanceUID), [path])]
    )
    assert result.ai_status == AIStatus.no_applicable_model
    assert result.routing["model"] is None
    assert "reads CT HEAD" in result.routing["reason"]
    assert (
        "reads CR/DX CHEST PA/AP; this study's CR/DX series show EXTREMITY"
        in (result.routing["reason"])
    )
    assert result.routing["modalities"] == ["CR"]


def test_lateral_chest_radiograph_is_refused_by_the_rule_with_the_reason(tmp_path: Path) -> None:
    lateral = _radiograph(tmp_path / "lat.dcm", ViewPosition="LL")
    result = make_analyzer(tmp_path).analyze("1.2.3", [_series([lateral])])
    assert result.ai_status == AIStatus.no_applicable_model
    (chest,) = [m for m in result.routing["models"] if m["model"] == CHEST_MODEL]
    assert chest["run"] is False
    assert chest["reason"] == "reads CR/DX CHEST PA/AP; this study's CR/DX series show view LL"


def test_chest_radiograph_without_weights_fails_naming_the_file_and_the_mirror(
    tmp_path: Path,
) -> None:
    pa = _radiograph(tmp_path / "pa.dcm")
    result = make_analyzer(tmp_path / "cache", tmp_path / "empty").analyze("1.2.3", [_series([pa])])
    assert result.ai_status == AIStatus.failed
    assert result.error is not None
    assert result.error.startswith(f"{CHEST_MODEL}: model weights {CHEST_MODEL}/nih-pc-chex")
    assert "TRIAGE_MODEL_MIRROR" in result.error
    (run,) = result.runs
    assert run.model == CHEST_MODEL and run.status == AIStatus.failed


def test_partial_head_ct_is_an_incomplete_series(tmp_path: Path) -> None:
    paths = sorted(write_head_ct_series(tmp_path / "ct", PhantomSpec(seed=3)))[:4]
    result = make_analyzer(tmp_path).analyze("1.2.3", [_series(paths)])
    assert result.ai_status == AIStatus.incomplete_series
    assert result.error and "needs at least 90 mm" in result.error


def test_every_model_gets_its_series(tmp_path: Path) -> None:
    head = sorted(write_head_ct_series(tmp_path / "ct", PhantomSpec(seed=4)))
    pa = _radiograph(tmp_path / "cr" / "pa.dcm")
    lateral = _radiograph(tmp_path / "cr" / "lat.dcm", ViewPosition="LL")
    decision, files = route_series(
        [_series([lateral]), _series(head), _series([pa])], make_analyzer(tmp_path).registry
    )
    chosen = {r.model: files[r.series.SeriesInstanceUID].paths for r in decision.runs if r.series}
    assert chosen == {"blast-ct-v1": head, CHEST_MODEL: [pa]}
    assert decision.to_json()["modalities"] == ["CR", "CT"]


def test_one_model_failing_leaves_the_others_findings(tmp_path: Path) -> None:
    """A head CT and a chest radiograph: BLAST-CT raises, the chest model still reports."""
    mirror = tmp_path / "mirror"
    sha256 = write_chest_weights(mirror)
    head = sorted(write_head_ct_series(tmp_path / "ct", PhantomSpec(seed=6)))
    pa = _radiograph(tmp_path / "cr" / "pa.dcm")
    analyzer = make_analyzer(tmp_path / "cache", mirror, factories={"blast-ct": exploding})
    result = analyzer.analyze("1.2.3", [_series(head), _series([pa])])

    assert result.ai_status == AIStatus.partial
    assert result.error == "blast-ct-v1: internal error (RuntimeError)"
    statuses = {r.model: r.status for r in result.runs}
    assert statuses == {"blast-ct-v1": AIStatus.failed, CHEST_MODEL: AIStatus.ok}
    codes = [f.finding for f in result.findings]
    assert codes[0] == "pneumothorax" and "pleural_effusion" in codes
    assert all(f.model.name == CHEST_MODEL for f in result.findings)
    assert all(f.model.weights_sha256 == (sha256,) for f in result.findings)
    assert all(
        f.details["SeriesInstanceUID"] == _series([pa]).SeriesInstanceUID for f in result.findings
    )
    assert result.overlays["pneumothorax"].kind == "heatmap"
    by_model = {m["model"]: m for m in result.routing["models"]}
    assert by_model["blast-ct-v1"]["status"] == "failed"
    assert by_model[CHEST_MODEL]["status"] == "ok" and by_model[CHEST_MODEL]["error"] is None


def test_the_chest_model_failing_leaves_the_haemorrhage_finding(tmp_path: Path) -> None:
    head = sorted(write_head_ct_series(tmp_path / "ct", PhantomSpec(seed=7)))
    pa = _radiograph(tmp_path / "cr" / "pa.dcm")
    analyzer = make_analyzer(
        tmp_path, factories={"blast-ct": fixed_haemorrhage, "xrv-densenet": exploding}
    )
    result = analyzer.analyze("1.2.3", [_series(head), _series([pa])])
    assert result.ai_status == AIStatus.partial
    (finding,) = result.findings
    assert finding.finding == "intracranial_haemorrhage" and finding.severity == "high"
    # The model's identity is stamped by the run, whatever the implementation said.
    assert finding.model == ModelRef("blast-ct-v1", "1.0.0", ("0" * 64,))


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
    decision, files = route_series(series, make_analyzer(tmp_path).registry)
    (run,) = decision.runs
    assert run.series is not None and files[run.series.SeriesInstanceUID].paths == soft
    verdicts = decision.to_json()["models"][0]["series"]  # blast-ct-v1's
    assert [v["eligible"] for v in verdicts] == [False, True, True]


@pytest.mark.realdata
@pytest.mark.slow
def test_head_ct_and_chest_radiograph_get_findings_from_both_models(
    tmp_path: Path, weights_mirror: Path
) -> None:
    """The real BLAST-CT weights on a synthetic bleed and the chest network (random weights,
    saved as the real file is) on a real radiograph, in one study."""
    mirror = tmp_path / "mirror"
    (mirror).mkdir()
    (mirror / "blast-ct-v1").symlink_to(weights_mirror / "blast-ct-v1")
    write_chest_weights(mirror)
    head = sorted(write_head_ct_series(tmp_path / "ct", PhantomSpec(haemorrhage=True, seed=13)))
    pa = _radiograph(tmp_path / "cr" / "pa.dcm")
    result = make_analyzer(tmp_path / "cache", mirror).analyze(
        "1.2.3", [_series(head), _series([pa])]
    )
    assert result.ai_status == AIStatus.ok, result.error
    by_model: dict[str, list[Finding]] = {}
    for f in result.findings:
        by_model.setdefault(f.model.name, []).append(f)
    (ich,) = by_model["blast-ct-v1"]
    assert ich.flag and ich.details["blood_volume_ml"] > 10
    assert ich.severity in ("high", "standard")
    assert len(ich.model.weights_sha256) == 1 and len(ich.model.weights_sha256[0]) == 64
    assert {f.finding for f in by_model[CHEST_MODEL]} >= {"pneumothorax", "cardiomegaly"}
    assert set(result.overlays) >= {"intracranial_haemorrhage", "pneumothorax"}
    assert result.overlays["intracranial_haemorrhage"].kind == "labels"


@pytest.mark.parametrize(
    ("meaning", "runs"),
    [("postero-anterior", True), ("antero-posterior", True), ("left lateral", False)],
)
def test_view_from_the_view_code_when_view_position_is_absent(
    tmp_path: Path, meaning: str, runs: bool
) -> None:
    """Many DX files name the view only in ViewCodeSequence: the router reads it too."""
    path = _radiograph(tmp_path / "cr.dcm")
    ds = pydicom.dcmread(path)
    del ds.ViewPosition
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-XXXXX", "SRT", meaning
    ds.ViewCodeSequence = [code]
    ds.save_as(path, enforce_file_format=True)
    decision, _ = route_series([_series([path])], make_analyzer(tmp_path).registry)
    (chest,) = [r for r in decision.routes if r.model == CHEST_MODEL]
    assert (chest.series is not None) is runs, chest.reason


@pytest.mark.realdata
def test_a_real_radiograph_stored_as_secondary_capture_reaches_the_chest_model(
    tmp_path: Path, xray_dir: Path
) -> None:
    """SIIM-ACR's radiographs are Secondary Capture objects with Modality CR: radiographs
    all the same (a CT dose screen is kept away by the head model's rule, not this one)."""
    path = xray_dir / "siim-cr-chest.dcm"
    decision, _ = route_series([_series([path])], make_analyzer(tmp_path).registry)
    (chest,) = [r for r in decision.routes if r.model == CHEST_MODEL]
    assert chest.series is not None, chest.reason
