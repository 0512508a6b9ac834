"""A worklist item as a FHIR R4 ``Task`` (a pure function: no database, no clock).

Mapping (documented in docs/integration.md):

- ``status``: ``requested`` (unread), ``in-progress`` (claimed; ``owner`` is the reader),
  ``completed`` (read; ``owner`` is who read it, ``executionPeriod.end`` when).
- ``priority`` (FHIR request-priority): class ``critical`` and ``stat`` -> ``stat``,
  ``urgent`` -> ``urgent``, ``routine`` -> ``routine``; a routine or urgent study that is
  past its deadline (and not yet read) -> ``asap``.
- ``restriction.period.end``: the study's deadline; ``businessStatus.text``: rank, class,
  tier and reason codes; AI findings in an extension (machine-readable) and a note.
- ``focus``: the ImagingStudy by its StudyInstanceUID (``urn:dicom:uid`` /
  ``urn:oid:<uid>``); ``identifier``: the same, plus the accession number when known.

No patient data is put in a Task (no ``for`` reference, no name, no patient ID).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from triage.domain import ReadState

DICOM_UID_SYSTEM = "urn:dicom:uid"
AI_FINDING_EXTENSION = "urn:triage:fhir:StructureDefinition:ai-finding"
"""The URL of the (complex) extension listing one AI finding on a Task."""
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"

TASK_STATUSES = frozenset(
    {
        "draft",
        "requested",
        "received",
        "accepted",
        "rejected",
        "ready",
        "cancelled",
        "on-hold",
        "in-progress",
        "failed",
        "completed",
        "entered-in-error",
    }
)
"""The R4 TaskStatus value set."""
REQUEST_PRIORITIES = ("routine", "urgent", "asap", "stat")
"""The R4 RequestPriority value set, least urgent first."""

_PRIORITY_OF_CLASS = {
    "critical": "stat",
    "stat": "stat",
    "urgent": "urgent",
    "routine": "routine",
}


def task_id(study_uid: str) -> str:
    """A stable Task id for a study (a valid FHIR id: ``[A-Za-z0-9.-]{1,64}``)."""
    return "triage-" + hashlib.sha256(study_uid.encode()).hexdigest()[:32]


def _parse(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def status_of(item: dict[str, Any]) -> str:
    """The Task status of a worklist item's read state."""
    state = item.get("read_state")
    if state == ReadState.completed:
        return "completed"
    if state == ReadState.claimed and item.get("claimed_by"):
        return "in-progress"
    return "requested"


def priority_of(item: dict[str, Any], now: datetime) -> str:
    """The FHIR request priority of a worklist item at ``now`` (see the module docstring)."""
    cls = str(item.get("priority_class") or "routine")
    priority = _PRIORITY_OF_CLASS.get(cls, "routine")
    if priority in ("routine", "urgent") and status_of(item) != "completed":
        deadline = _parse(item.get("deadline"))
        if item.get("tier") == "overdue" or (deadline is not None and now > deadline):
            priority = "asap"
    return priority


def _finding_extension(f: dict[str, Any]) -> dict[str, Any]:
    model = f.get("model") or {}
    parts: list[dict[str, Any]] = [
        {"url": "finding", "valueCode": str(f.get("finding"))},
        {"url": "flag", "valueBoolean": bool(f.get("flag"))},
        {"url": "score", "valueDecimal": round(float(f.get("score") or 0.0), 4)},
    ]
    if model:
        parts.append(
            {"url": "model", "valueString": f"{model.get('name', '')} {model.get('version', '')}"}
        )
    return {"url": AI_FINDING_EXTENSION, "extension": parts}


def _finding_note(f: dict[str, Any]) -> str:
    model = f.get("model") or {}
    verdict = "flagged" if f.get("flag") else "not flagged"
    return (
        f"AI finding {f.get('finding')}: {verdict}, score {float(f.get('score') or 0.0):.2f}"
        f" (model {model.get('name', '?')} {model.get('version', '?')}; not for diagnostic use)"
    )


def task_from_item(
    item: dict[str, Any], now: datetime, *, accession_system: str | None = None
) -> dict[str, Any]:
    """The FHIR R4 Task of one worklist item.

    Args:
        item: a worklist item (``triage.worklist.service.worklist``), or a study summary
            with the placement fields (``rank`` may be None for a study already read).
        now: the evaluation time (``lastModified``, and whether the deadline has passed).
        accession_system: the identifier system of accession numbers (None: no system).
    """
    uid = str(item["StudyInstanceUID"])
    uid_identifier = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}
    identifiers: list[dict[str, Any]] = [dict(uid_identifier)]
    accession = item.get("AccessionNumber")
    if accession:
        acsn: dict[str, Any] = {
            "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "ACSN"}]},
            "value": str(accession),
        }
        if accession_system:
            acsn["system"] = accession_system
        identifiers.append(acsn)
    status = status_of(item)
    cls = item.get("priority_class") or "routine"
    if status == "completed":
        business = "read"
    else:
        reasons = ", ".join(item.get("reasons") or [])
        business = (
            f"rank {item.get('rank')}; class {cls}; tier {item.get('tier')}; reasons {reasons}"
        )
    task: dict[str, Any] = {
        "resourceType": "Task",
        "id": task_id(uid),
        "identifier": identifiers,
        "status": status,
        "businessStatus": {"text": business},
        "intent": "order",
        "priority": priority_of(item, now),
        "code": {"text": "Read imaging study"},
        "focus": {"identifier": uid_identifier, "type": "ImagingStudy"},
        "lastModified": now.isoformat(),
    }
    if item.get("received_at"):
        task["authoredOn"] = item["received_at"]
    owner = item.get("completed_by") if status == "completed" else item.get("claimed_by")
    if status != "requested" and owner:
        task["owner"] = {"display": str(owner)}
    if status == "completed" and item.get("completed_at"):
        task["executionPeriod"] = {"end": item["completed_at"]}
    if item.get("deadline"):
        task["restriction"] = {"period": {"end": item["deadline"]}}
    findings = [f for f in item.get("findings") or [] if isinstance(f, dict)]
    if findings:
        task["extension"] = [_finding_extension(f) for f in findings]
        task["note"] = [{"text": _finding_note(f)} for f in findings]
    return task


def comparable(task: dict[str, Any]) -> dict[str, Any]:
    """The Task without ``lastModified`` (to tell whether anything else changed)."""
    return {k: v for k, v in task.items() if k != "lastModified"}
