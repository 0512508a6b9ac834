"""The work queue over HTTP: filters, claim/renew/release/complete, next study, policy file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.signin import auth_headers
from tests.worklist.test_queue import add_study
from triage.auth.roles import Role
from triage.db import Database
from triage.serve.app import create_app
from triage.worklist.priority import load_policy


def test_queue_over_http(db: Database) -> None:
    add_study(db, "1.1", 0)
    add_study(db, "1.2", 1, priority="STAT")
    add_study(db, "1.3", 2, modality="CR", body_part="CHEST")
    client = TestClient(create_app(db))
    # The reader is the signed-in account: one token per reader.
    alice = auth_headers(db, "alice", Role.radiologist)
    bob = auth_headers(db, "bob", Role.radiologist)
    carol = auth_headers(db, "carol", Role.radiologist)
    items = client.get("/api/worklist", headers=alice).json()["items"]
    assert [i["StudyInstanceUID"] for i in items] == ["1.2", "1.1", "1.3"]
    assert items[0]["priority_class"] == "stat" and items[0]["deadline"]
    chest = client.get("/api/worklist", params={"subspecialty": "chest"}, headers=alice)
    assert [i["StudyInstanceUID"] for i in chest.json()["items"]] == ["1.3"]
    ct = client.get("/api/worklist", params=[("modality", "CT")], headers=alice).json()["items"]
    assert {i["StudyInstanceUID"] for i in ct} == {"1.1", "1.2"}

    nxt = client.post("/api/worklist/next", json={}, headers=alice)
    assert nxt.status_code == 200 and nxt.json()["StudyInstanceUID"] == "1.2"
    assert nxt.json()["claimed_by"] == "alice"
    taken = client.post("/api/studies/1.2/claim", json={}, headers=bob)
    assert taken.status_code == 409 and "alice" in taken.json()["detail"]
    # A reader named in the body is ignored: bob cannot act as alice.
    posing = client.post("/api/studies/1.2/claim", json={"reader": "alice"}, headers=bob)
    assert posing.status_code == 409 and "alice" in posing.json()["detail"]
    assert client.post("/api/studies/1.2/complete", json={}, headers=bob).status_code == 409
    renewed = client.post("/api/studies/1.2/renew", json={}, headers=alice)
    assert renewed.status_code == 200 and renewed.json()["reader"] == "alice"
    done = client.post("/api/studies/1.2/complete", json={}, headers=alice)
    assert done.status_code == 200 and done.json()["reader"] == "alice"
    claimed = client.post("/api/studies/1.1/claim", json={}, headers=bob)
    assert claimed.status_code == 200 and claimed.json()["reader"] == "bob"
    assert client.post("/api/studies/1.1/release", json={}, headers=bob).status_code == 200
    assert client.post("/api/studies/9.9/claim", json={}, headers=bob).status_code == 404
    assert client.post("/api/studies/1.1/frobnicate", json={}, headers=bob).status_code == 404
    body = {"subspecialties": ["chest"]}
    nxt = client.post("/api/worklist/next", json=body, headers=carol)
    assert nxt.json()["StudyInstanceUID"] == "1.3" and nxt.json()["claimed_by"] == "carol"
    assert client.post("/api/worklist/next", json=body, headers=carol).status_code == 204
    items = client.get("/api/worklist", headers=alice).json()["items"]
    assert [(i["StudyInstanceUID"], i["read_state"]) for i in items] == [
        ("1.1", "unread"),
        ("1.3", "claimed"),
    ]


def test_policy_file(tmp_path: Path) -> None:
    good = tmp_path / "policy.toml"
    good.write_text(
        "aging_fraction = 0.5\n[sla_minutes]\ncritical = 10\nstat = 20\nurgent = 45\n"
        "routine = 600\n"
    )
    config = load_policy(good)
    assert config.sla_minutes["routine"] == 600 and config.aging_fraction == 0.5
    bad = tmp_path / "policy.json"
    bad.write_text(json.dumps({"sla_minutes": {"critical": 1, "stat": 2, "urgent": 3}}))
    with pytest.raises(ValueError, match="no service-level time for \\['routine'\\]"):
        load_policy(bad)
    assert load_policy(None).digest() != config.digest()


def test_worklist_pages_over_http(db: Database) -> None:
    for i in range(7):
        add_study(db, f"5.{i}", 20 - i)
    client = TestClient(create_app(db))
    alice = auth_headers(db, "alice", Role.radiologist)
    first = client.get("/api/worklist", params={"limit": 3}, headers=alice).json()
    assert first["total"] == 7 and first["next_offset"] == 3
    assert [i["rank"] for i in first["items"]] == [1, 2, 3]
    seen = [i["StudyInstanceUID"] for i in first["items"]]
    offset = first["next_offset"]
    while offset is not None:
        page = client.get(
            "/api/worklist", params={"limit": 3, "offset": offset}, headers=alice
        ).json()
        seen += [i["StudyInstanceUID"] for i in page["items"]]
        offset = page["next_offset"]
    whole = client.get("/api/worklist", params={"limit": 1000}, headers=alice).json()["items"]
    assert seen == [i["StudyInstanceUID"] for i in whole]  # each once, in order
    assert sorted(seen) == [f"5.{i}" for i in range(7)]
    # Claimed by /next: the next page request shows it claimed, the total unchanged.
    client.post("/api/worklist/next", json={}, headers=alice)
    after = client.get("/api/worklist", params={"limit": 1}, headers=alice).json()
    assert after["items"][0]["claimed_by"] == "alice" and after["total"] == 7
    too_many = client.get("/api/worklist", params={"limit": 100000}, headers=alice)
    assert too_many.status_code == 422 and "limit" in too_many.text
