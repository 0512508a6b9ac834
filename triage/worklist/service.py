"""Read models for the worklist and study detail (used by the HTTP API and the CLI)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from triage.db import Database
from triage.db.tables import StudyRow
from triage.domain import Finding
from triage.worklist.priority import POLICY_VERSION, StudyContext, rank_studies


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


def _study_summary(study: StudyRow) -> dict[str, Any]:
    return {
        "StudyInstanceUID": study.StudyInstanceUID,
        "AccessionNumber": study.AccessionNumber,
        "PatientID": study.PatientID,
        "PatientName": study.PatientName,
        "StudyDescription": study.StudyDescription,
        "StudyDate": study.StudyDate,
        "ModalitiesInStudy": _modalities(study),
        "order_priority": study.order_priority,
        "received_at": _iso(study.first_received_at),
        "ai_status": study.ai_status,
        "ai_error": study.ai_error,
        "findings": [dict(f.payload) for f in study.findings],
    }


def _load_studies(s: Session) -> list[StudyRow]:
    stmt = select(StudyRow).options(selectinload(StudyRow.series), selectinload(StudyRow.findings))
    return list(s.scalars(stmt).all())


def worklist(db: Database, *, now: datetime | None = None) -> dict[str, Any]:
    """The worklist document: ``{"items": [...]}`` in reading order."""
    now = now or datetime.now(UTC)
    with db.session() as s:
        studies = _load_studies(s)
        by_uid = {st.StudyInstanceUID: st for st in studies}
        contexts = [
            StudyContext(
                StudyInstanceUID=st.StudyInstanceUID,
                arrived_at=_utc(st.first_received_at) or now,
                order_priority=st.order_priority,
                findings=_findings(st),
            )
            for st in studies
        ]
        items = []
        for placement in rank_studies(contexts, now):
            item = _study_summary(by_uid[placement.StudyInstanceUID])
            item["rank"] = placement.rank
            item["reasons"] = placement.reasons
            items.append(item)
    return {"items": items, "policy": POLICY_VERSION, "generated_at": now.isoformat()}


def study_detail(db: Database, study_uid: str) -> dict[str, Any] | None:
    """One study with its series, status and findings; None when unknown."""
    with db.session() as s:
        stmt = (
            select(StudyRow)
            .where(StudyRow.StudyInstanceUID == study_uid)
            .options(selectinload(StudyRow.series), selectinload(StudyRow.findings))
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
        return doc
