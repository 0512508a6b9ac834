"""``triage predict`` on the real CQ500 head CT (normal by majority read): not flagged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_real_normal_series_is_not_flagged(
    cq500_dir: Path, weights_mirror: Path, tmp_path: Path
) -> None:
    out = run_cli(
        ["predict", str(cq500_dir), "--json"],
        tmp_path,
        check=True,
        timeout=900,
        TRIAGE_MODEL_MIRROR=str(weights_mirror),
        TRIAGE_DEVICE="cpu",
    )
    doc = json.loads(out.stdout)
    assert len(doc["studies"]) == 1
    study = doc["studies"][0]
    assert study["ai_status"] == "ok", study
    (finding,) = study["findings"]
    assert finding["finding"] == "intracranial_haemorrhage"
    assert finding["flag"] is False, finding
    blood = sum(v for k, v in finding["volumes_ml"].items() if k != "oedema")
    assert blood < 0.5, finding
    # No patient data in what the command logs.
    assert "CQ500" not in out.stderr
