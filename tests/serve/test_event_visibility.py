"""Accession numbers in events and FHIR Tasks only for accounts that may see patient
identifiers: ``GET /api/events`` (server-sent events) and ``GET /api/studies/{uid}/fhir-task``
as a radiologist, an integration account, and an integration account granted
``view_patients``; and ``triage.events.visibility`` on its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.serve.test_access import ACCESSION, FINDING, STUDY_UID, Site, make_site
from tests.signin import token_for
from triage.auth.roles import Permission, Role
from triage.auth.tokens import create_token, revoke_token
from triage.db import Database
from triage.events import outbox
from triage.events.fhir import DICOM_UID_SYSTEM, IDENTIFIER_TYPE_SYSTEM
from triage.events.publisher import Publisher
from triage.events.visibility import visible, without_patient_identifiers
from triage.worklist import queue

ACSN_TYPE = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "ACSN"}]}


@pytest.fixture()
def site(db: Database, tmp_path: Path) -> Site:
    site = make_site(db, tmp_path)
    # A critical-finding alert as the worker writes it, and task events from the publisher.
    with db.session() as s:
        outbox.emit(
            s,
            outbox.CRITICAL_FINDING,
            STUDY_UID,
            {
                "StudyInstanceUID": STUDY_UID,
                "AccessionNumber": ACCESSION,
                "finding": FINDING,
                "flag": True,
                "score": 0.9,
                "volumes_ml": {"IPH": 3.0},
                "severity": None,
                "model": {"name": "blast-ct-v1", "version": "1"},
                "priority_class": "critical",
                "time": datetime.now(UTC).isoformat(),
            },
            webhook=False,
        )
    publisher = Publisher(db)
    publisher.tick()  # the first snapshot: a resync event
    queue.claim(db, STUDY_UID, "test-radiologist")
    assert publisher.tick() >= 2  # the worklist change and the study's Task
    return site


def granted_integration(site: Site) -> dict[str, str]:
    token = token_for(site.db, "ris", Role.integration, grants=(Permission.view_patients,))
    return {"Authorization": f"Bearer {token}"}


def read_events(site: Site, headers: dict[str, str], **params: Any) -> tuple[str, list[dict]]:
    """The stream's text and its events, from after=0, ending after the first poll."""
    answers = iter([False])
    site.app.state.events_closing = lambda: next(answers, True)
    site.app.state.events_poll_seconds = 0
    res = site.client(headers=headers).get("/api/events", params={"after": 0, **params})
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in res.text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if "data" in fields:
            data = json.loads(fields["data"])
            assert data["id"] == int(fields["id"]) and data["kind"] == fields["event"]
            events.append(data)
    return res.text, events


def by_kind(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["kind"] == kind]


def accession_identifiers(task: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in task["identifier"] if i.get("type") == ACSN_TYPE]


# --- the event stream ---------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.radiologist, Role.admin])
def test_readers_see_accession_numbers_in_events(site: Site, role: Role) -> None:
    _text, events = read_events(site, site.bearer(role))
    (alert,) = by_kind(events, outbox.CRITICAL_FINDING)
    assert alert["payload"]["AccessionNumber"] == ACCESSION
    tasks = by_kind(events, outbox.TASK)
    assert tasks and all(t["StudyInstanceUID"] == STUDY_UID for t in tasks)
    for task in tasks:
        (acsn,) = accession_identifiers(task["payload"])
        assert acsn["value"] == ACCESSION


def test_an_integration_account_gets_the_same_events_without_accession_numbers(
    site: Site,
) -> None:
    _text, full = read_events(site, site.bearer(Role.radiologist))
    text, events = read_events(site, site.bearer(Role.integration))
    assert [(e["id"], e["kind"]) for e in events] == [(e["id"], e["kind"]) for e in full]
    assert ACCESSION not in text
    (alert,) = by_kind(events, outbox.CRITICAL_FINDING)
    assert "AccessionNumber" not in alert["payload"]
    (full_alert,) = by_kind(full, outbox.CRITICAL_FINDING)
    assert alert["payload"] == {
        k: v for k, v in full_alert["payload"].items() if k != "AccessionNumber"
    }
    for task in by_kind(events, outbox.TASK):
        assert accession_identifiers(task["payload"]) == []
        assert {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{STUDY_UID}"} in task["payload"][
            "identifier"
        ]
    # Only the kinds asked for, still without accession numbers.
    text, only = read_events(site, site.bearer(Role.integration), kinds="critical_finding")
    assert [e["kind"] for e in only] == [outbox.CRITICAL_FINDING] and ACCESSION not in text


def test_an_integration_account_granted_view_patients_sees_them(site: Site) -> None:
    _text, events = read_events(site, granted_integration(site))
    (alert,) = by_kind(events, outbox.CRITICAL_FINDING)
    assert alert["payload"]["AccessionNumber"] == ACCESSION


# --- the FHIR Task ------------------------------------------------------------------------


