"""``triage worker``: a user's mistake is one ``error:`` line and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from triage.db import Database


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A data folder as ``triage serve`` leaves it: a store and a migrated database."""
    data = tmp_path / "data"
    (data / "dicom").mkdir(parents=True)
    db = Database(f"sqlite:///{data / 'triage.db'}")
    db.migrate()
    db.dispose()
    return data


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def test_a_folder_without_a_store_is_named(tmp_path: Path) -> None:
    out = run_cli(["worker"], tmp_path / "elsewhere")
    assert out.returncode == 2
    line = one_error_line(out.stderr)
    assert "no DICOM store" in line and "TRIAGE_DATA_DIR" in line
    assert not (tmp_path / "elsewhere").exists()  # nothing made there


def test_a_store_without_a_database_is_named(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    out = run_cli(["worker"], tmp_path)
    assert out.returncode == 2
    assert "no triage database" in one_error_line(out.stderr)
    assert not (tmp_path / "triage.db").exists()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--device", "gpu"], {}, "--device gpu: use auto, cpu, cuda or cuda:N"),
        ([], {"TRIAGE_DEVICE": "tpu"}, "TRIAGE_DEVICE"),
        ([], {"TRIAGE_MODELS": '["no-such-model"]'}, "model configuration"),
        ([], {"TRIAGE_JOB_LEASE_SECONDS": "0"}, "TRIAGE_JOB_LEASE_SECONDS"),
    ],
    ids=["device-option", "device-setting", "unknown-model", "lease"],
)
def test_invalid_settings_are_one_line(
    data_dir: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    out = run_cli(["worker", *args], data_dir, **env)
    assert out.returncode == 2
    assert expected in one_error_line(out.stderr)
