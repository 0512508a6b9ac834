"""In headless Chromium: the page and /docs work under their Content-Security-Policy, Swagger
UI loads from this server alone, and another site cannot frame the page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import running_server
from tests.e2e.conftest import chromium
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("browser-security")
    with running_server(data, {"TRIAGE_SERIES_QUIET_SECONDS": "60"}) as srv:
        yield srv


def chromium_log(url: str, profile: Path) -> tuple[str, str]:
    """The DOM after the page settled and Chromium's log (console messages, CSP violations
    among them)."""
    out = chromium(url, profile, "--enable-logging=stderr", "--v=0")
    return out.stdout, out.stderr


def test_page_runs_under_its_csp(server: ServerProcess, tmp_path: Path) -> None:
    dom, log = chromium_log(f"{server.http_url}/?live=0", tmp_path / "chrome")
    assert "No studies yet." in dom  # written by the page's inline script
    assert "Content Security Policy" not in log, log


def test_swagger_ui_renders_from_local_assets(server: ServerProcess, tmp_path: Path) -> None:
    dom, log = chromium_log(f"{server.http_url}/docs", tmp_path / "chrome")
    # The operations are listed: the bundle loaded (from this server; the CSP allows no
    # other origin) and read /openapi.json.
    assert dom.count("opblock-summary-path") >= 5, dom[-2000:]
    assert "/api/health" in dom and "/api/worklist" in dom
    assert "Content Security Policy" not in log, log


def test_another_site_cannot_frame_the_page(server: ServerProcess, tmp_path: Path) -> None:
    framing = tmp_path / "clickjack.html"
    framing.write_text(
        f'<html><body><iframe id="f" src="{server.http_url}/?live=0"></iframe></body></html>'
    )
    _, log = chromium_log(framing.as_uri(), tmp_path / "chrome")
    assert "frame-ancestors" in log or "X-Frame-Options" in log, log
