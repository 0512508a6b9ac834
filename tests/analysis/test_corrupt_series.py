"""A head CT with a damaged slice: the study fails with the reason, and no model sees it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest

from tests.conftest import make_analyzer
from tests.preprocess.ct_builders import cut_slice, to_jpeg_lossless
from triage.analysis import SeriesFiles, StudyAnalysis
from triage.demo.phantom import PhantomSpec, write_head_ct_series
from triage.domain import AIStatus
from triage.models.base import FindingModel, ModelOutput
from triage.models.registry import RuntimeOptions
from triage.models.spec import ModelSpec
from triage.preprocess.ct import HeadCT, prepare_head_ct


class RecordingHeadModel(FindingModel[HeadCT, None]):
    """The haemorrhage model's real preparation (``prepare_head_ct``) with a network that only
    records what it was given."""

    def __init__(self, spec: ModelSpec, seen: list[HeadCT]) -> None:
        self.spec = spec
        self.seen = seen

    def prepare(self, paths: Sequence[Path]) -> HeadCT:
        return prepare_head_ct(paths)

    def predict(self, prepared: HeadCT) -> None:
        self.seen.append(prepared)

    def interpret(self, prepared: HeadCT, raw: None, series_uid: str) -> ModelOutput:
        return ModelOutput(findings=[])

    def weights_sha256(self) -> tuple[str, ...]:
        return ("0" * 64,)


@pytest.fixture(scope="module")
def jpeg_head_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 52-slice synthetic head CT, every slice JPEG Lossless (what archives send)."""
    paths = write_head_ct_series(tmp_path_factory.mktemp("ct"), PhantomSpec(seed=4))
    for path in paths:
        to_jpeg_lossless(path)
    return sorted(paths)


def _analyse(tmp_path: Path, paths: list[Path]) -> tuple[StudyAnalysis, list[HeadCT]]:
    seen: list[HeadCT] = []

    def build(spec: ModelSpec, options: RuntimeOptions) -> RecordingHeadModel:
        return RecordingHeadModel(spec, seen)

    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    analyzer = make_analyzer(tmp_path / "cache", factories={"blast-ct": build})
    result = analyzer.analyze(
        str(ds.StudyInstanceUID), [SeriesFiles(str(ds.SeriesInstanceUID), paths)]
    )
    return result, seen


def test_cut_slice_fails_the_study_with_the_reason_and_the_model_never_runs(
    tmp_path: Path, jpeg_head_ct: list[Path]
) -> None:
    paths = []
    for p in jpeg_head_ct:  # a copy: the fixture's files stay whole
        paths.append(tmp_path / p.name)
        paths[-1].write_bytes(p.read_bytes())
    cut_slice(paths[20])  # files are named in slice order: sorted slice 20
    result, seen = _analyse(tmp_path, paths)
    assert seen == []  # no model input was made
    assert result.ai_status == AIStatus.failed
    reason = (
        "1 of 52 image slice(s) hold incomplete pixel data, so the series is not used: "
        "sorted slice 20 (JPEG Lossless"
    )
    assert result.error is not None
    assert result.error.startswith(f"blast-ct-v1: {reason}")
    assert result.error.endswith("(cut short)")
    routing = result.routing
    (entry,) = [m for m in routing["models"] if m["model"] == "blast-ct-v1"]
    assert entry["status"] == "failed"
    assert entry["error"].startswith(reason)


def test_whole_jpeg_series_reaches_the_model(tmp_path: Path, jpeg_head_ct: list[Path]) -> None:
    result, seen = _analyse(tmp_path, jpeg_head_ct)
    assert result.ai_status == AIStatus.ok
    assert len(seen) == 1 and seen[0].hu.ndim == 3
