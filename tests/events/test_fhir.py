"""The FHIR R4 Task of a worklist item: mapping cases and the R4 shape (no FHIR library)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.signin import auth_headers
from tests.studies import add_study
from triage.auth.roles import Role
from triage.db import Database
from triage.db.tables import StudyRow
from triage.events.fhir import (
    AI_FINDING_EXTENSION,
    REQUEST_PRIORITIES,
    TASK_STATUSES,
    task_from_item,
    task_id,
)
from triage.serve.app import create_app
from triage.worklist import queue

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
UID = "1.2.826.0.1.3680043.8.498.12345"
ICH = {
    "finding": "intracranial_haemorrhage",
    "flag": True,
    "score": 0.97,
    "volumes_ml": {"IPH": 12.5},
    "model": {"name": "blast-ct-v1", "version": "1"},
}


def item(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "StudyInstanceUID": UID,
        "AccessionNumber": "ACC-1",
        "received_at": (NOW - timedelta(minutes=10)).isoformat(),
        "read_state": "unread",
        "claimed_by": None,
        "completed_by": None,
        "completed_at": None,
        "findings": [],
        "rank": 2,
        "reasons": ["arrival"],
        "priority_class": "routine",
        "deadline": (NOW + timedelta(hours=23)).isoformat(),
        "tier": "queued",
    }
    base.update(changes)
    return base


_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def assert_r4_task(task: dict[str, Any]) -> None:
    """The parts of the R4 Task definition a consumer relies on."""
    assert task["resourceType"] == "Task"
    assert _ID.match(task["id"])
    assert task["status"] in TASK_STATUSES  # 1..1, required binding
    assert task["intent"] == "order"  # 1..1, required binding (TaskIntent)
    assert task["priority"] in REQUEST_PRIORITIES  # required binding (RequestPriority)
    for ident in task["identifier"]:
        assert isinstance(ident["value"], str) and ident["value"]
    assert task["focus"]["type"] == "ImagingStudy"
    assert task["focus"]["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"}
    assert task["code"]["text"]
    for key in ("lastModified", "authoredOn"):
        if key in task:
            assert _DATETIME.match(task[key]), task[key]
    if "restriction" in task:
        assert _DATETIME.match(task["restriction"]["period"]["end"])
    for ext in task.get("extension", []):
        assert ext["url"]
        for part in ext["extension"]:  # each: a url and exactly one value[x]
            values = [k for k in part if k != "url"]
            assert part["url"] and len(values) == 1 and values[0].startswith("value")
    # No patient data.
    assert "for" not in task


def test_unread_routine_is_a_requested_routine_task() -> None:
    task = task_from_item(item(), NOW)
    assert_r4_task(task)
    assert task["status"] == "requested" and task["priority"] == "routine"
    assert "owner" not in task
    assert task["id"] == task_id(UID) == task_from_item(item(rank=9), NOW)["id"]  # stable
    assert task["restriction"]["period"]["end"] == item()["deadline"]
    assert task["lastModified"] == NOW.isoformat()
    assert task["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"}
    acsn = task["identifier"][1]
    assert acsn["value"] == "ACC-1" and "system" not in acsn
    assert acsn["type"]["coding"][0]["code"] == "ACSN"
    assert "rank 2" in task["businessStatus"]["text"]
    with_system = task_from_item(item(), NOW, accession_system="urn:oid:1.2.3.4")
    assert with_system["identifier"][1]["system"] == "urn:oid:1.2.3.4"


def test_critical_finding_is_stat_with_the_finding_listed() -> None:
    task = task_from_item(
        item(
            priority_class="critical",
            tier="critical",
            rank=1,
            reasons=["ai:intracranial_haemorrhage", "arrival"],
            findings=[ICH],
        ),
        NOW,
    )
    assert_r4_task(task)
    assert task["priority"] == "stat"
    assert "ai:intracranial_haemorrhage" in task["businessStatus"]["text"]
    (ext,) = task["extension"]
    assert ext["url"] == AI_FINDING_EXTENSION
    parts = {e["url"]: e for e in ext["extension"]}
    assert parts["finding"]["valueCode"] == "intracranial_haemorrhage"
    assert parts["flag"]["valueBoolean"] is True
    assert parts["score"]["valueDecimal"] == 0.97
    assert "flagged" in task["note"][0]["text"]


def test_class_to_priority() -> None:
    expected = {"critical": "stat", "stat": "stat", "urgent": "urgent", "routine": "routine"}
    for cls, priority in expected.items():
        assert task_from_item(item(priority_class=cls), NOW)["priority"] == priority


def test_overdue_routine_and_urgent_are_asap() -> None:
    past = (NOW - timedelta(minutes=1)).isoformat()
    for cls in ("routine", "urgent"):
        task = task_from_item(item(priority_class=cls, deadline=past, tier="overdue"), NOW)
        assert_r4_task(task)
        assert task["priority"] == "asap"
    # Past the deadline at `now` even when the item's tier was computed earlier.
    assert task_from_item(item(deadline=past), NOW)["priority"] == "asap"
    # stat stays stat; a study read already is no longer late.
    assert task_from_item(item(priority_class="stat", deadline=past), NOW)["priority"] == "stat"
    done = item(deadline=past, read_state="completed", completed_by="bob")
    assert task_from_item(done, NOW)["priority"] == "routine"


def test_claimed_is_in_progress_with_the_reader_as_owner() -> None:
    task = task_from_item(item(read_state="claimed", claimed_by="alice"), NOW)
    assert_r4_task(task)
    assert task["status"] == "in-progress"
    assert task["owner"] == {"display": "alice"}


def test_completed() -> None:
    finished = (NOW - timedelta(minutes=1)).isoformat()
    task = task_from_item(
        item(read_state="completed", completed_by="bob", completed_at=finished, rank=None), NOW
    )
    assert_r4_task(task)
    assert task["status"] == "completed"
    assert task["owner"] == {"display": "bob"}
    assert task["executionPeriod"] == {"end": finished}


def test_fhir_task_route(db: Database) -> None:
    add_study(db, "1.1", 6)
    add_study(db, "1.2", 5, priority="STAT")
    with db.session() as s:
        s.execute(
            update(StudyRow)
            .where(StudyRow.StudyInstanceUID == "1.2")
            .values(AccessionNumber="ACC-12")
        )
    client = TestClient(create_app(db))
    client.headers.update(auth_headers(db, "reader", Role.radiologist))
    res = client.get("/api/studies/1.2/fhir-task")
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("application/fhir+json")
    task = res.json()
    assert task["status"] == "requested" and task["priority"] == "stat"
    assert "rank 1" in task["businessStatus"]["text"]
    values = [i["value"] for i in task["identifier"]]
    assert values == ["urn:oid:1.2", "ACC-12"]  # a radiologist sees the accession number
    # An integration account (no view_patients) gets the same Task without it.
    integration = auth_headers(db, "ris", Role.integration)
    stripped = client.get("/api/studies/1.2/fhir-task", headers=integration)
    assert stripped.status_code == 200
    assert [i["value"] for i in stripped.json()["identifier"]] == ["urn:oid:1.2"]
    varying = {"identifier", "lastModified"}  # lastModified: the time of the request
    assert {k: v for k, v in stripped.json().items() if k not in varying} == {
        k: v for k, v in task.items() if k not in varying
    }
    queue.claim(db, "1.1", "alice")
    task = client.get("/api/studies/1.1/fhir-task").json()
    assert task["status"] == "in-progress" and task["owner"] == {"display": "alice"}
    queue.complete(db, "1.1", "alice")
    task = client.get("/api/studies/1.1/fhir-task").json()  # read: off the worklist
    assert task["status"] == "completed" and task["owner"] == {"display": "alice"}
    assert task["restriction"]["period"]["end"]
    assert client.get("/api/studies/9.9/fhir-task").status_code == 404
