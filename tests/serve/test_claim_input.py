"""Claim requests with a bad lease or reader name are refused over HTTP, and change nothing.

Found by an outside probe: ``lease_seconds`` of NaN or +-Infinity (JSON that Python's parser
accepts) gave a 500, a lease of 1e-300 s handed out a claim that had already expired, and
a reader called ``"alice\\n"`` was stored, after which plain ``"alice"`` could not release
the study.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.studies import add_study
from triage.db import Database
from triage.serve.app import create_app

UID = "1.2.3.4"


def post(client: TestClient, path: str, raw_body: str) -> Any:
    """POST a body as written (json.dumps never writes NaN in a test by accident)."""
    return client.post(path, content=raw_body, headers={"Content-Type": "application/json"})


def state_of(client: TestClient, uid: str) -> tuple[str, str | None]:
    (item,) = [
        i for i in client.get("/api/worklist").json()["items"] if i["StudyInstanceUID"] == uid
    ]
    return item["read_state"], item["claimed_by"]


BAD_LEASES = ["NaN", "Infinity", "-Infinity", "1e-300", "0", "-60", "29.5", "86401", "1e309"]


@pytest.mark.parametrize("lease", BAD_LEASES)
def test_bad_lease_is_a_422_naming_the_field(db: Database, lease: str) -> None:
    add_study(db, UID)
    client = TestClient(create_app(db))
    for path in ("/api/worklist/next", f"/api/studies/{UID}/claim"):
        res = post(client, path, f'{{"reader": "alice", "lease_seconds": {lease}}}')
        assert res.status_code == 422, (path, res.status_code, res.text)
        (error,) = res.json()["detail"]
        assert error["loc"] == ["body", "lease_seconds"]
        assert "lease_seconds must be a number of seconds from 30 to 86400" in error["msg"]
        assert state_of(client, UID) == ("unread", None)  # nothing was claimed

    # Renewing the reader's own claim with such a lease is refused too; the claim stays.
    assert client.post(f"/api/studies/{UID}/claim", json={"reader": "alice"}).status_code == 200
    res = post(
        client, f"/api/studies/{UID}/renew", f'{{"reader": "alice", "lease_seconds": {lease}}}'
    )
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "lease_seconds"]
    assert state_of(client, UID) == ("claimed", "alice")


def test_lease_bounds_are_accepted(db: Database) -> None:
    add_study(db, UID)
    add_study(db, UID + ".2", 10)
    client = TestClient(create_app(db))
    before = datetime.now(UTC)
    first = client.post("/api/worklist/next", json={"reader": "alice", "lease_seconds": 30})
    assert first.status_code == 200
    expires = datetime.fromisoformat(first.json()["claim_expires_at"])
    assert expires >= before + timedelta(seconds=30)
    res = client.post(f"/api/studies/{UID}/claim", json={"reader": "bob", "lease_seconds": 86400})
    assert res.status_code == 200
    expires = datetime.fromisoformat(res.json()["claim_expires_at"])
    assert expires >= before + timedelta(hours=24)
    assert state_of(client, UID) == ("claimed", "bob")


BAD_READERS = ["alice\n", "alice\r\n", "alice\t", "al\x00ice", "\x1b[31malice", "alice\u2028", ""]


@pytest.mark.parametrize("reader", BAD_READERS)
def test_reader_names_with_control_characters_are_refused(db: Database, reader: str) -> None:
    add_study(db, UID)
    client = TestClient(create_app(db))
    body = json.dumps({"reader": reader})
    for path in ("/api/worklist/next", f"/api/studies/{UID}/claim"):
        res = post(client, path, body)
        assert res.status_code == 400, (path, res.status_code, res.text)
        assert "reader must be" in res.json()["detail"]
        assert state_of(client, UID) == ("unread", None)
    # The plain name claims, and the same name releases.
    assert client.post(f"/api/studies/{UID}/claim", json={"reader": "alice"}).status_code == 200
    assert post(client, f"/api/studies/{UID}/release", body).status_code == 400
    assert state_of(client, UID) == ("claimed", "alice")
    assert client.post(f"/api/studies/{UID}/release", json={"reader": "alice"}).status_code == 200
    assert state_of(client, UID) == ("unread", None)
    task = client.get(f"/api/studies/{UID}/fhir-task").json()
    assert "owner" not in task
