"""Errors a user can cause are one clear line on stderr and a non-zero exit, not a traceback.

Through the ``triage`` command in a child process: a missing data folder (and
``--data-dir``), a port another program holds, and ``predict``/``demo`` when the AI could
analyse nothing because the model weights are missing.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import pydicom_file, run_cli
from triage.serve.launcher import free_port

WIDE = {"COLUMNS": "200"}


def error_line(out: Any) -> str:
    """The command's stderr, which must be one ``error:`` line (logging aside)."""
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out.stderr
    return str(lines[0])


# ---- the data folder ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["worklist", "quarantine"])
def test_reading_commands_name_a_folder_without_a_database(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nowhere"
    out = run_cli([command], missing)
    assert out.returncode == 2
    line = error_line(out)
    assert f"no triage database in {missing.resolve()}" in line
    assert "--data-dir" in line and "TRIAGE_DATA_DIR" in line
    assert not missing.exists()  # nothing created for a command that only reads

    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_cli([command, "--data-dir", str(empty)], tmp_path / "elsewhere")
    assert out.returncode == 2
    assert f"no triage database in {empty.resolve()}" in error_line(out)
    assert list(empty.iterdir()) == []


def test_data_dir_option_overrides_the_environment(tmp_path: Path) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    ct = pydicom_file("CT_small.dcm")
    done = run_cli(["import", "--data-dir", str(here), str(ct)], there)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (here / "triage.db").is_file() and not there.exists()

    listed = run_cli(["worklist", "--json", "--data-dir", str(here)], there)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["items"]) == 1
    quarantined = run_cli(["quarantine", "--json", "--data-dir", str(here)], there)
    assert quarantined.returncode == 0 and json.loads(quarantined.stdout)["items"] == []
    # Without the option the environment's folder is read (and it has no database).
    assert run_cli(["worklist"], there).returncode == 2


@pytest.mark.parametrize(
    "command", ["worklist", "quarantine", "import", "serve", "demo", "predict", "models"]
)
def test_help_names_the_data_folder_setting(tmp_path: Path, command: str) -> None:
    out = run_cli([command, "--help"], tmp_path, **WIDE)
    assert out.returncode == 0, out.stderr
    assert "--data-dir" in out.stdout and "TRIAGE_DATA_DIR" in out.stdout


# ---- ports ---------------------------------------------------------------------------------


@pytest.fixture()
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another program is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize(
    ("which", "setting"), [("dicom", "TRIAGE_DICOM_PORT"), ("http", "TRIAGE_HTTP_PORT")]
)
def test_a_taken_port_is_named_with_its_setting(
    tmp_path: Path, held_port: int, command: str, which: str, setting: str
) -> None:
    ports = {"dicom": free_port(), "http": free_port(), which: held_port}
    data_dir = tmp_path / "data"
    out = run_cli(
        [command],
        data_dir,
        timeout=60,
        TRIAGE_DICOM_HOST="127.0.0.1",
        TRIAGE_HTTP_HOST="127.0.0.1",
        TRIAGE_DICOM_PORT=str(ports["dicom"]),
        TRIAGE_HTTP_PORT=str(ports["http"]),
    )
    assert out.returncode == 2
    line = error_line(out)
    assert f"port {held_port} on 127.0.0.1 is already in use" in line
    assert setting in line
    assert not data_dir.exists()  # refused before anything was started or created


# ---- predict and demo without model weights -------------------------------------------------


def offline_specs(folder: Path) -> Path:
    """The shipped model specs with every download URL pointing at a closed local port, so
    that weights missing from the mirror are missing (no download, even with a network)."""
    from importlib import resources

    def offline(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: "http://127.0.0.1:9/none" if k == "url" else offline(v) for k, v in node.items()
            }
        if isinstance(node, list):
            return [offline(v) for v in node]
        return node

    folder.mkdir(parents=True)
    for spec in (resources.files("triage.models") / "specs").iterdir():
        if spec.name.endswith(".json"):
            doc = offline(json.loads(spec.read_text(encoding="utf-8")))
            (folder / spec.name).write_text(json.dumps(doc), encoding="utf-8")
    return folder


def no_weights_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "empty-mirror").mkdir()
    return {
        "TRIAGE_MODEL_SPECS_DIR": str(offline_specs(tmp_path / "specs")),
        "TRIAGE_MODEL_MIRROR": str(tmp_path / "empty-mirror"),
        "TRIAGE_DEVICE": "cpu",
    }


@pytest.mark.slow
def test_predict_exits_non_zero_when_no_study_was_analysed(tmp_path: Path) -> None:
    from triage.demo.phantom import PhantomSpec, write_head_ct_series

    series = tmp_path / "ct"
    write_head_ct_series(series, PhantomSpec(haemorrhage=True, seed=2))
    env = no_weights_env(tmp_path)
    out = run_cli(["predict", str(series)], tmp_path / "data", timeout=600, **env, **WIDE)
    assert out.returncode == 1, out.stdout + out.stderr
    line = error_line(out)
    assert line.startswith("error: no study was analysed: 1 failed (blast-ct-v1: model weights")
    assert "TRIAGE_MODEL_MIRROR" in line
    # --json still prints the document (for programs), and exits 1 the same way.
    out = run_cli(["predict", "--json", str(series)], tmp_path / "data", timeout=600, **env)
    assert out.returncode == 1
    (study,) = json.loads(out.stdout)["studies"]
    assert study["ai_status"] == "failed"


@pytest.mark.slow
def test_predict_exits_non_zero_when_no_model_applies(tmp_path: Path) -> None:
    lateral = pydicom_file("CT_small.dcm")  # a small CT that no installed model reads
    out = run_cli(["predict", str(lateral)], tmp_path / "data", timeout=600, **WIDE)
    assert out.returncode == 1, out.stdout + out.stderr
    line = error_line(out)
    assert "no study was analysed: 1 no applicable model" in line
    assert "triage models" in line


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_exits_non_zero_when_every_analysis_failed(tmp_path: Path) -> None:
    env = {
        **no_weights_env(tmp_path),
        "TRIAGE_DICOM_HOST": "127.0.0.1",
        "TRIAGE_HTTP_HOST": "127.0.0.1",
        "TRIAGE_DICOM_PORT": str(free_port()),
        "TRIAGE_HTTP_PORT": str(free_port()),
        "TRIAGE_SERIES_QUIET_SECONDS": "1",
        **WIDE,
    }
    out = run_cli(["demo", "--exit"], tmp_path / "data", timeout=600, **env)
    assert out.returncode == 1, out.stdout + out.stderr
    line = error_line(out)
    assert line.startswith("error: the AI analysed none of the 3 demo studies: ")
    assert "TRIAGE_MODEL_MIRROR" in line  # the reason, with its fix
    assert "Reading worklist" in out.stdout  # the worklist was shown first
