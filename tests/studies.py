"""Studies inserted straight into the database, arriving when the test says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import insert

from triage.db import Database
from triage.db.tables import SeriesRow, StudyRow


def add_study(
    db: Database,
    uid: str,
    minutes_ago: float = 5.0,
    *,
    priority: str | None = None,
    now: datetime | None = None,
    modality: str = "CT",
    body_part: str = "HEAD",
) -> datetime:
    """A study of one series (a head CT unless told) that arrived ``minutes_ago`` before
    ``now``, already analysed; returns its arrival."""
    arrived = (now or datetime.now(UTC)) - timedelta(minutes=minutes_ago)
    with db.session() as s:
        study_id = s.scalar(
            insert(StudyRow)
            .returning(StudyRow.id)
            .values(
                StudyInstanceUID=uid,
                first_received_at=arrived,
                last_received_at=arrived,
                ai_status="ok",
                order_priority=priority,
            )
        )
        s.execute(
            insert(SeriesRow).values(
                study_id=study_id,
                SeriesInstanceUID=uid + ".1",
                Modality=modality,
                BodyPartExamined=body_part,
                n_instances=1,
                last_received_at=arrived,
                state="complete",
            )
        )
    return arrived
