from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from tests.conftest import pydicom_file
from triage.db import Database
from triage.db.tables import InstanceRow, JobRow, QuarantineRow, SeriesRow, StudyRow
from triage.ingest.assembly import complete_quiet_series
from triage.ingest.store import StoreStatus, ingest_instance, quarantine_listing


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    database.migrate()
    return database


def ct_bytes(**changes: str) -> bytes:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    for k, v in changes.items():
        setattr(ds, k, v)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ingest(db: Database, tmp_path: Path, data: bytes, now: datetime | None = None):  # type: ignore[no-untyped-def]
    (tmp_path / "incoming").mkdir(exist_ok=True)
    return ingest_instance(
        data,
        db=db,
        store_dir=tmp_path / "dicom",
        tmp_dir=tmp_path / "incoming",
        quarantine_dir=tmp_path / "quarantine",
        source="test",
        now=now,
    )


def test_stored_durably_indexed_and_idempotent(db: Database, tmp_path: Path) -> None:
    data = ct_bytes()
    first = ingest(db, tmp_path, data)
    assert first.status == StoreStatus.success and not first.duplicate
    again = ingest(db, tmp_path, data)
    assert again.status == StoreStatus.success and again.duplicate
    with db.session() as s:
        rows = s.scalars(select(InstanceRow)).all()
        assert len(rows) == 1
        stored = Path(rows[0].path)
        assert stored.read_bytes() == data  # stored exactly as received
        assert stored.resolve().is_relative_to((tmp_path / "dicom").resolve())
        assert s.scalar(select(func.count()).select_from(SeriesRow)) == 1
        assert s.scalar(select(SeriesRow.n_instances)) == 1
    assert not list((tmp_path / "incoming").iterdir())  # no temporary files left


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"SOPInstanceUID": "1.2.3/../../etc"}, "characters other than digits and dots"),
        ({"StudyInstanceUID": "1." + "2" * 70}, "at most 64"),
        ({"SeriesInstanceUID": ""}, "missing required attribute SeriesInstanceUID"),
        ({"Modality": ""}, "missing required attribute Modality"),
    ],
)
def test_bad_headers_rejected_with_reason(
    db: Database, tmp_path: Path, changes: dict[str, str], reason: str
) -> None:
    data = ct_bytes(**changes)
    outcome = ingest(db, tmp_path, data)
    assert outcome.status == StoreStatus.cannot_understand
    assert reason in outcome.reason
    assert not (tmp_path / "dicom").exists() or not any((tmp_path / "dicom").rglob("*.dcm"))
    assert_quarantined(db, tmp_path, data, reason, outcome.quarantine_id)


def assert_quarantined(
    db: Database, tmp_path: Path, data: bytes, reason: str, qid: int | None
) -> None:
    """The rejected bytes are kept, under the quarantine folder, with the reason."""
    listing = quarantine_listing(db)["items"]
    assert [item["id"] for item in listing] == [qid]
    (item,) = listing
    assert reason in str(item["reason"])
    assert item["status"] == "0xC000"
    assert item["sha256"] == hashlib.sha256(data).hexdigest()
    with db.session() as s:
        kept = Path(s.scalars(select(QuarantineRow.path)).one())
    assert kept.read_bytes() == data
    assert kept.resolve().is_relative_to((tmp_path / "quarantine").resolve())


def test_garbage_rejected_and_kept(db: Database, tmp_path: Path) -> None:
    data = b"\x00" * 10 + b"not dicom at all"
    outcome = ingest(db, tmp_path, data)
    assert outcome.status == StoreStatus.cannot_understand
    assert "unreadable" in outcome.reason or "missing" in outcome.reason
    assert_quarantined(db, tmp_path, data, outcome.reason, outcome.quarantine_id)


def test_quiet_period_completes_series_and_late_instance_requeues(
    db: Database, tmp_path: Path
) -> None:
    t0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    ingest(db, tmp_path, ct_bytes(), now=t0)
    assert complete_quiet_series(db, quiet_seconds=2, now=t0 + timedelta(seconds=1)) == []
    queued = complete_quiet_series(db, quiet_seconds=2, now=t0 + timedelta(seconds=3))
    assert len(queued) == 1
    # queued once only
    assert complete_quiet_series(db, quiet_seconds=2, now=t0 + timedelta(seconds=10)) == []
    with db.session() as s:
        job = s.scalars(select(JobRow)).one()
        job.state = "done"
    # a late instance re-opens the series and the study is queued again once quiet
    late = t0 + timedelta(seconds=20)
    ingest(db, tmp_path, ct_bytes(SOPInstanceUID="1.2.826.0.1.3680043.8.498.1"), now=late)
    with db.session() as s:
        assert s.scalar(select(SeriesRow.state)) == "receiving"
        assert s.scalar(select(StudyRow.ai_status)) == "pending"
    assert complete_quiet_series(db, quiet_seconds=2, now=late + timedelta(seconds=1)) == []
    assert len(complete_quiet_series(db, quiet_seconds=2, now=late + timedelta(seconds=3))) == 1
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(JobRow)) == 2
