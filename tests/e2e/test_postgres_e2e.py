"""``triage serve`` on PostgreSQL: DICOM in, the study on the worklist, claimed over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_server
from tests.e2e.conftest import send
from triage.demo.xray import write_demo_radiograph

pytestmark = pytest.mark.e2e


def test_serve_on_postgresql(database_url: str, tmp_path: Path, storescu: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("runs on PostgreSQL only (set TRIAGE_TEST_POSTGRES_URL)")
    env = {"TRIAGE_DATABASE_URL": database_url, "TRIAGE_SERIES_QUIET_SECONDS": "0.5"}
    with running_server(tmp_path / "data", env) as server:
        xray = write_demo_radiograph(tmp_path / "xray")
        send(storescu, server, xray)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            items = httpx.get(f"{server.http_url}/api/worklist").json()["items"]
            if items and items[0]["ai_status"] != "pending":
                break
            time.sleep(0.5)
        (item,) = items
        # The chest model reads it; its weights are not in this data directory: fail open.
        assert item["ai_status"] == "failed" and "TRIAGE_MODEL_MIRROR" in item["ai_error"]
        claimed = httpx.post(f"{server.http_url}/api/worklist/next", json={"reader": "alice"})
        assert claimed.status_code == 200
        assert claimed.json()["StudyInstanceUID"] == item["StudyInstanceUID"]
    assert not (tmp_path / "data" / "triage.db").exists()  # nothing went to SQLite
