"""Read models for the worklist and study detail (used by the HTTP API and the CLI)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from triage.db import Database
from triage.db.tables import StudyRow
from triage.dicomout.index import study_results
from triage.domain import Finding, ReadState
from triage.preprocess.routing import regions_from_text
from triage.worklist import acknowledgements, feedback
from triage.worklist.priority import (
    DEFAULT_POLICY,
    POLICY_VERSION,
    PolicyConfig,
    StudyContext,
    rank_studies,
)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    v = _utc(value)
    return v.isoformat() if v else None


def _findings(study: StudyRow) -> list[Finding]:
    return [Finding.from_json(f.payload) for f in study.findings]


def _modalities(study: StudyRow) -> list[str]:
    return sorted({se.Modality for se in study.series if se.Modality})


_SUBSPECIALTY_OF_REGION = {
    "HEAD": "neuro",
    "NECK": "neuro",
    "SPINE": "msk",
    "CHEST": "chest",
    "ABDOMEN": "body",
    "PELVIS": "body",
    "EXTREMITY": "msk",
    "BREAST": "breast",
}


def subspecialties(study: StudyRow) -> list[str]:
    """Reading subspecialties of a study, from the body regions its series show."""
    regions: set[str] = set()
    routing = study.routing or {}
    for entry in (routing.get("series_regions") or {}).values():
        regions.update(entry.get("regions") or [])
    if not regions:
        for se in study.series:
            regions.update(regions_from_text(se.BodyPartExamined or "", se.SeriesDescription or ""))
        regions.update(regions_from_text("", study.StudyDescription or ""))
    found = sorted({_SUBSPECIALTY_OF_REGION.get(r, "general") for r in regions})
    return found or ["general"]


def _study_summary(study: StudyRow) -> dict[str, Any]:
    return {
        "StudyInstanceUID": study.StudyInstanceUID,
        "AccessionNumber": study.AccessionNumber,
        "PatientID": study.PatientID,
        "PatientName": study.PatientName,
        "StudyDescription": study.StudyDescription,
        "StudyDate": study.StudyDate,
        "ModalitiesInStudy": _modalities(study),
        "subspecialties": subspecialties(study),
        "order_priority": study.order_priority,
        "location_class": study.location_class,
        "received_at": _iso(study.first_received_at),
        "ai_status": study.ai_status,
        "ai_error": study.ai_error,
        "findings": [dict(f.payload) for f in study.findings],
        "read_state": study.read_state,
        "claimed_by": study.claimed_by,
        "claim_expires_at": _iso(study.claim_expires_at),
        "completed_by": study.completed_by,
        "completed_at": _iso(study.completed_at),
        "acknowledged": acknowledgements.acknowledged(study.acknowledgements),
    }


def _load_studies(s: Session, *, include_completed: bool = False) -> list[StudyRow]:
    stmt = select(StudyRow).options(
        selectinload(StudyRow.series),
        selectinload(StudyRow.findings),
        selectinload(StudyRow.acknowledgements),
    )
    if not include_completed:
        stmt = stmt.where(StudyRow.read_state != ReadState.completed)
    return list(s.scalars(stmt).all())


def context_of(study: StudyRow, now: datetime) -> StudyContext:
    """What the priority policy sees of a study."""
    return StudyContext(
        StudyInstanceUID=study.StudyInstanceUID,
        arrived_at=_utc(study.first_received_at) or now,
        order_priority=study.order_priority,
        findings=_findings(study),
        location=study.location_class,
    )


def worklist(
    db: Database,
    *,
    now: datetime | None = None,
    config: PolicyConfig = DEFAULT_POLICY,
    modalities: Sequence[str] = (),
    subspecialties: Sequence[str] = (),
    claimable_only: bool = False,
    include_completed: bool = False,
) -> dict[str, Any]:
    """The worklist document: ``{"items": [...]}`` in reading order.

    Args:
        now: evaluation time (deadlines, aging, leases).
        config: the priority policy's configuration.
        modalities / subspecialties: keep studies with one of these (empty: all).
        claimable_only: only unread studies and claims whose lease has expired.
        include_completed: also list studies already read (ranked with the rest).
    """
    now = now or datetime.now(UTC)
    wanted_modalities = {m.upper() for m in modalities}
    wanted_subspecialties = {s.lower() for s in subspecialties}
    with db.session() as s:
        studies = _load_studies(s, include_completed=include_completed)
        by_uid = {st.StudyInstanceUID: st for st in studies}
        contexts = [context_of(st, now) for st in studies]
        items = []
        for placement in rank_studies(contexts, now, config):
            study = by_uid[placement.StudyInstanceUID]
            item = _study_summary(study)
            if wanted_modalities and not wanted_modalities & set(item["ModalitiesInStudy"]):
                continue
            if wanted_subspecialties and not wanted_subspecialties & set(item["subspecialties"]):
                continue
            expires = _utc(study.claim_expires_at)
            if study.read_state == ReadState.claimed and expires is not None and expires < now:
                item["read_state"] = ReadState.unread.value  # an abandoned claim: back in the queue
                item["claimed_by"] = None
            if claimable_only and item["read_state"] != ReadState.unread:
                continue
            item.update(placement.to_json())
            items.append(item)
    return {
        "items": items,
        "policy": POLICY_VERSION,
        "policy_config": config.digest(),
        # Findings that make a study critical under this policy (the page shows them in red).
        "critical_findings": sorted(
            code for code, rule in config.findings.items() if rule.escalate_to == "critical"
        ),
        "generated_at": now.isoformat(),
    }


def study_detail(db: Database, study_uid: str) -> dict[str, Any] | None:
    """One study with its series, status and findings; None when unknown."""
    with db.session() as s:
        stmt = (
            select(StudyRow)
            .where(StudyRow.StudyInstanceUID == study_uid)
            .options(
                selectinload(StudyRow.series),
                selectinload(StudyRow.findings),
                selectinload(StudyRow.acknowledgements),
            )
        )
        study = s.scalar(stmt)
        if study is None:
            return None
        doc = _study_summary(study)
        doc["routing"] = study.routing
        doc["series"] = [
            {
                "SeriesInstanceUID": se.SeriesInstanceUID,
                "Modality": se.Modality,
                "SeriesDescription": se.SeriesDescription,
                "BodyPartExamined": se.BodyPartExamined,
                "NumberOfInstances": se.n_instances,
                "state": se.state,
            }
            for se in study.series
        ]
        doc["overlays"] = [f.finding for f in study.findings if f.mask_path is not None]
        doc["dicom_results"] = study_results(s, study.id, study.StudyInstanceUID)
    records = feedback.list_feedback(db, study_uid) or []
    doc["feedback"] = feedback.latest_by_reader(records)
    return doc
