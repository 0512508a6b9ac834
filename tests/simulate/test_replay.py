"""``triage simulate --replay``: a simulated day replayed through a real ``triage serve``.

The server is a real subprocess (SQLite, embedded worker) started with the settings that
``triage simulate --replay-setup`` writes (the policy scaled by the speed, the replay model
alone); the day is replayed by the real CLI, and what the server holds afterwards is read
back through its API with the admin's token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.conftest import run_cli
from triage.models.spec import ModelSpec
from triage.serve.launcher import ServerProcess, free_port
from triage.simulate.config import SimulationConfig
from triage.simulate.model import generate_studies
from triage.simulate.replay import StudyUids, study_instance
from triage.simulate.replay_model import (
    MODEL_NAME,
    PROTOCOL_NOT_COVERED,
    ReplayFindingModel,
    spec_document,
)
from triage.simulate.replay_setup import (
    ENV_FILE,
    POLICY_FILE,
    SPEC_DIR,
    TOKENS_FILE,
    prepare_replay,
    scaled_policy,
)
from triage.worklist.priority import load_policy

SPEED = 600
# A short day: 10 studies in one hour (6 s at 600x), 2 readers, 3 of 4 critical studies in
# modalities the simulated AI covers (a CR is critical and missed), every order priority and
# location present; sensitivity and specificity 1, so the AI flags exactly the covered
# critical studies.
CONFIG = {
    "duration_hours": 1.0,
    "studies_per_day": 240,
    "radiologists": 2,
    "prevalence": 0.3,
    "sensitivity": 1.0,
    "specificity": 1.0,
    "ai_modalities": ["CT head", "CT chest", "CT abdomen", "MR"],
    "seed": 3,
}


@dataclass
class ReplayServer:
    server: ServerProcess
    setup_dir: Path
    config_path: Path
    tokens_path: Path


@pytest.fixture(scope="module")
def replay_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplayServer]:
    """A server started from ``triage simulate --replay-setup``'s files."""
    root = tmp_path_factory.mktemp("replay")
    config_path = root / "sim.json"
    config_path.write_text(json.dumps(CONFIG))
    setup_dir, data_dir = root / "setup", root / "server-data"
    done = run_cli(
        ["simulate", "--replay-setup", str(setup_dir), "--speed", str(SPEED), "--config",
         str(config_path), "--data-dir", str(data_dir)],
        root / "cli-data",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "triage serve" in done.stdout
    env = {}
    for line in (setup_dir / ENV_FILE).read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value.strip("'")
    assert env["TRIAGE_MODELS"] == f'["{MODEL_NAME}"]'
    server = ServerProcess(data_dir, {k: v for k, v in env.items() if k != "TRIAGE_DATA_DIR"})
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield ReplayServer(server, setup_dir, config_path, setup_dir / TOKENS_FILE)
    finally:
        server.stop()


def _replay(rs: ReplayServer, out: Path, *extra: str, url: str | None = None) -> tuple[int, str]:
    done = run_cli(
        ["simulate", "--replay", url or rs.server.http_url, "--tokens", str(rs.tokens_path),
         "--speed", str(SPEED), "--config", str(rs.config_path), "--out", str(out), *extra],
        out.parent / "cli-data",
        timeout=120,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


@pytest.mark.e2e
def test_replayed_day_is_read_once_flagged_and_compared(
    replay_server: ReplayServer, tmp_path: Path
) -> None:
    cfg = SimulationConfig.model_validate(CONFIG)
    studies = generate_studies(cfg)
    assert sum(s.critical and s.ai_flag for s in studies) >= 2
    assert any(s.critical and not s.ai_covered for s in studies)

    rc, output = _replay(replay_server, tmp_path / "out")
    assert rc == 0, output

    # What the server holds: every study read once, by a replay reader, with the simulated
    # order and location and the simulated AI's flags as the server's own findings.
    with replay_server.server.client() as client:
        answer = client.get("/api/worklist", params={"include_completed": "true"})
        assert answer.status_code == 200
        items = answer.json()["items"]
    assert len(items) == len(studies)
    by_index = {int(item["AccessionNumber"][3:]): item for item in items}
    readers = json.loads(replay_server.tokens_path.read_text())["readers"]
    accounts = {r["account"] for r in readers}
    for study in studies:
        item = by_index[study.index]
        assert item["read_state"] == "completed"
        assert item["completed_by"] in accounts
        assert item["order_priority"] == study.order_priority
        assert item["location_class"] == study.location
        flags = [f for f in item["findings"] if f["flag"]]
        if study.ai_covered:
            assert item["ai_status"] == "ok"
            assert {f["model"]["name"] for f in item["findings"]} == {MODEL_NAME}
            assert bool(flags) == study.ai_flag
        else:
            assert item["ai_status"] == "no_applicable_model" and not item["findings"]
        if study.critical and study.ai_covered:
            assert flags and flags[0]["finding"] == cfg.finding_code
            assert item["priority_class"] == "critical"

    # What the replay reports: both orderings on the same day.
    doc = json.loads((tmp_path / "out" / "replay.json").read_text())
    checks = doc["checks"]
    assert checks["read_exactly_once"] and checks["claims"] == len(studies)
    assert checks["server_completed"] == len(studies)
    assert checks["server_flags_of_simulated"] == checks["simulated_flags"] >= 2
    assert checks["server_flags_not_simulated"] == 0
    assert set(doc["disciplines"]) == {"fifo", "policy_no_ai", "triage", "server"}
    for ordering in doc["disciplines"].values():
        assert ordering["critical"]["n"] + ordering["others"]["n"] == len(studies)
        assert ordering["critical"]["max"] is not None and ordering["others"]["mean"] is not None
    assert doc["server"]["policy_config"] == scaled_policy(cfg.policy, SPEED).digest()
    assert [s["index"] for s in doc["studies"]] == [s.index for s in studies]
    assert all(s["start"]["server"] >= s["arrival"] for s in doc["studies"])
    report = (tmp_path / "out" / "replay.md").read_text()
    assert "| critical: mean wait |" in report and "server (replay)" in report
    assert "triage (sim)" in report and "FIFO (sim)" in report
    assert "critical: p95 wait" in output


@pytest.mark.e2e
def test_server_policy_for_another_speed_is_refused(
    replay_server: ReplayServer, tmp_path: Path
) -> None:
    rc, output = _replay(replay_server, tmp_path / "out", "--speed", "300")
    assert rc == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the server's policy is"), output
    assert "--speed 300" in lines[0] and "Traceback" not in output
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_bad_token_is_refused(replay_server: ReplayServer, tmp_path: Path) -> None:
    tokens = json.loads(replay_server.tokens_path.read_text())
    tokens["readers"][1]["token"] = "trg_" + "x" * 43
    bad = tmp_path / "bad-tokens.json"
    bad.write_text(json.dumps(tokens))
    rs = ReplayServer(replay_server.server, replay_server.setup_dir, replay_server.config_path, bad)
    rc, output = _replay(rs, tmp_path / "out")
    assert rc == 2, output
    assert output.strip() == "error: reader token 2: the server does not accept the token (401)"


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    config_path = tmp_path / "sim.json"
    config_path.write_text(json.dumps(CONFIG))
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"ingest": "trg_a", "readers": ["trg_b", "trg_c"]}))
    url = f"http://127.0.0.1:{free_port()}"
    done = run_cli(
        ["simulate", "--replay", url, "--tokens", str(tokens), "--config", str(config_path)],
        tmp_path / "cli-data",
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach {url}: no answer")
    assert done.stdout == ""


def test_setup_files_describe_the_scaled_policy_and_the_replay_model(tmp_path: Path) -> None:
    """What the server reads back: the policy file's digest is the scaled policy's, the spec
    folder holds the replay model alone, and its model reports what the instance carries."""
    cfg = SimulationConfig.model_validate(CONFIG)
    setup = prepare_replay(tmp_path, cfg, SPEED, make_tokens=False)
    assert load_policy(tmp_path / POLICY_FILE).digest() == setup.policy_digest
    assert load_policy(tmp_path / POLICY_FILE).sla_minutes["critical"] == pytest.approx(15 / SPEED)
    assert [p.name for p in (tmp_path / SPEC_DIR).iterdir()] == [f"{MODEL_NAME}.json"]
    spec = ModelSpec.from_json(json.loads((tmp_path / SPEC_DIR / f"{MODEL_NAME}.json").read_text()))
    assert spec.to_json() == ModelSpec.from_json(spec_document()).to_json()
    model = ReplayFindingModel(spec)
    for study in generate_studies(cfg):
        path = tmp_path / f"{study.index}.dcm"
        path.write_bytes(study_instance(study, cfg.finding_code, StudyUids.new()))
        ds = pydicom.dcmread(path)
        assert ds.RequestedProcedurePriority == study.order_priority
        if not study.ai_covered:
            assert ds.ProtocolName == PROTOCOL_NOT_COVERED
            continue
        (finding,) = model.run([path], str(ds.SeriesInstanceUID)).findings
        assert finding.finding == cfg.finding_code and finding.flag == study.ai_flag
        assert finding.model.name == MODEL_NAME