def fhir_task(site: Site, headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
    res = site.client(headers=headers).get(f"/api/studies/{STUDY_UID}/fhir-task")
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("application/fhir+json")
    return res.text, res.json()


def test_a_reader_sees_the_accession_number_in_the_fhir_task(site: Site) -> None:
    site.app.state.fhir_accession_system = "urn:oid:1.2.3.4.5"
    _text, task = fhir_task(site, site.bearer(Role.radiologist))
    assert task["resourceType"] == "Task" and task["status"] == "in-progress"
    (acsn,) = accession_identifiers(task)
    assert acsn["value"] == ACCESSION and acsn["system"] == "urn:oid:1.2.3.4.5"


def test_an_integration_account_gets_the_fhir_task_without_it(site: Site) -> None:
    _text, full = fhir_task(site, site.bearer(Role.radiologist))
    text, task = fhir_task(site, site.bearer(Role.integration))
    assert ACCESSION not in text
    assert accession_identifiers(task) == []
    assert task["identifier"] == [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{STUDY_UID}"}]
    strip = {"identifier", "lastModified"}
    assert {k: v for k, v in task.items() if k not in strip} == {
        k: v for k, v in full.items() if k not in strip
    }
    _text, granted = fhir_task(site, granted_integration(site))
    assert accession_identifiers(granted)[0]["value"] == ACCESSION


# --- triage.events.visibility -------------------------------------------------------------

UID_IDENTIFIER = {"system": DICOM_UID_SYSTEM, "value": "urn:oid:1.2.3"}
ACSN_IDENTIFIER = {"type": ACSN_TYPE, "value": "A-1", "system": "urn:example:acsn"}
OTHER_TYPED = {
    "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "FILL"}]},
    "value": "F-1",
}


def task_payload() -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "identifier": [UID_IDENTIFIER, ACSN_IDENTIFIER, OTHER_TYPED],
        "status": "requested",
    }


def test_accession_numbers_are_removed_from_a_critical_finding() -> None:
    payload = {"StudyInstanceUID": "1.2.3", "AccessionNumber": "A-1", "finding": "ich"}
    out = without_patient_identifiers(outbox.CRITICAL_FINDING, payload)
    assert out == {"StudyInstanceUID": "1.2.3", "finding": "ich"}
    assert payload["AccessionNumber"] == "A-1"  # the input is not changed


def test_only_the_accession_identifier_is_removed_from_a_task() -> None:
    payload = task_payload()
    out = without_patient_identifiers(outbox.TASK, payload)
    assert out["identifier"] == [UID_IDENTIFIER, OTHER_TYPED]
    assert out["status"] == "requested" and out["resourceType"] == "Task"
    assert payload == task_payload()  # the input is not changed


@pytest.mark.parametrize(
    "odd",
    [
        "a string",
        None,
        {"value": "no type"},
        {"type": None, "value": "x"},
        {"type": {"coding": None}, "value": "x"},
        {"type": {"coding": ["not a dict"]}, "value": "x"},
        {"type": {"coding": [{"code": "ACSN"}]}, "value": "x"},  # no system: not v2-0203
    ],
)
def test_other_identifiers_are_kept_whatever_their_shape(odd: Any) -> None:
    payload = {"identifier": [odd, ACSN_IDENTIFIER]}
    assert without_patient_identifiers(outbox.TASK, payload)["identifier"] == [odd]


def test_a_task_without_an_identifier_list_is_left_alone() -> None:
    assert without_patient_identifiers(outbox.TASK, {"status": "requested"}) == {
        "status": "requested"
    }
    assert without_patient_identifiers(outbox.TASK, {"identifier": "x"}) == {"identifier": "x"}


def test_a_worklist_change_carries_nothing_to_remove() -> None:
    payload = {"version": 3, "changes": [{"StudyInstanceUID": "1.2.3", "rank": 1}]}
    assert without_patient_identifiers(outbox.WORKLIST_CHANGED, payload) == payload


def events() -> Iterator[outbox.Event]:
    now = datetime.now(UTC)
    yield outbox.Event(1, now, outbox.TASK, "1.2.3", task_payload())
    yield outbox.Event(
        2, now, outbox.CRITICAL_FINDING, "1.2.3", {"AccessionNumber": "A-1", "finding": "ich"}
    )


@pytest.mark.parametrize("event", list(events()), ids=lambda e: e.kind)
def test_visible_filters_only_for_those_not_allowed(event: outbox.Event) -> None:
    assert visible(event, patient_identifiers=True) is event
    seen = visible(event, patient_identifiers=False)
    assert (seen.id, seen.kind, seen.StudyInstanceUID, seen.created_at) == (
        event.id,
        event.kind,
        event.StudyInstanceUID,
        event.created_at,
    )
    assert seen.payload == without_patient_identifiers(event.kind, event.payload)
    assert "A-1" not in seen.sse() and "A-1" in event.sse()


# --- an open stream and the credential it was opened with ---------------------------------


def test_an_open_stream_stops_when_its_token_is_revoked(site: Site) -> None:
    token, info = create_token(site.db, "test-integration", "feed")
    polls: list[int] = []

    def closing() -> bool:
        """At the first check: revoke the token, then a new event arrives."""
        polls.append(1)
        if len(polls) == 1:
            revoke_token(site.db, info.id)
            with site.db.session() as s:
                outbox.emit(s, outbox.TASK, STUDY_UID, {"after": "revocation"}, webhook=False)
            return False
        return True

    site.app.state.events_closing = closing
    site.app.state.events_poll_seconds = 0
    site.app.state.events_recheck_seconds = 0  # the credential checked before each poll
    res = site.client(headers={"Authorization": f"Bearer {token}"}).get("/api/events")
    assert res.status_code == 200
    assert "revocation" not in res.text
