"""Claim requests with a bad lease or reader name are refused over HTTP, and change nothing.

Found by an outside probe: ``lease_seconds`` of NaN or +-Infinity (JSON that Python's parser
accepts) gave a 500, a lease of 1e-300 s handed out a claim that had already expired, and
a reader called ``"alice\\n"`` was stored, after which plain ``"alice"`` could not release
the study. The reader is now the signed-in account (whose name cannot hold such characters);
a ``reader`` in the body is ignored.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.signin import auth_headers
from tests.studies import add_study
from triage.auth.accounts import AccountError, create_account
from triage.auth.roles import Role
from triage.db import Database
from triage.serve.app import create_app
from triage.worklist import queue

UID = "1.2.3.4"


def post(client: TestClient, path: str, raw_body: str, headers: dict[str, str]) -> Any:
    """POST a body as written (json.dumps never writes NaN in a test by accident)."""
    return client.post(
        path, content=raw_body, headers={**headers, "Content-Type": "application/json"}
    )


def state_of(client: TestClient, uid: str, headers: dict[str, str]) -> tuple[str, str | None]:
    (item,) = [
        i
        for i in client.get("/api/worklist", headers=headers).json()["items"]
        if i["StudyInstanceUID"] == uid
    ]
    return item["read_state"], item["claimed_by"]


BAD_LEASES = ["NaN", "Infinity", "-Infinity", "1e-300", "0", "-60", "29.5", "86401", "1e309"]


@pytest.mark.parametrize("lease", BAD_LEASES)
def test_bad_lease_is_a_422_naming_the_field(db: Database, lease: str) -> None:
    add_study(db, UID)
    client = TestClient(create_app(db))
    alice = auth_headers(db, "alice", Role.radiologist)
    for path in ("/api/worklist/next", f"/api/studies/{UID}/claim"):
        res = post(client, path, f'{{"lease_seconds": {lease}}}', alice)
        assert res.status_code == 422, (path, res.status_code, res.text)
        (error,) = res.json()["detail"]
        assert error["loc"] == ["body", "lease_seconds"]
        assert "lease_seconds must be a number of seconds from 30 to 86400" in error["msg"]
        assert state_of(client, UID, alice) == ("unread", None)  # nothing was claimed

    # Renewing the reader's own claim with such a lease is refused too; the claim stays.
    assert client.post(f"/api/studies/{UID}/claim", json={}, headers=alice).status_code == 200
    res = post(client, f"/api/studies/{UID}/renew", f'{{"lease_seconds": {lease}}}', alice)
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "lease_seconds"]
    assert state_of(client, UID, alice) == ("claimed", "alice")


def test_lease_bounds_are_accepted(db: Database) -> None:
    add_study(db, UID)
    add_study(db, UID + ".2", 10)
    client = TestClient(create_app(db))
    alice = auth_headers(db, "alice", Role.radiologist)
    bob = auth_headers(db, "bob", Role.radiologist)
    before = datetime.now(UTC)
    first = client.post("/api/worklist/next", json={"lease_seconds": 30}, headers=alice)
    assert first.status_code == 200
    assert first.json()["claimed_by"] == "alice"
    expires = datetime.fromisoformat(first.json()["claim_expires_at"])
    assert expires >= before + timedelta(seconds=30)
    res = client.post(f"/api/studies/{UID}/claim", json={"lease_seconds": 86400}, headers=bob)
    assert res.status_code == 200
    assert res.json()["reader"] == "bob"
    expires = datetime.fromisoformat(res.json()["claim_expires_at"])
    assert expires >= before + timedelta(hours=24)
    assert state_of(client, UID, alice) == ("claimed", "bob")


BAD_READERS = ["alice\n", "alice\r\n", "alice\t", "al\x00ice", "\x1b[31malice", "alice\u2028", ""]


@pytest.mark.parametrize("reader", BAD_READERS)
def test_reader_names_with_control_characters_are_refused(db: Database, reader: str) -> None:
    """Such a name can be no account's (so no claim is made under it), the queue refuses it,
    and a ``reader`` in the body names nobody: the signed-in account is the reader."""
    with pytest.raises(AccountError, match="a username is"):
        create_account(db, reader, Role.radiologist)
    add_study(db, UID)
    with pytest.raises(queue.ClaimError, match="reader must be") as refused:
        queue.claim(db, UID, reader)
    assert refused.value.status == 400

    client = TestClient(create_app(db))
    alice = auth_headers(db, "alice", Role.radiologist)
    bob = auth_headers(db, "bob", Role.radiologist)
    body = json.dumps({"reader": reader})
    for path in ("/api/worklist/next", f"/api/studies/{UID}/claim"):
        assert state_of(client, UID, alice) == ("unread", None)
        res = post(client, path, body, alice)
        assert res.status_code == 200, (path, res.status_code, res.text)
        assert state_of(client, UID, alice) == ("claimed", "alice")
        # Another reader cannot release alice's claim by naming her in the body.
        res = post(client, f"/api/studies/{UID}/release", json.dumps({"reader": "alice"}), bob)
        assert res.status_code == 409, res.text
        assert state_of(client, UID, alice) == ("claimed", "alice")
        # alice releases it, whatever the body says.
        assert post(client, f"/api/studies/{UID}/release", body, alice).status_code == 200
    assert state_of(client, UID, alice) == ("unread", None)
    task = client.get(f"/api/studies/{UID}/fhir-task", headers=alice).json()
    assert "owner" not in task
