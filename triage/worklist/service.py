"""Read models for the worklist and study detail (used by the HTTP API and the CLI)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from triage.db import Database
from triage.db.tables import StudyRow
from triage.dicomout.index import study_results
from triage.domain import ReadState
from triage.worklist import acknowledgements, feedback, rank
from triage.worklist.priority import DEFAULT_POLICY, POLICY_VERSION, PolicyConfig
from triage.worklist.rank import context_of, subspecialties

__all__ = ["context_of", "study_detail", "study_item", "subspecialties", "worklist"]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    v = _utc(value)
    return v.isoformat() if v else None


def _kept_or(
    kept: list[str] | None, compute: Callable[[StudyRow], list[str]], study: StudyRow
) -> list[str]:
    """A value the ranking keeps on the row, else computed (a study not ranked yet)."""
    return kept if kept is not None else compute(study)


def _study_summary(study: StudyRow) -> dict[str, Any]:
    return {
        "StudyInstanceUID": study.StudyInstanceUID,
        "AccessionNumber": study.AccessionNumber,
        "PatientID": study.PatientID,
        "PatientName": study.PatientName,
        "StudyDescription": study.StudyDescription,
        "StudyDate": study.StudyDate,
        "ModalitiesInStudy": _kept_or(rank.kept_tags(study.modalities), rank.modalities, study),
        "subspecialties": _kept_or(
            rank.kept_tags(study.subspecialties), rank.subspecialties, study
        ),
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


ITEM_LOADS = (
    selectinload(StudyRow.series),
    selectinload(StudyRow.findings),
    selectinload(StudyRow.acknowledgements),
)
"""What a worklist item reads of a study besides its row."""


def item_of(study: StudyRow, position: int | None, now: datetime) -> dict[str, Any]:
    """A study's worklist item: its summary, its read state as of ``now`` (an abandoned
    claim is unread again) and its kept placement with ``rank`` = ``position``."""
    item = _study_summary(study)
    expires = _utc(study.claim_expires_at)
    if study.read_state == ReadState.claimed and expires is not None and expires < now:
        item["read_state"] = ReadState.unread.value  # an abandoned claim: back in the queue
        item["claimed_by"] = None
    item.update(rank.placement(study, position))
    return item


def ranked(session: Session, now: datetime | None, config: PolicyConfig) -> datetime:
    """Bring the kept order up to date for ``now`` (default: the current time) in the
    caller's transaction; returns the evaluation time."""
    past = now is not None  # a caller's own moment may precede placements kept since
    now = now or datetime.now(UTC)
    rank.refresh(session, now, config, past=past)
    return now


def _count(session: Session, conditions: Sequence[Any]) -> int:
    return int(session.scalar(select(func.count(StudyRow.id)).where(*conditions)) or 0)


def worklist(
    db: Database,
    *,
    now: datetime | None = None,
    config: PolicyConfig = DEFAULT_POLICY,
    modalities: Sequence[str] = (),
    subspecialties: Sequence[str] = (),
    claimable_only: bool = False,
    include_completed: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    """The worklist document: ``{"items": [...], "total": N, ...}`` in reading order.

    Args:
        now: evaluation time (deadlines, aging, leases); default the current time.
        config: the priority policy's configuration.
        modalities / subspecialties: keep studies with one of these (empty: all).
        claimable_only: only unread studies and claims whose lease has expired.
        include_completed: also list studies already read (after the waiting ones, the
            latest read first).
        limit / offset: one page of the list (``limit`` None: all of it from ``offset``).
            ``rank`` is the position in the list asked for (filters applied), from 1;
            ``total`` the length of that list; ``next_offset`` the next page's offset
            (None after the last page).
    """
    with db.session() as s:
        now = ranked(s, now, config)
        conditions = rank.filters(modalities, subspecialties)
        if not include_completed:
            conditions.append(rank.waiting())
        if claimable_only:
            conditions.append(rank.claimable(now))
        total = _count(s, conditions)
        stmt = (
            select(StudyRow)
            .where(*conditions)
            .options(*ITEM_LOADS)
            .order_by(*rank.RANK_ORDER)
            .offset(offset)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        studies = list(s.scalars(stmt).all())
        items = [item_of(st, offset + i, now) for i, st in enumerate(studies, start=1)]
    end = offset + len(items)
    return {
        "items": items,
        "total": total,
        "offset": offset,
        "limit": limit,
        "next_offset": end if end < total else None,
        "policy": POLICY_VERSION,
        "policy_config": config.digest(),
        # Findings that make a study critical under this policy (the page shows them in red).
        "critical_findings": sorted(
            code for code, rule in config.findings.items() if rule.escalate_to == "critical"
        ),
        "generated_at": now.isoformat(),
    }


def study_item(
    session: Session,
    study: StudyRow,
    now: datetime,
    *,
    modalities: Sequence[str] = (),
    subspecialties: Sequence[str] = (),
) -> dict[str, Any]:
    """One study's worklist item with its rank among the waiting studies (filters applied;
    ``rank`` None once it has been read). The kept order must be up to date (:func:`ranked`)."""
    position: int | None = None
    if study.read_state != ReadState.completed:
        conditions = [rank.waiting(), rank.ahead_of(study)]
        position = 1 + _count(session, [*conditions, *rank.filters(modalities, subspecialties)])
    return item_of(study, position, now)


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
