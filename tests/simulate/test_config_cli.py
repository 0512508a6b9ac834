"""Simulator settings from files, and ``triage simulate`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import run_cli
from triage.simulate.config import SimulationConfig, load_config

TOML = """
studies_per_day = 200
radiologists = 1
prevalence = 0.1
ai_modalities = ["CT head", "CT chest"]

[policy]
aging_fraction = 0.5

[policy.sla_minutes]
critical = 15.0
stat = 30.0
urgent = 60.0
routine = 120.0

[modalities.CR]
fraction = 0.5
median_minutes = 2.0
p90_minutes = 4.0

[modalities."CT head"]
fraction = 0.3
median_minutes = 6.0
p90_minutes = 12.0
max_minutes = 60.0

[modalities."CT chest"]
fraction = 0.2
median_minutes = 10.0
p90_minutes = 20.0
"""


def test_toml_and_json_give_the_same_configuration(tmp_path: Path) -> None:
    toml_path = tmp_path / "sim.toml"
    toml_path.write_text(TOML)
    cfg = load_config(toml_path)
    assert cfg.studies_per_day == 200 and cfg.policy.sla_minutes["routine"] == 120.0
    assert cfg.policy.aging_fraction == 0.5 and set(cfg.modalities) == {"CR", "CT head", "CT chest"}
    json_path = tmp_path / "sim.json"
    json_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert load_config(json_path) == cfg
    assert load_config(None) == SimulationConfig()


def test_defaults_give_the_intended_load() -> None:
    cfg = SimulationConfig()
    assert cfg.n_studies == 2000
    assert 0.85 <= cfg.offered_utilisation() <= 0.95


@pytest.mark.parametrize(
    "bad",
    [
        {"arrival_profile": [1.0] * 23},
        {"ai_modalities": ["PET"]},
        {"finding_code": "pleural_effusion"},  # reported by a model, never escalated
        {"sensitivity": 1.5},
        {"radiologists_by_hour": [0] * 24},
        {"modalities": {"CR": {"fraction": 1, "median_minutes": 3, "p90_minutes": 2}}},
        {"no_such_field": 1},
    ],
)
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SimulationConfig.model_validate(bad)


def test_cli_writes_the_table_json_markdown_and_plots(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text(TOML)
    out = tmp_path / "out"
    proc = run_cli(
        ["simulate", "--config", str(cfg), "--out", str(out), "--seed", "3", "--runs", "2"],
        tmp_path / "data",
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "FIFO" in proc.stdout and "goal" in proc.stdout
    doc = json.loads((out / "simulation.json").read_text())
    assert [r["seed"] for r in doc["runs"]] == [3, 4]
    assert doc["config"]["studies_per_day"] == 200
    assert doc["runs"][0]["disciplines"]["fifo"]["critical"]["n"] > 0
    assert set(doc["summary"]["goals"]) >= {"critical_median", "others_max"}
    bound = doc["summary"]["others_max_bound"]
    assert bound["ceiling"] == pytest.approx(1 / (1 - bound["flagged_work_fraction"]), abs=1e-9)
    assert len(doc["summary"]["ratios"]["others_max_ci"]) == 2
    assert all("flagged_fraction" in r for r in doc["runs"])
    assert "ceiling 1/(1-f)" in proc.stdout and "flagged f" in proc.stdout
    md = (out / "simulation.md").read_text()
    assert "| critical: median wait |" in md and "late, order SLA" in md
    assert "| others' max <= 1.1 x FIFO |" in md
    for png in ("wait_cdf.png", "queue_length.png", "others_max_vs_flagged.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sweep_writes_the_grid(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text(TOML)
    out = tmp_path / "out"
    args = ["simulate", "--config", str(cfg), "--out", str(out), "--runs", "2"]
    args += ["--sweep", "prevalence=0.05,0.2", "--sweep", "specificity=0.8,0.95,0.99"]
    proc = run_cli(args, tmp_path / "data")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "6 cells x 2 simulated day(s)" in proc.stdout and "ceiling" in proc.stdout
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["cells"]) == 6 and doc["config"]["studies_per_day"] == 200
    assert {(c["prevalence"], c["specificity"]) for c in doc["cells"]} == {
        (p, s) for p in (0.05, 0.2) for s in (0.8, 0.95, 0.99)
    }
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "simulation.json").exists()


def test_cli_refuses_a_bad_settings_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("prevalence = 2.0\n")
    proc = run_cli(["simulate", "--config", str(bad), "--out", str(tmp_path)], tmp_path / "d")
    assert proc.returncode == 2
    assert "cannot read the simulation settings" in proc.stdout
