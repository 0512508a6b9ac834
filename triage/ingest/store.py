"""Validate, store durably and index one received DICOM instance.

Every entry point (the C-STORE SCP today; STOW-RS and folder import later) calls
:func:`ingest_instance`. Nothing here decodes pixel data or runs a model.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from triage.db import Database
from triage.db.tables import InstanceRow, QuarantineRow, SeriesRow, StudyRow

log = logging.getLogger(__name__)

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StoreStatus(enum.IntEnum):
    """DICOM C-STORE status codes (PS3.4 Annex B.2.3) used by ingest."""

    success = 0x0000
    out_of_resources = 0xA700
    dataset_does_not_match_sop_class = 0xA900
    cannot_understand = 0xC000


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one instance; ``reason`` never carries patient data."""

    status: StoreStatus
    reason: str
    SOPInstanceUID: str | None = None
    StudyInstanceUID: str | None = None
    duplicate: bool = False
    quarantine_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == StoreStatus.success


def _uid_problem(name: str, value: object) -> str | None:
    if value is None or str(value) == "":
        return f"missing required attribute {name}"
    text = str(value)
    if len(text) > 64:
        return f"{name} is {len(text)} characters long (at most 64 allowed)"
    if not _UID_RE.match(text):
        return f"{name} contains characters other than digits and dots"
    return None


def validate_header(ds: Dataset) -> str | None:
    """Return a reason the header is unacceptable, or None when it is fine."""
    for name in REQUIRED_UIDS:
        problem = _uid_problem(name, ds.get(name))
        if problem:
            return problem
    if not ds.get("Modality"):
        return "missing required attribute Modality"
    return None


def _hashed_name(uid: str) -> str:
    """Storage names derive from a hash of the UID, never from raw attribute text."""
    return hashlib.sha256(uid.encode("ascii")).hexdigest()[:24]


