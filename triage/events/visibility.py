"""What of an event a receiver may see: patient identifiers only for those allowed them.

Events carry identifiers of studies (the StudyInstanceUID) and, for those allowed to read
them, of patients' orders (the accession number, in ``critical_finding`` payloads and as a
FHIR Task identifier). A receiver without that right (an integration account without the
``view_patients`` permission; the webhook unless ``TRIAGE_WEBHOOK_PATIENT_IDENTIFIERS``)
gets the same events without them. No event carries patient names or IDs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from triage.events import outbox
from triage.events.fhir import IDENTIFIER_TYPE_SYSTEM

_ACCESSION_CODE = "ACSN"


def _is_accession(identifier: Any) -> bool:
    if not isinstance(identifier, dict):
        return False
    codings = (identifier.get("type") or {}).get("coding") or []
    return any(
        c.get("system") == IDENTIFIER_TYPE_SYSTEM and c.get("code") == _ACCESSION_CODE
        for c in codings
        if isinstance(c, dict)
    )


def without_patient_identifiers(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` of an event of ``kind`` with accession numbers removed."""
    out = {k: v for k, v in payload.items() if k != "AccessionNumber"}
    if kind == outbox.TASK and isinstance(out.get("identifier"), list):
        out["identifier"] = [i for i in out["identifier"] if not _is_accession(i)]
    return out


def visible(event: outbox.Event, *, patient_identifiers: bool) -> outbox.Event:
    """The event as a receiver sees it (unchanged when it may see patient identifiers)."""
    if patient_identifiers:
        return event
    return replace(event, payload=without_patient_identifiers(event.kind, event.payload))
