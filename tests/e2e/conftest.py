"""A real ``triage serve`` subprocess on free ports with a temporary data directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from triage.demo.run import dcmtk_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    http_url: str
    dicom_port: int
    ae_title: str
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def storescu() -> str:
    path = dcmtk_tool("storescu")
    if path is None:
        pytest.skip("DCMTK storescu is not installed (apt-get install dcmtk; .ci/run does)")
    return path


def send(storescu: str, server: Server, paths: list[Path], calling_ae: str = "TESTSCU") -> None:
    subprocess.run(
        [
            storescu,
            "-aet",
            calling_ae,
            "-aec",
            server.ae_title,
            "127.0.0.1",
            str(server.dicom_port),
            *[str(p) for p in paths],
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, weights_mirror: Path) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("triage-data")
    http_port, dicom_port = free_port(), free_port()
    env = {
        **os.environ,
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_DICOM_HOST": "127.0.0.1",
        "TRIAGE_AE_TITLE": "TRIAGE",
        "TRIAGE_MODEL_MIRROR": str(weights_mirror),
        "TRIAGE_DEVICE": "cpu",
        "TRIAGE_SERIES_QUIET_SECONDS": "1.5",
    }
    env.pop("TRIAGE_DATABASE_URL", None)
    log_path = data_dir / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "triage.cli", "serve"], env=env, stdout=log, stderr=log
        )
    srv = Server(f"http://127.0.0.1:{http_port}", dicom_port, "TRIAGE", data_dir, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"triage serve exited early:\n{srv.log()}")
            try:
                if httpx.get(f"{srv.http_url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"triage serve did not come up:\n{srv.log()}")
            time.sleep(0.2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
