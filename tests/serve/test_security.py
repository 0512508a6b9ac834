"""Host check (DNS rebinding), security headers, the page's CSP and /docs from local files."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.signin import auth_headers
from triage.auth.accounts import create_account
from triage.auth.roles import Role
from triage.db import Database
from triage.serve.app import create_app
from triage.serve.auth import SESSION_COOKIE
from triage.serve.docs import ASSET_FILES, assets_dir
from triage.serve.security import allowed_hosts, html_csp, inline_script_hashes


@pytest.fixture()
def client(db: Database) -> Iterator[TestClient]:
    app = create_app(db, allowed_hosts=allowed_hosts([], "127.0.0.1"))
    with TestClient(app, base_url="http://localhost:8000", headers=auth_headers(db)) as c:
        yield c


class Scripts(HTMLParser):
    """The text of each inline <script> element, as a browser reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self._in: bool = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self._in = not any(name == "src" for name, _ in attrs)
            if self._in:
                self.inline.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in = False

    def handle_data(self, data: str) -> None:
        if self._in:
            self.inline[-1] += data


def sha256_sources(html: str) -> set[str]:
    parser = Scripts()
    parser.feed(html)
    return {
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in parser.inline
    }


def directives(csp: str) -> dict[str, list[str]]:
    out = {}
    for part in csp.split(";"):
        words = part.split()
        if words:
            out[words[0]] = words[1:]
    return out


# Allowed hosts


def test_default_hosts_are_loopback_names_and_the_configured_host() -> None:
    assert allowed_hosts([], "127.0.0.1") == ["localhost", "127.0.0.1", "::1", "[::1]"]
    assert "triage.ward.example" in allowed_hosts([], "triage.ward.example")
    assert "10.1.2.3" in allowed_hosts([], "10.1.2.3")
    # A wildcard listening address names no host.
    assert allowed_hosts([], "0.0.0.0") == ["localhost", "127.0.0.1", "::1", "[::1]"]
    assert allowed_hosts([], "::") == ["localhost", "127.0.0.1", "::1", "[::1]"]
    # A configured list is the whole list.
    assert allowed_hosts(["Triage.Example.org", "fd00::5"], "127.0.0.1") == [
        "triage.example.org",
        "fd00::5",
        "[fd00::5]",
    ]


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost"])
def test_allowed_host_is_served(client: TestClient, host: str) -> None:
    resp = client.get("/api/worklist", headers={"Host": host})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.2"])
def test_other_host_is_refused_with_400(client: TestClient, host: str) -> None:
    """A DNS-rebinding page's requests carry its own name in Host: refused, no worklist."""
    resp = client.get("/api/worklist", headers={"Host": host})
    assert resp.status_code == 400
    assert "items" not in resp.text
    # The refusal carries the security headers too.
    assert resp.headers["x-frame-options"] == "DENY"


def test_no_host_check_when_not_configured(db: Database) -> None:
    with TestClient(create_app(db)) as c:  # Host: testserver
        assert c.get("/api/health").status_code == 200


def test_star_turns_the_host_check_off(db: Database) -> None:
    app = create_app(db, allowed_hosts=allowed_hosts(["*"], "127.0.0.1"))
    with TestClient(app, headers=auth_headers(db)) as c:
        assert c.get("/api/worklist", headers={"Host": "any.example"}).status_code == 200


# Headers


@pytest.mark.parametrize("path", ["/", "/api/worklist", "/api/health", "/api/studies/1.2.3"])
def test_every_response_has_the_security_headers(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"
    csp = directives(resp.headers["content-security-policy"])
    assert csp["frame-ancestors"] == ["'none'"]


def test_api_responses_allow_nothing_to_run(client: TestClient) -> None:
    csp = directives(client.get("/api/worklist").headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"]


def test_page_csp_allows_exactly_its_inline_scripts(client: TestClient, db: Database) -> None:
    # The page is served to a signed-in browser (its session cookie); others go to /login.
    create_account(db, "page-reader", Role.radiologist, password="page-reader-password-1")
    login = client.post(
        "/api/auth/login",
        json={"username": "page-reader", "password": "page-reader-password-1"},
    )
    assert login.status_code == 200, login.text
    resp = client.get("/", follow_redirects=False)
    assert resp.status_code == 200
    csp = directives(resp.headers["content-security-policy"])
    page_hashes = sha256_sources(resp.text)
    assert page_hashes, "the page has inline script"
    assert set(csp["script-src"]) == {"'self'", *page_hashes}
    assert "'unsafe-inline'" not in csp["script-src"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["object-src"] == ["'none'"]


def test_inline_script_hashes_skip_external_scripts() -> None:
    html = (
        '<script src="/a.js"></script><script>let a = 1;</script><SCRIPT type="module">b</SCRIPT>'
    )
    assert set(inline_script_hashes(html)) == sha256_sources(html)
    assert len(inline_script_hashes(html)) == 2
    assert "'sha256-" in html_csp(html)


# /docs from local files


def test_docs_load_swagger_ui_from_this_server(client: TestClient) -> None:
    resp = client.get("/docs")
    assert resp.status_code == 200
    html = resp.text
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert urls and all(u.startswith("/docs/assets/") for u in urls), urls
    assert "https://" not in html and "http://" not in html
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.content == (assets_dir() / url.rsplit("/", 1)[1]).read_bytes()
    csp = directives(resp.headers["content-security-policy"])
    assert set(csp["script-src"]) == {"'self'", *sha256_sources(html)}
    assert csp["frame-ancestors"] == ["'none'"]
    assert client.get("/openapi.json").json()["info"]["title"] == "triage"
    assert client.get("/redoc").status_code == 404


def test_swagger_ui_files_are_installed() -> None:
    for name in ASSET_FILES:
        assert (assets_dir() / name).stat().st_size > 0, name
    assert b"SwaggerUIBundle" in (assets_dir() / "swagger-ui-bundle.js").read_bytes()


# The running server


@pytest.mark.e2e
def test_running_server_refuses_other_hosts_and_sends_headers(tmp_path: Path) -> None:
    from tests.conftest import running_server

    with running_server(tmp_path / "data", {"TRIAGE_SERIES_QUIET_SECONDS": "60"}) as srv:
        url = f"{srv.http_url}/api/worklist"
        assert httpx.get(url, headers=srv.headers, timeout=10).status_code == 200
        local = {**srv.headers, "Host": f"localhost:{srv.http_port}"}
        assert httpx.get(url, headers=local, timeout=10).status_code == 200
        evil = httpx.get(
            url, headers={**srv.headers, "Host": "rebind.attacker.example"}, timeout=10
        )
        assert evil.status_code == 400
        page = httpx.get(
            f"{srv.http_url}/", cookies={SESSION_COOKIE: srv.session_cookie()}, timeout=10
        )
        assert page.status_code == 200
        assert page.headers["x-frame-options"] == "DENY"
        assert directives(page.headers["content-security-policy"])["frame-ancestors"] == ["'none'"]
        docs = httpx.get(f"{srv.http_url}/docs", timeout=10)
        assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
