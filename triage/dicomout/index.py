"""The index of a study's DICOM results and their exports (tables ``dicom_results`` and
``result_exports``): replacing a model's results, listing them with each destination's
export state, finding one for download. SQL only: no highdicom, no network.

Each new result gets one ``pending`` export per configured destination in the transaction
that indexes it, so a result is never made without being queued; the sender
(:mod:`triage.dicomout.send`) takes it from there. What became of making the results (made,
or why not) is kept on the study's routing document under ``dicom_output``, one entry per
model and finding, next to what became of the model's run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from triage.db import Database
from triage.db.tables import DicomResultRow, ResultExportRow, StudyRow
from triage.domain import DicomResultKind, ExportState

__all__ = [
    "NewResult",
    "ResultFile",
    "find_result",
    "replace_results",
    "results_document",
    "study_results",
]

ROUTING_KEY = "dicom_output"
"""Key of the study routing document's list of result-making outcomes."""


@dataclass(frozen=True)
class NewResult:
    """A DICOM result written to its file, to be indexed."""

    kind: DicomResultKind
    SOPInstanceUID: str
    SeriesInstanceUID: str
    SOPClassUID: str
    path: Path
    finding: str
    model_name: str


@dataclass(frozen=True)
class ResultFile:
    """Where one result's file is, for a download."""

    kind: str
    SOPInstanceUID: str
    path: Path


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def replace_results(
    s: Session,
    *,
    study_id: int,
    model_name: str,
    results: Sequence[NewResult],
    destinations: Sequence[str],
    outcomes: Sequence[dict[str, Any]],
    now: datetime,
) -> list[Path]:
    """Replace a model's results of a study, in the caller's transaction.

    The model's earlier results (and their exports, sent or not) are removed; the new ones
    are indexed, each with a ``pending`` export per destination; ``outcomes`` (one
    ``{"model", "finding", "status", "error"}`` per finding) replace the model's entries in
    the study's routing document.

    Returns:
        The files of the removed results, to delete once the transaction has committed.
    """
    old = s.execute(
        select(DicomResultRow.id, DicomResultRow.path).where(
            DicomResultRow.study_id == study_id, DicomResultRow.model_name == model_name
        )
    ).all()
    old_ids = [int(i) for i, _ in old]
    if old_ids:
        s.execute(delete(ResultExportRow).where(ResultExportRow.result_id.in_(old_ids)))
        s.execute(delete(DicomResultRow).where(DicomResultRow.id.in_(old_ids)))
    for result in results:
        row = DicomResultRow(
            study_id=study_id,
            kind=result.kind.value,
            SOPInstanceUID=result.SOPInstanceUID,
            SeriesInstanceUID=result.SeriesInstanceUID,
            SOPClassUID=result.SOPClassUID,
            path=str(result.path),
            finding=result.finding,
            model_name=result.model_name,
            created_at=now,
        )
        s.add(row)
        s.flush()
        for destination in dict.fromkeys(destinations):
            s.add(
                ResultExportRow(
                    result_id=row.id,
                    destination=destination,
                    state=ExportState.pending.value,
                    attempts=0,
                    next_at=None,
                )
            )
    study = s.get(StudyRow, study_id)
    if study is not None:
        routing = dict(study.routing or {})
        kept = [o for o in routing.get(ROUTING_KEY, []) if o.get("model") != model_name]
        routing[ROUTING_KEY] = [*kept, *outcomes]
        study.routing = routing  # a new dict: the JSON column sees the change
    return [Path(path) for _, path in old]


def study_results(s: Session, study_id: int, study_uid: str) -> list[dict[str, Any]]:
    """The study's DICOM results (SEG before SR, oldest first) with each destination's export
    state; no file paths."""
    rows = s.scalars(
        select(DicomResultRow)
        .where(DicomResultRow.study_id == study_id)
        .order_by(DicomResultRow.id)
    ).all()
    exports: dict[int, list[dict[str, Any]]] = {row.id: [] for row in rows}
    if rows:
        for e in s.scalars(
            select(ResultExportRow)
            .where(ResultExportRow.result_id.in_(list(exports)))
            .order_by(ResultExportRow.id)
        ):
            exports[e.result_id].append(
                {
                    "destination": e.destination,
                    "state": e.state,
                    "attempts": e.attempts,
                    "next_at": _iso(e.next_at) if e.state == ExportState.pending else None,
                    "last_error": e.last_error,
                    "sent_at": _iso(e.sent_at),
                }
            )
    return [
        {
            "kind": row.kind,
            "SOPInstanceUID": row.SOPInstanceUID,
            "SeriesInstanceUID": row.SeriesInstanceUID,
            "SOPClassUID": row.SOPClassUID,
            "finding": row.finding,
            "model_name": row.model_name,
            "created_at": _iso(row.created_at),
            "download": f"/api/studies/{study_uid}/results/{row.SOPInstanceUID}",
            "exports": exports[row.id],
        }
        for row in rows
    ]


def results_document(db: Database, study_uid: str) -> dict[str, Any] | None:
    """The study's DICOM results and what became of making them (``outcomes``: per model
    and finding, ``made`` or ``failed`` with the reason); None for an unknown study."""
    with db.session() as s:
        study = s.scalar(select(StudyRow).where(StudyRow.StudyInstanceUID == study_uid))
        if study is None:
            return None
        return {
            "StudyInstanceUID": study_uid,
            "results": study_results(s, study.id, study_uid),
            "outcomes": list((study.routing or {}).get(ROUTING_KEY, [])),
        }


def find_result(db: Database, *, study_uid: str, sop_instance_uid: str) -> ResultFile | None:
    """One result of the study by its SOPInstanceUID; None when the study has no such one."""
    with db.session() as s:
        row = s.execute(
            select(DicomResultRow.kind, DicomResultRow.SOPInstanceUID, DicomResultRow.path)
            .join(StudyRow, StudyRow.id == DicomResultRow.study_id)
            .where(
                StudyRow.StudyInstanceUID == study_uid,
                DicomResultRow.SOPInstanceUID == sop_instance_uid,
            )
        ).first()
    if row is None:
        return None
    return ResultFile(
        kind=str(row.kind), SOPInstanceUID=str(row.SOPInstanceUID), path=Path(row.path)
    )
