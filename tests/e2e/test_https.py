"""The HTTP API over HTTPS when TRIAGE_HTTPS_CERT / TRIAGE_HTTPS_KEY are set."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import running_server

pytestmark = pytest.mark.e2e


def test_api_over_https(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    env = {
        "TRIAGE_HTTPS_CERT": str(tls_files["server.pem"]),
        "TRIAGE_HTTPS_KEY": str(tls_files["server.key"]),
        "TRIAGE_SERIES_QUIET_SECONDS": "3600",
    }
    with running_server(tmp_path / "data", env) as srv:
        assert srv.http_url.startswith("https://")
        ok = httpx.get(f"{srv.http_url}/api/health", verify=str(tls_files["ca.pem"]))
        assert ok.status_code == 200
        worklist = f"{srv.http_url}/api/worklist"
        ca = str(tls_files["ca.pem"])
        assert httpx.get(worklist, verify=ca).status_code == 401  # sign-in needed here too
        assert httpx.get(worklist, headers=srv.headers, verify=ca).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
            httpx.get(srv.http_url.replace("https://", "http://") + "/api/health", timeout=5)
