"""A real ``triage serve`` subprocess on free ports with a temporary data directory."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import running_server
from triage.demo.run import dcmtk_env, storescu_commands
from triage.serve.launcher import ServerProcess


def send(
    storescu: str, server: ServerProcess, paths: list[Path], calling_ae: str = "TESTSCU"
) -> None:
    """Send with DCMTK storescu, each file in its own transfer syntax."""
    for cmd in storescu_commands(
        storescu,
        paths,
        host="127.0.0.1",
        port=server.dicom_port,
        called_ae=server.ae_title,
        calling_ae=calling_ae,
    ):
        subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=dcmtk_env())


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, weights_mirror: Path
) -> Iterator[ServerProcess]:
    env = {
        "TRIAGE_MODEL_MIRROR": str(weights_mirror),
        "TRIAGE_DEVICE": "cpu",
        "TRIAGE_SERIES_QUIET_SECONDS": "1.5",
    }
    with running_server(tmp_path_factory.mktemp("triage-data"), env) as srv:
        yield srv


def chromium(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``url`` with a fresh profile, after the page has settled in
    virtual time (no waiting on the wall clock), with the DOM on stdout (``--dump-dom``);
    ``flags`` are added (e.g. logging). Skips when Debian's chromium is not installed."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    return subprocess.run(
        [
            path,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=8000",
            *flags,
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after it has settled (see :func:`chromium`)."""
    return chromium(url, profile).stdout
