"""``triage serve`` on PostgreSQL: DICOM in, the study on the worklist, claimed over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_server
from tests.e2e.conftest import send
from tests.signin import token_for
from triage.auth.roles import Role
from triage.db import Database
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
            items = httpx.get(f"{server.http_url}/api/worklist", headers=server.headers)
            items = items.json()["items"]
            if items and items[0]["ai_status"] != "pending":
                break
            time.sleep(0.5)
        (item,) = items
        # The chest model reads it; its weights are not in this data directory: fail open.
        assert item["ai_status"] == "failed" and "TRIAGE_MODEL_MIRROR" in item["ai_error"]
        db = Database(server.database_url)
        try:
            alice = {"Authorization": f"Bearer {token_for(db, 'alice', Role.radiologist)}"}
        finally:
            db.dispose()
        claimed = httpx.post(f"{server.http_url}/api/worklist/next", json={}, headers=alice)
        assert claimed.status_code == 200
        assert claimed.json()["StudyInstanceUID"] == item["StudyInstanceUID"]
        assert claimed.json()["claimed_by"] == "alice"  # the signed-in account reads it
    assert not (tmp_path / "data" / "triage.db").exists()  # nothing went to SQLite
