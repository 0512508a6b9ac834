"""The retraining loop end to end: a small synthetic set, a few fine-tuning steps from the
published weights, evaluation, registration in a temporary MLflow store, promotion, and a
running ``triage serve`` pointed at that store analysing a newly sent study with the new
version, without a restart; a worse candidate (trained from random weights) is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from typer.testing import CliRunner

from tests.conftest import running_server
from tests.e2e.conftest import send
from training.cli import app
from training.data.dataset import read_dataset
from training.data.splits import freeze_splits
from training.synth.ct import synth_ct_dataset
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.realdata]

MODEL = "blast-ct-v1"


def _run(args: list[str], env: dict[str, str]) -> Any:
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small synthetic head CTs; splits fixed by patient: the test split holds one
    haemorrhage and one normal study."""
    root = tmp_path_factory.mktemp("synth") / "ct"
    synth_ct_dataset(root, n_studies=6, seed=3, size="small", base="phantom")
    ds = read_dataset(root)
    by_patient: dict[str, list[Any]] = {}
    for r in ds.studies:
        by_patient.setdefault(r.patient_id, []).append(r)
    singles = [v[0] for v in by_patient.values() if len(v) == 1]
    positive = next(r for r in singles if r.label("intracranial_haemorrhage") == 1)
    negative = next(r for r in singles if r.label("intracranial_haemorrhage") == 0)
    test = {positive.study_uid, negative.study_uid}
    freeze_splits(
        root, {r.study_uid: "test" if r.study_uid in test else "train" for r in ds.studies}
    )
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, weights_mirror: Path) -> dict[str, str]:
    data = tmp_path_factory.mktemp("train-data")
    store = data / "mlflow"
    store.mkdir()
    return {
        "TRIAGE_DATA_DIR": str(data),
        "TRIAGE_MODEL_MIRROR": str(weights_mirror),
        "TRIAGE_MODEL_REGISTRY_URI": f"sqlite:///{store / 'mlflow.db'}",
        "TRIAGE_DEVICE": "cpu",
    }


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]
) -> Iterator[ServerProcess]:
    """``triage serve`` on the registry, started before anything is registered."""
    serve_env = {
        "TRIAGE_MODEL_MIRROR": env["TRIAGE_MODEL_MIRROR"],
        "TRIAGE_MODEL_REGISTRY_URI": env["TRIAGE_MODEL_REGISTRY_URI"],
        "TRIAGE_MODEL_REGISTRY_POLL_SECONDS": "1",
        "TRIAGE_DEVICE": "cpu",
        "TRIAGE_SERIES_QUIET_SECONDS": "1.5",
        "TRIAGE_MODELS": json.dumps([MODEL]),
    }
    with running_server(tmp_path_factory.mktemp("serve-data"), serve_env) as srv:
        yield srv


def _models_detail(server: ServerProcess) -> str:
    body = httpx.get(f"{server.http_url}/api/health", timeout=10).json()
    return str(body["components"]["models"]["detail"])


def _wait_for_version(server: ServerProcess, fragment: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    detail = ""
    while time.monotonic() < deadline:
        detail = _models_detail(server)
        if fragment in detail:
            return detail
        time.sleep(0.5)
    pytest.fail(f"serve never served {fragment}: {detail}\n{server.log()[-3000:]}")


def _analysed(server: ServerProcess, uid: str, timeout_s: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{server.http_url}/api/studies/{uid}", headers=server.headers, timeout=10)
        if r.status_code == 200:
            doc = r.json()
            if doc["ai_status"] != "pending":
                return doc
        time.sleep(0.5)
    pytest.fail(f"AI did not finish: {doc}\n{server.log()[-3000:]}")


def _fit_run(env: dict[str, str], version: str) -> Any:
    from mlflow import MlflowClient

    uri = env["TRIAGE_MODEL_REGISTRY_URI"]
    c = MlflowClient(tracking_uri=uri)
    experiment = c.get_experiment_by_name("triage")
    (run,) = [
        r
        for r in c.search_runs([experiment.experiment_id])
        if r.info.run_name == f"fit {MODEL} {version}"
    ]
    return run


def _version_tags(env: dict[str, str], version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    uri = env["TRIAGE_MODEL_REGISTRY_URI"]
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(MODEL, version)
    return dict(mv.tags)


def test_fit_register_promote_and_serve_without_restart(
    synthetic: Path,
    env: dict[str, str],
    server: ServerProcess,
    storescu: str,
    tmp_path: Path,
) -> None:
    # Before any promotion the server serves the built-in weights.
    assert f"{MODEL} 1.0.0 (built-in)" in _models_detail(server)

    fit = _run(
        [
            "fit",
            "--dataset",
            str(synthetic),
            "--out",
            str(tmp_path / "run1"),
            "--steps",
            "2",
            "--checkpoint-every",
            "1",
            "--threshold-rule",
            "keep",
        ],
        env,
    )
    assert fit.exit_code == 0, fit.output
    assert "registered" in fit.output and "version 1" in fit.output
    # The fine-tuned weights load in serving's loader (strict state dict, sha256 checked).
    spec = json.loads((tmp_path / "run1" / "candidate" / "spec.json").read_text())
    assert spec["name"] == MODEL and spec["version"].startswith("1.0.0-ft.")
    assert spec["params"]["training"]["steps"] == 2

    # The run logged the candidate's Dice and volume error on the test split, and its plots.
    run = _fit_run(env, spec["version"])
    assert {"test_dice_mean", "test_volume_abs_error_ml_mean", "train_loss"} <= set(
        run.data.metrics
    )
    assert 0.0 <= run.data.metrics["test_dice_mean"] <= 1.0
    assert run.data.params["started_from"].startswith("blast-ct-v1 member 7")
    promote = _run(
        ["promote", "--model", MODEL, "--version", "1", "--dataset", str(synthetic)], env
    )
    assert promote.exit_code == 0, promote.output
    assert "promoted" in promote.output
    tags = _version_tags(env, "1")
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.compared_with"] == "built-in 1.0.0"
    served = f"{spec['version']}+registry.1"
    _wait_for_version(server, served)

    # A study sent now is analysed by the promoted version.
    ds = read_dataset(synthetic)
    record = next(r for r in ds.studies if r.label("intracranial_haemorrhage") == 1)
    files = [p for s in record.series for p in s.paths]
    send(storescu, server, files)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    doc = _analysed(server, uid)
    assert doc["ai_status"] == "ok", doc.get("ai_error")
    (finding,) = [f for f in doc["findings"] if f["finding"] == "intracranial_haemorrhage"]
    assert finding["model"]["version"] == served
    assert finding["model"]["weights_sha256"][0] == spec["weights"][0]["sha256"]

    # A candidate trained from random weights is worse and is refused; the alias stays.
    worse = _run(
        [
            "fit",
            "--dataset",
            str(synthetic),
            "--out",
            str(tmp_path / "run2"),
            "--steps",
            "1",
            "--init",
            "random",
            "--threshold-rule",
            "keep",
        ],
        env,
    )
    assert worse.exit_code == 0, worse.output
    refused = _run(
        ["promote", "--model", MODEL, "--version", "2", "--dataset", str(synthetic)], env
    )
    assert refused.exit_code == 1, refused.output
    assert "refused" in refused.output
    tags = _version_tags(env, "2")
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.compared_with"] == "v1"
    assert served in _models_detail(server)
