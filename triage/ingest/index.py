"""The SQL index of stored instances: studies, series and instances rows.

The header values indexed here (patient and order text, priority, location) are decoded
by :func:`triage.ingest.parse.parse` first (``READ_AT_INGEST``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from triage.db.tables import InstanceRow, SeriesRow, StudyRow
from triage.domain import AIStatus, SeriesState, location_class


def stored_copy(conn: Connection, sop_uid: str) -> tuple[str, Path] | None:
    """(sha256, path) of the stored copy of an instance, or None (in the connection's
    transaction, or in one of its own)."""
    stmt = select(InstanceRow.sha256, InstanceRow.path).where(InstanceRow.SOPInstanceUID == sop_uid)
    if conn.in_transaction():
        row = conn.execute(stmt).first()
    else:
        with conn.begin():
            row = conn.execute(stmt).first()
    return None if row is None else (str(row[0]), Path(row[1]))


def repoint_instance(
    conn: Connection,
    *,
    sop_uid: str,
    expected_path: Path,
    path: Path,
    digest: str,
    size: int,
    source: str,
    now: datetime,
) -> bool:
    """Point an indexed instance at a new copy and reopen its series and study (the
    ``replace`` duplicate policy), in one transaction of its own.

    Only if the index still points at ``expected_path`` (the copy the new one was compared
    with); False, with nothing changed, when it does not or the instance is not indexed.
    Rows are locked in the order :func:`index_instance` takes them (study, series,
    instance), so that the two never wait for each other in a cycle.
    """
    with conn.begin() as trans:
        found = conn.execute(
            select(InstanceRow.id, InstanceRow.series_id, SeriesRow.study_id)
            .join(SeriesRow, SeriesRow.id == InstanceRow.series_id)
            .where(InstanceRow.SOPInstanceUID == sop_uid)
        ).first()
        if found is None:
            return False
        instance_id, series_id, study_id = found
        conn.execute(
            update(StudyRow)
            .where(StudyRow.id == study_id)
            .values(last_received_at=now, ai_status=AIStatus.pending)
        )
        conn.execute(
            update(SeriesRow)
            .where(SeriesRow.id == series_id)
            .values(state=SeriesState.receiving, last_received_at=now)
        )
        moved = conn.execute(
            update(InstanceRow)
            .where(InstanceRow.id == instance_id, InstanceRow.path == str(expected_path))
            .values(
                path=str(path),
                sha256=digest,
                size_bytes=size,
                received_at=now,
                source=source[:128],
            )
        )
        if moved.rowcount != 1:
            trans.rollback()
            return False
    return True


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


def _upsert(conn: Connection, table: type[StudyRow] | type[SeriesRow] | type[InstanceRow]) -> Any:
    """The dialect's INSERT, which has ``ON CONFLICT`` (PostgreSQL and SQLite alike)."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"no INSERT ... ON CONFLICT for the {name} dialect")


def index_instance(
    conn: Connection,
    ds: Dataset,
    *,
    now: datetime,
    path: Path,
    size: int,
    digest: str,
    ts: str,
    source: str,
) -> bool:
    """Index one stored instance in the caller's transaction: create or update its study,
    then its series, then add it.

    SQL statements on a connection rather than ORM objects in a session: this runs once per
    received instance, and the ORM's bookkeeping cost more than the statements.

    Several processes may index instances of one new study or series at the same moment:
    the study and the series are each one ``INSERT ... ON CONFLICT DO UPDATE`` (an upsert),
    which either creates the row or, when another transaction has (waiting for it to commit
    first), updates it, and holds the row until this transaction ends. The study's row is
    always the first taken (the assembly takes it too, see
    ``triage.ingest.assembly.lock_study``), so an instance never lands between the
    assembly's reading a series as quiet and marking it complete. A late instance puts
    its series back to ``receiving`` and its study to ``pending`` in these same statements.

    Returns:
        True when the instance was added; False when its SOPInstanceUID is indexed
        already (another process indexed a copy at the same moment): the caller rolls the
        transaction back, so that the study and series are left as they were.
    """
    study_uid = str(ds.StudyInstanceUID)
    series_uid = str(ds.SeriesInstanceUID)
    priority = order_priority_of(ds)
    study_insert = _upsert(conn, StudyRow).values(
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
    study_id = conn.scalar(
        study_insert.on_conflict_do_update(
            index_elements=[StudyRow.StudyInstanceUID],
            set_={
                "last_received_at": study_insert.excluded.last_received_at,
                "ai_status": AIStatus.pending,
                # The first order priority a study carries stays.
                "order_priority": func.coalesce(
                    StudyRow.__table__.c.order_priority, study_insert.excluded.order_priority
                ),
            },
        ).returning(StudyRow.id)
    )
    series_insert = _upsert(conn, SeriesRow).values(
        study_id=study_id,
        SeriesInstanceUID=series_uid,
        Modality=text_of(ds, "Modality", 16),
        SeriesDescription=text_of(ds, "SeriesDescription", 256),
        BodyPartExamined=text_of(ds, "BodyPartExamined", 64),
        n_instances=1,
        last_received_at=now,
        state=SeriesState.receiving,
    )
    series_id = conn.scalar(
        series_insert.on_conflict_do_update(
            index_elements=[SeriesRow.SeriesInstanceUID],
            set_={
                "n_instances": SeriesRow.__table__.c.n_instances + 1,
                "last_received_at": series_insert.excluded.last_received_at,
                "state": SeriesState.receiving,
            },
        ).returning(SeriesRow.id)
    )
    added = conn.scalar(
        _upsert(conn, InstanceRow)
        .values(
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
        .on_conflict_do_nothing(index_elements=[InstanceRow.SOPInstanceUID])
        .returning(InstanceRow.id)
    )
    return added is not None
