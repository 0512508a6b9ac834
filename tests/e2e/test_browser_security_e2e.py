"""In headless Chromium: the page and /docs work under their Content-Security-Policy, Swagger
UI loads from this server alone, and another site cannot frame the page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import running_server
from tests.e2e.browser import Browser
from tests.e2e.conftest import open_page
from triage.serve.auth import SESSION_COOKIE
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("browser-security")
    with running_server(data, {"TRIAGE_SERIES_QUIET_SECONDS": "60"}) as srv:
        yield srv


def page_and_log(url: str, profile: Path, cookie: str | None = None) -> tuple[str, str]:
    """The DOM after the page settled and what the browser logged meanwhile (console
    messages, CSP violations among them), one line each."""
    with Browser(profile) as browser:
        dom = open_page(browser, url, cookie=cookie)
        return dom, browser.console_text()


def test_page_runs_under_its_csp(server: ServerProcess, tmp_path: Path) -> None:
    dom, log = page_and_log(
        f"{server.http_url}/?live=0", tmp_path / "chrome", server.session_cookie()
    )
    assert "No studies yet." in dom  # written by the page's inline script
    assert "Content Security Policy" not in log, log


def test_login_page_runs_under_its_csp(server: ServerProcess, tmp_path: Path) -> None:
    dom, log = page_and_log(f"{server.http_url}/", tmp_path / "chrome")  # no session
    assert 'id="username"' in dom and 'id="problem"' in dom
    assert "Content Security Policy" not in log, log


def test_swagger_ui_renders_from_local_assets(server: ServerProcess, tmp_path: Path) -> None:
    dom, log = page_and_log(f"{server.http_url}/docs", tmp_path / "chrome")
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
    # Signed in, though a SameSite=Lax cookie is not sent to a frame on another site: the
    # frame gets the sign-in page, which may not be framed either.
    with Browser(tmp_path / "chrome") as browser:
        browser.set_cookie(SESSION_COOKIE, server.session_cookie(), server.http_url)
        browser.navigate(framing.as_uri())
        log = browser.console_text()
    assert "frame-ancestors" in log or "X-Frame-Options" in log, log
