"""Acknowledgements of critical-finding alerts: a reader says they have seen that the AI
flagged a finding on a study. Kept with who and when, shown on the worklist and the study
(the page raises no banner again for an acknowledged finding), and recorded in the audit
trail by the route."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from triage.db import Database
from triage.db.tables import AcknowledgementRow, FindingRow, StudyRow


def acknowledged(rows: Iterable[AcknowledgementRow]) -> list[dict[str, Any]]:
    """Acknowledgements as the API shows them, oldest first."""
    out = []
    for row in rows:
        at = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        out.append({"finding": row.finding, "by": row.reader, "at": at.isoformat()})
    return out


def acknowledge(
    db: Database, study_uid: str, finding: str, reader: str, *, now: datetime | None = None
) -> dict[str, Any] | None:
    """Keep ``reader``'s acknowledgement of ``finding`` on the study; None when the study
    has no such finding (a second acknowledgement is kept too: each reader's is on record)."""
    with db.session() as s:
        study_id = s.scalar(
            select(StudyRow.id)
            .join(FindingRow, FindingRow.study_id == StudyRow.id)
            .where(StudyRow.StudyInstanceUID == study_uid, FindingRow.finding == finding)
            .limit(1)
        )
        if study_id is None:
            return None
        row = AcknowledgementRow(
            study_id=study_id, finding=finding, reader=reader, created_at=now or datetime.now(UTC)
        )
        s.add(row)
        s.flush()
        return acknowledged([row])[0]
