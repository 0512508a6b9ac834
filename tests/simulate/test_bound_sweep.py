"""The flagged-fraction bound, the verdicts, the default number of days and the sweep."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from triage.cli import app
from triage.simulate.config import (
    DEFAULT_RUNS,
    SWEEP_DEFAULT_RUNS,
    SimulationConfig,
    parse_sweep,
    sweep_grid,
)
from triage.simulate.model import others_max_bound, run_experiment, run_sweep
from triage.simulate.report import (
    BORDERLINE,
    MET,
    NOT_MET,
    NOT_REACHABLE,
    UNMEASURABLE,
    goal_lines,
    ratio_ci,
    reachability,
    summary,
    sweep_rows,
    verdict,
    write_sweep_outputs,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "simulation.md"
SMALL = {"studies_per_day": 200, "radiologists": 1}


def small(**kw: object) -> SimulationConfig:
    return SimulationConfig.model_validate({**SMALL, **kw})


def test_the_bound_from_the_flagged_fraction_by_hand() -> None:
    # The headline: 5% critical, sensitivity 0.9, specificity 0.95.
    f = 0.05 * 0.9 + 0.95 * 0.05
    assert f == pytest.approx(0.0925)
    assert others_max_bound(f) == pytest.approx(1 / 0.9075)  # 1.1019: ceiling, rho = 1
    assert others_max_bound(f, 0.74) == pytest.approx(1 / (1 - 0.0925 * 0.74))  # floor
    assert others_max_bound(0.2, 0.5) == pytest.approx(1 / 0.9)
    assert others_max_bound(0.3) == pytest.approx(1 / 0.7)  # the 30%: 1.43
    assert others_max_bound(1 - 1 / 1.1) == pytest.approx(1.1)  # largest f for 1.1
    assert others_max_bound(0.0) == 1.0 and others_max_bound(0.5, 0.0) == 1.0
    assert math.isinf(others_max_bound(1.0))


def test_ratio_confidence_interval_by_hand() -> None:
    assert ratio_ci([2.0, 4.0], [1.0, 2.0]) == pytest.approx((2.0, 2.0))  # exact ratio
    # R = 2; y - R x = (-1, 1, 0), SD 1; SE = 1 / sqrt(3); t(2, 0.975) = 4.302653
    low, high = ratio_ci([1.0, 3.0, 2.0], [1.0, 1.0, 1.0])  # type: ignore[misc]
    assert (low, high) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / 3**0.5))
    assert ratio_ci([1.0], [1.0]) is None
    assert ratio_ci([1.0, float("nan"), 2.0], [1.0, 1.0, 1.0]) is not None


@pytest.mark.parametrize(
    ("ratio", "ci", "floor", "expected"),
    [
        (1.05, (1.03, 1.07), 1.04, MET),
        (1.09, (1.05, 1.12), 1.20, BORDERLINE),  # interval contains the goal
        (1.20, (1.15, 1.25), 1.05, NOT_MET),  # reachable in principle
        (1.20, (1.15, 1.25), 1.15, NOT_REACHABLE),  # floor above the goal
        (1.20, None, 1.15, NOT_REACHABLE),  # one day: no interval
        (1.05, None, None, MET),
        (None, None, None, UNMEASURABLE),
    ],
)
def test_verdicts(
    ratio: float | None, ci: tuple[float, float] | None, floor: float | None, expected: str
) -> None:
    assert verdict(ratio, ci, 1.1, floor) == expected


def test_reachability_from_the_bounds() -> None:
    assert reachability(1.1, floor=1.05, ceiling=others_max_bound(0.08)) == "by construction"
    assert reachability(1.1, floor=1.07, ceiling=others_max_bound(0.0925)) == "depends on load"
    assert reachability(1.1, floor=1.3, ceiling=others_max_bound(0.3)) == "not reachable"


def test_a_high_flagged_fraction_is_reported_unreachable() -> None:
    # About 55% of the studies flagged: 1/(1 - f) = 2.2; the goal 1.1 is out of reach. Two
    # readers, ~93% utilised, so that the backlog peaks in the evening as in the headline.
    cfg = small(studies_per_day=340, radiologists=2, prevalence=0.3, specificity=0.6, seed=1)
    exp = run_experiment(cfg, 3)
    summ = summary(exp)
    counts = [r.counts["flagged"] / r.counts["studies"] for r in exp.runs]
    assert summ["flagged"]["fraction"]["mean"] == pytest.approx(sum(counts) / 3)
    assert [r.flagged_fraction for r in exp.runs] == counts
    bound = summ["others_max_bound"]
    assert bound["ceiling"] == pytest.approx(1 / (1 - bound["flagged_work_fraction"]))
    assert 1.1 < bound["floor"] <= bound["ceiling"]
    assert bound["reachable"] == "not reachable"
    assert summ["goals"]["others_max"]["verdict"] == NOT_REACHABLE
    lines = goal_lines(exp, summ)
    assert "not reachable at f = " in lines[1] and "NOT MET" not in lines[1]
    low, high = summ["ratios"]["others_max_ci"]
    assert 1.1 < low <= summ["ratios"]["others_max"] <= high


def test_sweep_one_row_per_cell_flagged_fraction_follows_the_parameters(tmp_path: Path) -> None:
    params = [parse_sweep("prevalence=0.05,0.3"), parse_sweep("specificity=0.7,0.95")]
    cells = sweep_grid(small(seed=2), params, 2)
    assert [values for values, _ in cells] == [
        {"prevalence": 0.05, "specificity": 0.7},
        {"prevalence": 0.05, "specificity": 0.95},
        {"prevalence": 0.3, "specificity": 0.7},
        {"prevalence": 0.3, "specificity": 0.95},
    ]
    assert all(cfg.prevalence == v["prevalence"] for v, cfg in cells)
    rows, paths = write_sweep_outputs(run_sweep(cells, params, 2), tmp_path)
    assert len(rows) == 4 and all(r["days"] == 2 for r in rows)
    f = {(r["prevalence"], r["specificity"]): r["flagged_fraction"] for r in rows}
    for spec in (0.7, 0.95):
        assert f[(0.3, spec)] > f[(0.05, spec)]  # rises with prevalence
    for prev in (0.05, 0.3):
        assert f[(prev, 0.95)] < f[(prev, 0.7)]  # falls with specificity
    for r in rows:
        assert r["ceiling"] == pytest.approx(1 / (1 - r["flagged_work_fraction"]))
        assert r["others_max_verdict"] in (MET, NOT_MET, BORDERLINE, NOT_REACHABLE)
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert doc["parameters"] == {"prevalence": [0.05, 0.3], "specificity": [0.7, 0.95]}
    assert len(doc["cells"]) == 4 and doc["days_per_cell"] == 2
    assert (tmp_path / "sweep.md").read_text().count("\n| 0.") == 4
    assert [p.name for p in paths] == ["sweep.json", "sweep.md", "sweep.png"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sweep_rows(run_sweep(cells[:1], params, 1))[0]["critical_median_ci"] is None


def test_the_default_days_are_what_the_docs_state() -> None:
    text = DOCS.read_text(encoding="utf-8")
    stated = re.search(r"`--runs` \(default (\d+)", text)
    assert stated is not None and int(stated.group(1)) == DEFAULT_RUNS
    per_cell = re.search(r"(\d+) days per cell by default", text)
    assert per_cell is not None and int(per_cell.group(1)) == SWEEP_DEFAULT_RUNS
    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert f"Default {DEFAULT_RUNS}" in result.output
    assert f"{SWEEP_DEFAULT_RUNS} per cell" in result.output


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such=1,2", "cannot sweep 'no_such'"),
        ("policy=1", "cannot sweep 'policy'"),
        ("prevalence=0.1,abc", "'abc' is not a number"),
        ("prevalence=0.1,", "'' is not a number"),
        ("prevalence=1.5", "prevalence=1.5: Input should be less than or equal to 1"),
        ("radiologists=2.5", "'2.5' is not a whole number"),
        ("prevalence", "expected NAME=v1,v2"),
    ],
)
def test_cli_sweep_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, spec: str, message: str
) -> None:
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path), "--sweep", spec])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --sweep") and message in lines[0]
    assert not any(tmp_path.iterdir())  # nothing simulated, nothing written


def test_cli_sweep_bounds_are_enforced(tmp_path: Path) -> None:
    many = ",".join(str(0.01 * k) for k in range(1, 8))
    for args, message in [
        (["--sweep", f"prevalence={many}", "--sweep", f"specificity={many}"], "49 cells"),
        (["--sweep", "prevalence=0.1,0.2", "--runs", "300"], "at most 400"),
        (["--sweep", "prevalence=0.1", "--sweep", "prevalence=0.2"], "given twice"),
        (
            ["--sweep", "prevalence=0.1", "--sweep", "sensitivity=1", "--sweep", "radiologists=2"],
            "at most 2 parameters",
        ),
    ]:
        result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path), *args])
        assert result.exit_code == 2, args
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
