"""The SQL index of stored instances: studies, series and instances rows.

The header values indexed here (patient and order text, priority, location) are decoded
by :func:`triage.ingest.parse.parse` first (``READ_AT_INGEST``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from triage.db import Database
from triage.db.tables import InstanceRow, SeriesRow, StudyRow
from triage.domain import AIStatus, SeriesState, location_class


def stored_copy(db: Database, sop_uid: str) -> tuple[str, Path] | None:
    """(sha256, path) of the stored copy of an instance, or None."""
    with db.engine.connect() as conn:
        row = conn.execute(
            select(InstanceRow.sha256, InstanceRow.path).where(
                InstanceRow.SOPInstanceUID == sop_uid
            )
        ).first()
    return None if row is None else (str(row[0]), Path(row[1]))


def repoint_instance(
    db: Database,
    *,
    sop_uid: str,
    path: Path,
    digest: str,
    size: int,
    source: str,
    now: datetime,
) -> None:
    """Point an indexed instance at a new copy and reopen its series and study (the
    ``replace`` duplicate policy)."""
    with db.session() as s:
        row = s.scalar(select(InstanceRow).where(InstanceRow.SOPInstanceUID == sop_uid))
        if row is not None:
            row.path = str(path)
            row.sha256 = digest
            row.size_bytes = size
            row.received_at = now
            row.source = source[:128]
            row.series.state = SeriesState.receiving
            row.series.last_received_at = now
            row.series.study.last_received_at = now
            row.series.study.ai_status = AIStatus.pending


def text_of(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def order_priority_of(ds: Dataset) -> str | None:
    """The order's priority where the study carries one (STAT, HIGH, MEDIUM, ROUTINE, LOW)."""
    for keyword in ("RequestedProcedurePriority", "StudyPriorityID"):
        value = ds.get(keyword)
        if value:
            return str(value).strip().upper()[:16]
    for item in ds.get("RequestAttributesSequence", []) or []:
        value = item.get("RequestedProcedurePriority")
        if value:
            return str(value).strip().upper()[:16]
    return None


def index_instance(
    s: Connection,
    ds: Dataset,
    *,
    now: datetime,
    path: Path,
    size: int,
    digest: str,
    ts: str,
    source: str,
) -> None:
    """Index one stored instance: get or create its study and series, count it, add it.

    SQL statements on a connection rather than ORM objects in a session: this runs once per
    received instance, and the ORM's bookkeeping cost more than the statements.
    Two first instances of one new study arriving at once make one of the inserts fail
    with IntegrityError; the caller retries (see ``triage.ingest.store.Ingestor``).
    """
    study_uid = str(ds.StudyInstanceUID)
    series_uid = str(ds.SeriesInstanceUID)
    priority = order_priority_of(ds)
    study_id = s.scalar(select(StudyRow.id).where(StudyRow.StudyInstanceUID == study_uid))
    if study_id is None:
        study_id = s.scalar(
            insert(StudyRow)
            .returning(StudyRow.id)
            .values(
                StudyInstanceUID=study_uid,
                PatientID=text_of(ds, "PatientID", 64),
                PatientName=text_of(ds, "PatientName", 324),
                AccessionNumber=text_of(ds, "AccessionNumber", 64),
                StudyDescription=text_of(ds, "StudyDescription", 256),
                StudyDate=text_of(ds, "StudyDate", 16),
                order_priority=priority,
                location_class=location_class(
                    " ".join(
                        str(ds.get(k, "") or "")
                        for k in (
                            "CurrentPatientLocation",
                            "InstitutionalDepartmentName",
                            "RequestingService",
                        )
                    )
                ),
                first_received_at=now,
                last_received_at=now,
                ai_status=AIStatus.pending,
            )
        )
    else:
        values: dict[str, Any] = {"last_received_at": now, "ai_status": AIStatus.pending}
        if priority:
            values["order_priority"] = func.coalesce(StudyRow.order_priority, priority)
        s.execute(update(StudyRow).where(StudyRow.id == study_id).values(**values))
    series_id = s.scalar(select(SeriesRow.id).where(SeriesRow.SeriesInstanceUID == series_uid))
    if series_id is None:
        series_id = s.scalar(
            insert(SeriesRow)
            .returning(SeriesRow.id)
            .values(
                study_id=study_id,
                SeriesInstanceUID=series_uid,
                Modality=text_of(ds, "Modality", 16),
                SeriesDescription=text_of(ds, "SeriesDescription", 256),
                BodyPartExamined=text_of(ds, "BodyPartExamined", 64),
                n_instances=1,
                last_received_at=now,
                state=SeriesState.receiving,
            )
        )
    else:
        s.execute(
            update(SeriesRow)
            .where(SeriesRow.id == series_id)
            .values(
                n_instances=SeriesRow.n_instances + 1,
                last_received_at=now,
                state=SeriesState.receiving,
            )
        )
    s.execute(
        insert(InstanceRow).values(
            series_id=series_id,
            SOPInstanceUID=str(ds.SOPInstanceUID),
            SOPClassUID=str(ds.SOPClassUID),
            TransferSyntaxUID=ts[:64],
            path=str(path),
            size_bytes=size,
            sha256=digest,
            received_at=now,
            source=source[:128],
        )
    )
