"""A real ``triage serve`` subprocess on free ports with a temporary data directory."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import running_server
from tests.e2e.browser import BUDGET_MS, Browser
from triage.demo.run import dcmtk_env, storescu_commands
from triage.serve.auth import SESSION_COOKIE
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


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url``."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def open_page(
    browser: Browser, url: str, *, cookie: str | None = None, budget_ms: int = BUDGET_MS
) -> str:
    """Open ``url`` in ``browser`` (signed in with the session ``cookie`` when given, as
    :meth:`ServerProcess.session_cookie` returns it) and let it settle in virtual time;
    the DOM."""
    if cookie is not None:
        browser.set_cookie(SESSION_COOKIE, cookie, origin(url))
    browser.navigate(url, budget_ms)
    return browser.dom()


def dump_dom(
    url: str, profile: Path, *, cookie: str | None = None, budget_ms: int = BUDGET_MS
) -> str:
    """The page's DOM after it has settled in headless Chromium with a fresh profile (what
    ``chromium --dump-dom --virtual-time-budget=8000`` printed), signed in with the session
    ``cookie`` when given. Skips when Debian's chromium is not installed."""
    with Browser(profile) as browser:
        return open_page(browser, url, cookie=cookie, budget_ms=budget_ms)