def instance_path(store_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    return (
        store_dir
        / _hashed_name(study_uid)
        / _hashed_name(series_uid)
        / f"{_hashed_name(sop_uid)}.dcm"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(data: bytes, dest: Path, tmp_dir: Path) -> None:
    """Write to a temporary file, fsync it, rename it into place and fsync the directory."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
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


def ingest_instance(
    data: bytes,
    *,
    db: Database,
    store_dir: Path,
    tmp_dir: Path,
    quarantine_dir: Path,
    source: str,
    now: datetime | None = None,
) -> IngestOutcome:
    """Validate, store and index one DICOM Part 10 file given as bytes.

    Args:
        data: the complete Part 10 file (preamble, file meta, data set) as received.
        db: the database holding the index.
        store_dir: root of the DICOM file store.
        tmp_dir: directory on the same file system for temporary files.
        quarantine_dir: where rejected input is kept, with a record in the database.
        source: where it came from (calling AE title, "import", ...); logged, no PHI.
        now: arrival time (defaults to now, UTC).

    Returns:
        The outcome with its DICOM status. Success is returned only once the file is
        fsync'ed in place and its index row is committed. Rejected input is kept in
        quarantine (see :func:`quarantine`).
    """
    now = now or datetime.now(UTC)

    def reject(status: StoreStatus, reason: str) -> IngestOutcome:
        qid = quarantine(
            data,
            db=db,
            quarantine_dir=quarantine_dir,
            tmp_dir=tmp_dir,
            source=source,
            reason=reason,
            status=status,
            now=now,
        )
        log.warning("rejected instance from %s (quarantine #%s): %s", source, qid, reason)
        return IngestOutcome(status, reason, quarantine_id=qid)

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as exc:
        return reject(StoreStatus.cannot_understand, f"unreadable DICOM: {type(exc).__name__}")
    problem = validate_header(ds)
    if problem:
        return reject(StoreStatus.cannot_understand, problem)

    study_uid = str(ds.StudyInstanceUID)
    series_uid = str(ds.SeriesInstanceUID)
    sop_uid = str(ds.SOPInstanceUID)
    dest = instance_path(store_dir, study_uid, series_uid, sop_uid)
    digest = hashlib.sha256(data).hexdigest()

    with db.session() as s:
        existing = s.scalar(select(InstanceRow).where(InstanceRow.SOPInstanceUID == sop_uid))
        if existing is not None:
            # Resending is harmless: the first copy is kept, success is answered.
            return IngestOutcome(
                StoreStatus.success, "duplicate of a stored instance", sop_uid, study_uid, True
            )

    try:
        write_durably(data, dest, tmp_dir)
    except OSError as exc:
        log.error("could not store instance from %s: %s", source, type(exc).__name__)
        return IngestOutcome(StoreStatus.out_of_resources, f"storage failed: {exc.strerror}")

    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    try:
        with db.session() as s:
            _index(s, ds, now=now, path=dest, size=len(data), digest=digest, ts=ts, source=source)
    except IntegrityError:
        # Another association indexed the same SOPInstanceUID at the same moment.
        return IngestOutcome(
            StoreStatus.success, "duplicate of a stored instance", sop_uid, study_uid, True
        )
    return IngestOutcome(StoreStatus.success, "stored", sop_uid, study_uid)


def quarantine(
    data: bytes,
    *,
    db: Database,
    quarantine_dir: Path,
    tmp_dir: Path,
    source: str,
    reason: str,
    status: StoreStatus,
    now: datetime,
) -> int | None:
    """Keep rejected bytes under a name made from their sha256, with a database record.

    Returns:
        The quarantine record's id, or None when even keeping it failed (logged).
    """
    digest = hashlib.sha256(data).hexdigest()
    dest = quarantine_dir / digest[:2] / f"{digest}.bin"
    try:
        if not dest.exists():
            write_durably(data, dest, tmp_dir)
        with db.session() as s:
            row = QuarantineRow(
                received_at=now,
                source=source[:128],
                reason=reason,
                status_code=int(status),
                sha256=digest,
                size_bytes=len(data),
                path=str(dest),
            )
            s.add(row)
            s.flush()
            return int(row.id)
    except Exception:
        log.exception("could not keep rejected input from %s in quarantine", source)
        return None


def quarantine_listing(db: Database, *, limit: int = 500) -> dict[str, list[dict[str, object]]]:
    """The newest quarantine records: ``{"items": [...]}`` (no patient data in them)."""
    with db.session() as s:
        rows = s.scalars(select(QuarantineRow).order_by(QuarantineRow.id.desc()).limit(limit)).all()
        items: list[dict[str, object]] = [
            {
                "id": r.id,
                "received_at": (
                    r.received_at if r.received_at.tzinfo else r.received_at.replace(tzinfo=UTC)
                ).isoformat(),
                "source": r.source,
                "reason": r.reason,
                "status": f"0x{r.status_code:04X}",
                "sha256": r.sha256,
                "size_bytes": r.size_bytes,
            }
            for r in rows
        ]
    return {"items": items}


def _index(
    s: Session,
    ds: Dataset,
    *,
    now: datetime,
    path: Path,
    size: int,
    digest: str,
    ts: str,
    source: str,
) -> None:
    study_uid = str(ds.StudyInstanceUID)
    series_uid = str(ds.SeriesInstanceUID)
    study = s.scalar(select(StudyRow).where(StudyRow.StudyInstanceUID == study_uid))
    if study is None:
        study = StudyRow(
            StudyInstanceUID=study_uid,
            PatientID=_text(ds, "PatientID", 64),
            PatientName=_text(ds, "PatientName", 324),
            AccessionNumber=_text(ds, "AccessionNumber", 64),
            StudyDescription=_text(ds, "StudyDescription", 256),
            StudyDate=_text(ds, "StudyDate", 16),
            order_priority=order_priority_of(ds),
            first_received_at=now,
            last_received_at=now,
            ai_status="pending",
        )
        s.add(study)
        s.flush()
    else:
        study.last_received_at = now
        study.order_priority = study.order_priority or order_priority_of(ds)
        study.ai_status = "pending"
    series = s.scalar(select(SeriesRow).where(SeriesRow.SeriesInstanceUID == series_uid))
    if series is None:
        series = SeriesRow(
            study_id=study.id,
            SeriesInstanceUID=series_uid,
            Modality=_text(ds, "Modality", 16),
            SeriesDescription=_text(ds, "SeriesDescription", 256),
            BodyPartExamined=_text(ds, "BodyPartExamined", 64),
            n_instances=0,
            last_received_at=now,
            state="receiving",
        )
        s.add(series)
        s.flush()
    series.n_instances += 1
    series.last_received_at = now
    series.state = "receiving"
    s.add(
        InstanceRow(
            series_id=series.id,
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
