"""``triage models``: every installed model, its findings and thresholds, its weights' state."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import CHEST_MODEL, run_cli, write_chest_weights


def test_models_json_lists_both_models_and_the_state_of_their_weights(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    sha256 = write_chest_weights(mirror)
    data_dir = tmp_path / "data"
    env = {"TRIAGE_MODEL_MIRROR": str(mirror), "TRIAGE_DEVICE": "cpu"}
    out = run_cli(["models", "--json"], data_dir, check=True, **env)
    doc = json.loads(out.stdout)
    by_name = {m["name"]: m for m in doc["models"]}
    assert list(by_name) == ["blast-ct-v1", CHEST_MODEL]

    blast = by_name["blast-ct-v1"]
    assert blast["accepts"] == "CT HEAD" and blast["task"] == "segmentation"
    (ich,) = blast["findings"]
    assert ich["code"] == "intracranial_haemorrhage" and ich["escalate_to"] == "critical"
    assert ich["threshold"] == 0.5 and ich["unit"] == "ml"
    assert blast["weights_state"] == "missing"  # not in this mirror, not cached
    assert all(w["sha256_from"] == "spec" for w in blast["weights"])
    assert blast["runtime"]["device"] == "cpu" and blast["runtime"]["members"] == [7]

    chest = by_name[CHEST_MODEL]
    assert chest["accepts"] == "CR/DX CHEST PA/AP"
    critical = [f["code"] for f in chest["findings"] if f["escalate_to"] == "critical"]
    assert critical == ["pneumothorax"]
    assert chest["weights_state"] == "in mirror"
    (weights,) = chest["weights"]
    assert weights["sha256"] is None and weights["sha256_from"] == "none"  # nothing pinned yet
    assert doc["cpu"]["model"]

    # A site pin and a threshold of its own show up; so does a verified copy once fetched.
    pinned = run_cli(
        ["models", "--json"],
        data_dir,
        check=True,
        TRIAGE_WEIGHT_SHA256=json.dumps({f"{CHEST_MODEL}/{weights['file'].split('/')[1]}": sha256}),
        TRIAGE_FINDING_THRESHOLDS='{"pneumothorax": 0.7}',
        **env,
    )
    chest = {m["name"]: m for m in json.loads(pinned.stdout)["models"]}[CHEST_MODEL]
    assert chest["weights"][0]["sha256"] == sha256
    assert chest["weights"][0]["sha256_from"] == "site pin"
    assert (
        chest["findings"][0]["threshold"] == 0.7 and chest["findings"][0]["spec_threshold"] == 0.5
    )

    table = run_cli(["models"], data_dir, check=True, COLUMNS="160", **env)
    assert "blast-ct-v1" in table.stdout and "pneumothorax" in table.stdout


def test_unknown_model_name_is_one_clear_line(tmp_path: Path) -> None:
    out = run_cli(["models"], tmp_path, TRIAGE_MODELS='["no-such-model"]')
    assert out.returncode == 2
    assert "no-such-model" in out.stdout and "Traceback" not in out.stdout + out.stderr
