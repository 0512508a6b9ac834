"""Radiologists' feedback on the AI's findings: agree, disagree, or missed.

A judgement is kept with the reader (the signed-in account), the time, and what the AI said
and which model, version and weight files said it, as they were when the judgement was
made (a later re-analysis does not rewrite it). Records are only added, never edited: a
reader who changes their mind adds another, and the latest of each reader counts
(:func:`latest_by_reader`). They are what retraining exports (issue 10).

- ``agree`` / ``disagree``: about a finding the AI reported on the study (flagged or not).
- ``missed``: a finding the AI did not flag, with the slice where the reader sees it (the
  source image's SOPInstanceUID, and the InstanceNumber the reader saw).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from triage.db import Database
from triage.db.tables import FeedbackRow, FindingRow, InstanceRow, SeriesRow, StudyRow
from triage.domain import FeedbackVerdict

MAX_COMMENT = 2000
_FINDING_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class FeedbackError(ValueError):
    """Feedback that cannot be kept; ``status`` is 404 (unknown study, finding or image) or
    400 (the request is wrong), ``str(exc)`` says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FeedbackInput:
    finding: str
    verdict: FeedbackVerdict
    comment: str | None = None
    model: str | None = None
    SOPInstanceUID: str | None = None
    InstanceNumber: int | None = None


def _comment(text: str | None) -> str | None:
    if text is None or not text.strip():
        return None
    if len(text) > MAX_COMMENT:
        raise FeedbackError(f"a comment is at most {MAX_COMMENT} characters")
    if any(not (c.isprintable() or c in "\n\t") for c in text):
        raise FeedbackError("a comment holds printable characters and line breaks only")
    return text.strip()


def _as_dict(row: FeedbackRow) -> dict[str, Any]:
    at = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    return {
        "id": row.id,
        "finding": row.finding,
        "verdict": row.verdict,
        "reader": row.reader,
        "created_at": at.isoformat(),
        "comment": row.comment,
        "SeriesInstanceUID": row.SeriesInstanceUID,
        "SOPInstanceUID": row.SOPInstanceUID,
        "InstanceNumber": row.InstanceNumber,
        "model": (
            {
                "name": row.model_name,
                "version": row.model_version,
                "weights_sha256": list(row.weights_sha256 or []),
            }
            if row.model_name
            else None
        ),
        "ai": {"flag": row.ai_flag, "score": row.ai_score} if row.model_name else None,
    }


def _reported(rows: list[FindingRow], item: FeedbackInput) -> FindingRow | None:
    """The AI's finding the feedback is about (None when the AI did not report it)."""
    matching = [r for r in rows if r.finding == item.finding]
    if item.model is not None:
        matching = [r for r in matching if r.model_name == item.model]
    if len(matching) > 1:
        names = ", ".join(sorted(r.model_name for r in matching))
        raise FeedbackError(
            f"several models reported {item.finding} ({names}): name one in 'model'"
        )
    return matching[0] if matching else None


def record_feedback(
    db: Database,
    study_uid: str,
    reader: str,
    item: FeedbackInput,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Keep one judgement of ``reader`` on the study; returns it as the API shows it.

    Raises:
        FeedbackError: unknown study (404), agree/disagree on a finding the AI did not
            report (404), missed without a slice, a slice not of this study (404), a finding
            the AI flagged reported as missed, a bad comment (400).
    """
    if not _FINDING_CODE.fullmatch(item.finding):
        raise FeedbackError("a finding is a code such as intracranial_haemorrhage")
    comment = _comment(item.comment)
    with db.session() as s:
        study = s.scalar(select(StudyRow).where(StudyRow.StudyInstanceUID == study_uid))
        if study is None:
            raise FeedbackError("unknown StudyInstanceUID", 404)
        reported = _reported(list(study.findings), item)
        series_uid: str | None = None
        if item.verdict == FeedbackVerdict.missed:
            if item.SOPInstanceUID is None and item.InstanceNumber is None:
                raise FeedbackError("a missed finding needs the slice: SOPInstanceUID")
            if reported is not None and reported.flag:
                raise FeedbackError(
                    f"the AI flagged {item.finding} on this study: agree or disagree instead"
                )
            if item.SOPInstanceUID is not None:
                series_uid = s.scalar(
                    select(SeriesRow.SeriesInstanceUID)
                    .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
                    .where(
                        SeriesRow.study_id == study.id,
                        InstanceRow.SOPInstanceUID == item.SOPInstanceUID,
                    )
                )
                if series_uid is None:
                    raise FeedbackError("that SOPInstanceUID is not an image of this study", 404)
        elif reported is None:
            raise FeedbackError(f"the AI reported no {item.finding} on this study", 404)
        model = (reported.payload or {}).get("model", {}) if reported is not None else {}
        row = FeedbackRow(
            study_id=study.id,
            finding=item.finding,
            verdict=FeedbackVerdict(item.verdict).value,
            reader=reader,
            created_at=now or datetime.now(UTC),
            comment=comment,
            SeriesInstanceUID=series_uid or (reported.SeriesInstanceUID if reported else None),
            SOPInstanceUID=item.SOPInstanceUID,
            InstanceNumber=item.InstanceNumber,
            model_name=reported.model_name if reported else None,
            model_version=reported.model_version if reported else None,
            weights_sha256=list(model.get("weights_sha256") or []),
            ai_flag=bool(reported.flag) if reported else None,
            ai_score=float(reported.score) if reported else None,
        )
        s.add(row)
        s.flush()
        return _as_dict(row)


def list_feedback(db: Database, study_uid: str) -> list[dict[str, Any]] | None:
    """Every judgement on the study, oldest first; None when the study is unknown."""
    with db.session() as s:
        study_id = s.scalar(select(StudyRow.id).where(StudyRow.StudyInstanceUID == study_uid))
        if study_id is None:
            return None
        rows = s.scalars(
            select(FeedbackRow).where(FeedbackRow.study_id == study_id).order_by(FeedbackRow.id)
        )
        return [_as_dict(r) for r in rows]


def latest_by_reader(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each reader's latest judgement per finding (and slice, for missed findings)."""
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:  # oldest first: later ones replace earlier ones
        where = record["SOPInstanceUID"] if record["verdict"] == "missed" else None
        latest[(record["reader"], record["finding"], where)] = record
    return list(latest.values())
