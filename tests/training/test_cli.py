"""``triage-train``: what a user sees for the mistakes they can make (one line, exit 2),
and the synthetic-data and feedback-export commands run as a user runs them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app


def _invoke(args: list[str], tmp_path: Path) -> tuple[int, str]:
    env = {"TRIAGE_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(app, args, env=env)
    return result.exit_code, result.output


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


def test_synth_ct_writes_a_dataset_and_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "ct"
    code, output = _invoke(
        [
            "synth",
            "ct",
            "--out",
            str(out),
            "--studies",
            "2",
            "--size",
            "small",
            "--base",
            "phantom",
        ],
        tmp_path,
    )
    assert code == 0, output
    with (out / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["finding"] for r in rows} == {"intracranial_haemorrhage"}
    code, output = _invoke(["synth", "ct", "--out", str(out), "--studies", "1"], tmp_path)
    assert code == 2
    assert "is not empty" in _one_error_line(output)


def test_fit_on_a_folder_that_is_no_dataset_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-dataset"
    folder.mkdir()
    code, output = _invoke(
        ["fit", "--dataset", str(folder), "--out", str(tmp_path / "run")], tmp_path
    )
    assert code == 2
    assert "dataset.json" in _one_error_line(output)


def test_promote_of_a_version_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    ds = tmp_path / "ct"
    _invoke(
        ["synth", "ct", "--out", str(ds), "--studies", "2", "--size", "small", "--base", "phantom"],
        tmp_path,
    )
    code, output = _invoke(
        [
            "promote",
            "--model",
            "blast-ct-v1",
            "--version",
            "7",
            "--dataset",
            str(ds),
            "--split",
            "all",
            "--registry-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        tmp_path,
    )
    assert code == 2
    assert "version 7" in _one_error_line(output)


@pytest.mark.parametrize("model", ["no-such-model"])
def test_an_unknown_model_is_one_line(tmp_path: Path, model: str) -> None:
    ds = tmp_path / "ct"
    _invoke(
        ["synth", "ct", "--out", str(ds), "--studies", "1", "--size", "small", "--base", "phantom"],
        tmp_path,
    )
    code, output = _invoke(
        ["evaluate", "--dataset", str(ds), "--model", model, "--split", "all"], tmp_path
    )
    assert code == 2
    assert model in _one_error_line(output)


def test_export_feedback_without_a_database_is_one_line(tmp_path: Path) -> None:
    code, output = _invoke(["export-feedback", "--out", str(tmp_path / "export")], tmp_path)
    assert code == 2
    _one_error_line(output)
