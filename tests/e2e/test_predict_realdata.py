"""``triage predict`` on the real CQ500 head CT (normal by majority read): not flagged, with the
volumes the one-model pipeline measured before the model layer became a registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

#: ``triage predict`` before the model registry (commit 9179062), member 7, fp32, CPU.
BEFORE_VOLUMES_ML = {"IPH": 0.021, "EAH": 0.051, "oedema": 0.0, "IVH": 0.0}
BEFORE_SCORE = 0.29260462522506714


def _predict(cq500_dir: Path, weights_mirror: Path, tmp_path: Path, **env: str) -> dict[str, Any]:
    out = run_cli(
        ["predict", str(cq500_dir), "--json"],
        tmp_path,
        check=True,
        timeout=900,
        TRIAGE_MODEL_MIRROR=str(weights_mirror),
        TRIAGE_DEVICE="cpu",
        **env,
    )
    assert "CQ500" not in out.stderr  # no patient data in what the command logs
    doc = json.loads(out.stdout)
    (study,) = doc["studies"]
    assert study["ai_status"] == "ok", study
    (finding,) = study["findings"]
    assert finding["finding"] == "intracranial_haemorrhage"
    assert finding["flag"] is False and finding["severity"] is None, finding
    return dict(finding)


def test_real_normal_series_keeps_its_volumes_in_fp32(
    cq500_dir: Path, weights_mirror: Path, tmp_path: Path
) -> None:
    finding = _predict(cq500_dir, weights_mirror, tmp_path, TRIAGE_PRECISION="fp32")
    assert finding["volumes_ml"] == BEFORE_VOLUMES_ML
    assert finding["score"] == pytest.approx(BEFORE_SCORE, abs=1e-6)
    assert finding["details"]["precision"] == "fp32"
    assert finding["model"]["weights_sha256"] == [
        "af54c424b97f8dc4c62fe8c33af55d886d2dd444f4b55e9cab50f49af4084b86"  # model_7.pt
    ]


def test_real_normal_series_in_the_default_precision(
    cq500_dir: Path, weights_mirror: Path, tmp_path: Path
) -> None:
    """bf16 where the CPU computes it natively: the same volumes within 0.01 ml."""
    finding = _predict(cq500_dir, weights_mirror, tmp_path)
    for name, before in BEFORE_VOLUMES_ML.items():
        assert finding["volumes_ml"][name] == pytest.approx(before, abs=0.01), finding
    assert finding["details"]["blood_volume_ml"] < 0.5
