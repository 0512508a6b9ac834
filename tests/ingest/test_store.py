from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.filewriter
import pytest
from pydicom.filebase import DicomBytesIO
from sqlalchemy import func, select

from tests.conftest import pydicom_file
from triage.db import Database
from triage.db.tables import InstanceRow, JobRow, QuarantineRow, SeriesRow, StudyRow
from triage.ingest.assembly import complete_quiet_series
from triage.ingest.store import (
    DuplicatePolicy,
    Ingestor,
    StoreStatus,
    ingest_instance,
    quarantine_listing,
    remove_stale_parts,
    write_durably,
)


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
    assert outcome.reason.startswith("not DICOM")
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


def ingestor(db: Database, tmp_path: Path, **options: Any) -> Ingestor:
    (tmp_path / "incoming").mkdir(exist_ok=True)
    return Ingestor(
        db, tmp_path / "dicom", tmp_path / "incoming", tmp_path / "quarantine", **options
    )


def stored_paths(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "dicom").rglob("*.dcm")) if (tmp_path / "dicom").exists() else []


def test_executable_preamble_is_refused(db: Database, tmp_path: Path) -> None:
    data = ct_bytes()
    for magic in (b"MZ\x90\x00", b"\x7fELF\x02\x01"):
        evil = magic + data[len(magic) :]
        outcome = ingest(db, tmp_path, evil)
        assert outcome.status == StoreStatus.cannot_understand
        assert "preamble holds an executable" in outcome.reason
    assert stored_paths(tmp_path) == []
    # a TIFF dual-personality preamble is allowed (PS3.10 7.5)
    assert ingest(db, tmp_path, b"II*\x00" + data[4:]).ok


def test_oversized_dimensions_refused_before_pixel_data(db: Database, tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000  # 8 TB announced, 32 KB sent
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    outcome = ingestor(db, tmp_path, max_pixel_bytes=1024**3).ingest(buf.getvalue(), source="t")
    assert outcome.status == StoreStatus.cannot_understand
    assert outcome.reason.startswith("image too large: Rows 65535 x Columns 65535 x frames 1000")
    assert stored_paths(tmp_path) == []


def test_truncated_native_pixel_data_is_refused(db: Database, tmp_path: Path) -> None:
    data = ct_bytes()
    outcome = ingest(db, tmp_path, data[:-20000])
    assert outcome.status == StoreStatus.cannot_understand
    assert "truncated PixelData" in outcome.reason
    assert stored_paths(tmp_path) == []


def test_truncated_encapsulated_pixel_data_is_refused(db: Database, tmp_path: Path) -> None:
    data = pydicom_file("693_J2KR.dcm").read_bytes()
    outcome = ingest(db, tmp_path, data[: len(data) // 2])
    assert outcome.status == StoreStatus.cannot_understand
    assert outcome.reason.startswith("truncated")
    assert stored_paths(tmp_path) == []


def test_image_class_without_pixel_data_does_not_match_sop_class(
    db: Database, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.PixelData
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    outcome = ingest(db, tmp_path, buf.getvalue())
    assert outcome.status == StoreStatus.dataset_does_not_match_sop_class
    assert outcome.reason == "data set does not match CT Image Storage: no pixel data"


def test_request_and_data_set_disagree(db: Database, tmp_path: Path) -> None:
    outcome = ingestor(db, tmp_path).ingest(
        ct_bytes(), source="t", expected_sop_class="1.2.840.10008.5.1.4.1.1.4"
    )
    assert outcome.status == StoreStatus.dataset_does_not_match_sop_class
    assert "C-STORE request" in outcome.reason


def test_modality_contradicting_sop_class_is_stored_with_warning(
    db: Database, tmp_path: Path
) -> None:
    outcome = ingest(db, tmp_path, ct_bytes(Modality="MR"))
    assert outcome.status == StoreStatus.dataset_does_not_match_sop_class_warning
    assert outcome.ok and "Modality 'MR' does not match CT Image Storage" in outcome.reason
    assert len(stored_paths(tmp_path)) == 1


def test_bare_data_set_gets_file_meta_with_coercion_warning(db: Database, tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(fp, ds)  # no preamble, no file meta
    outcome = ingest(db, tmp_path, fp.getvalue())
    assert outcome.status == StoreStatus.coercion_of_elements
    (path,) = stored_paths(tmp_path)
    stored = pydicom.dcmread(path)  # a proper Part 10 file now
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(stored.pixel_array, ds.pixel_array)


def test_low_disk_answers_out_of_resources(db: Database, tmp_path: Path) -> None:
    outcome = ingestor(db, tmp_path, min_free_bytes=2**62).ingest(ct_bytes(), source="t")
    assert outcome.status == StoreStatus.out_of_resources
    assert stored_paths(tmp_path) == []


def test_duplicate_policy_keep_first(db: Database, tmp_path: Path) -> None:
    first, second = ct_bytes(), ct_bytes(PatientID="CORRECTED")
    ing = ingestor(db, tmp_path)
    assert ing.ingest(first, source="t").status == StoreStatus.success
    outcome = ing.ingest(second, source="t")
    assert outcome.status == StoreStatus.success and outcome.duplicate
    (path,) = stored_paths(tmp_path)
    assert path.read_bytes() == first
    (item,) = quarantine_listing(db)["items"]
    assert "policy keep_first" in str(item["reason"])
    assert item["sha256"] == hashlib.sha256(second).hexdigest()


def test_duplicate_policy_replace_reopens_the_series(db: Database, tmp_path: Path) -> None:
    first, second = ct_bytes(), ct_bytes(PatientID="CORRECTED")
    ing = ingestor(db, tmp_path, duplicate_policy=DuplicatePolicy.REPLACE)
    ing.ingest(first, source="t")
    t1 = datetime(2026, 1, 1, tzinfo=UTC)
    complete_quiet_series(db, quiet_seconds=0.001, now=datetime.now(UTC) + timedelta(seconds=1))
    assert ing.ingest(second, source="t", now=t1).status == StoreStatus.success
    (path,) = stored_paths(tmp_path)
    assert path.read_bytes() == second
    with db.session() as s:
        assert s.scalar(select(SeriesRow.state)) == "receiving"
        assert s.scalar(select(InstanceRow.sha256)) == hashlib.sha256(second).hexdigest()
        assert s.scalar(select(func.count()).select_from(InstanceRow)) == 1


def test_duplicate_policy_reject(db: Database, tmp_path: Path) -> None:
    ing = ingestor(db, tmp_path, duplicate_policy=DuplicatePolicy.REJECT)
    ing.ingest(ct_bytes(), source="t")
    outcome = ing.ingest(ct_bytes(PatientID="OTHER"), source="t")
    assert outcome.status == StoreStatus.duplicate_sop_instance and not outcome.ok
    assert len(quarantine_listing(db)["items"]) == 1


def test_max_wait_processes_a_study_that_never_goes_quiet(db: Database, tmp_path: Path) -> None:
    """An instance every second for 10 minutes: analysed at 5 min, 10 min, then when quiet."""
    t0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    queued_at: list[int] = []
    for second in range(0, 601):
        now = t0 + timedelta(seconds=second)
        ingest(db, tmp_path, ct_bytes(SOPInstanceUID=f"1.2.3.4.{second}"), now=now)
        if complete_quiet_series(db, quiet_seconds=2, max_wait_seconds=300, now=now):
            queued_at.append(second)
            with db.session() as s:  # the worker takes the job
                for job in s.scalars(select(JobRow).where(JobRow.state == "queued")):
                    job.state = "done"
    assert queued_at == [300, 600]
    end = t0 + timedelta(seconds=603)
    assert len(complete_quiet_series(db, quiet_seconds=2, max_wait_seconds=300, now=end)) == 1


def test_concurrent_first_instances_of_a_new_study(db: Database, tmp_path: Path) -> None:
    """Eight associations deliver the first instances of one new study at the same moment:
    every instance is stored and indexed once, under one study and one series."""
    ing = ingestor(db, tmp_path)
    payloads = [ct_bytes(SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.77.{i}") for i in range(32)]
    barrier = threading.Barrier(8)

    def send(chunk: list[bytes]) -> list[StoreStatus]:
        barrier.wait()
        return [ing.ingest(data, source="t").status for data in chunk]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, [payloads[i::8] for i in range(8)]))
    assert all(status == StoreStatus.success for chunk in results for status in chunk)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(InstanceRow)) == 32
        assert s.scalar(select(func.count()).select_from(StudyRow)) == 1
        assert s.scalar(select(SeriesRow.n_instances)) == 32
    assert len(stored_paths(tmp_path)) == 32


def test_stale_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    stale, fresh = incoming / "a.part", incoming / "b.part"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"being written")
    old = datetime.now(UTC).timestamp() - 3600
    os.utime(stale, (old, old))
    assert remove_stale_parts(incoming) == 1
    assert not stale.exists() and fresh.exists()


def test_new_folders_are_created_for_a_new_study(tmp_path: Path) -> None:
    dest = tmp_path / "dicom" / "a" / "b" / "c.dcm"
    (tmp_path / "incoming").mkdir()
    write_durably(b"x", dest, tmp_path / "incoming")
    assert dest.read_bytes() == b"x"
    assert list((tmp_path / "incoming").iterdir()) == []


def reencoded(data: bytes, *, implicit: bool = False, meta: dict[str, str] | None = None) -> bytes:
    """The same data set in another file: another file meta header, or implicit VR."""
    ds = pydicom.dcmread(BytesIO(data))
    for keyword, value in (meta or {}).items():
        setattr(ds.file_meta, keyword, value)
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return out.getvalue()


@pytest.mark.parametrize("policy", list(DuplicatePolicy))
@pytest.mark.parametrize(
    "resend",
    [
        pytest.param(
            {"meta": {"ImplementationClassUID": "1.2.3.4", "SourceApplicationEntityTitle": "PACS"}},
            id="other-file-meta",
        ),
        pytest.param({"implicit": True}, id="implicit-vr"),
    ],
)
def test_the_same_data_set_in_another_file_is_a_harmless_resend(
    db: Database, tmp_path: Path, policy: DuplicatePolicy, resend: dict[str, Any]
) -> None:
    first = ct_bytes()
    again = reencoded(first, **resend)
    assert again != first
    ing = ingestor(db, tmp_path, duplicate_policy=policy)
    assert ing.ingest(first, source="dicom:CT").status == StoreStatus.success
    outcome = ing.ingest(again, source="stow:peer")
    assert outcome.status == StoreStatus.success and outcome.duplicate
    assert "same data set" in outcome.reason
    assert quarantine_listing(db)["items"] == []
    (path,) = stored_paths(tmp_path)
    assert path.read_bytes() == first  # the first copy stays, untouched


def test_a_different_instance_is_named_by_the_attributes_that_differ(
    db: Database, tmp_path: Path
) -> None:
    ing = ingestor(db, tmp_path)
    first = ct_bytes()
    ds = pydicom.dcmread(BytesIO(first))
    ds.PatientID = "CORRECTED"
    ds.PixelData = bytes(len(ds.PixelData))
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    second = out.getvalue()
    assert ing.ingest(first, source="t").status == StoreStatus.success
    outcome = ing.ingest(second, source="t")
    assert outcome.status == StoreStatus.success and outcome.duplicate
    (item,) = quarantine_listing(db)["items"]
    reason = str(item["reason"])
    assert "differs in PatientID, PixelData" in reason, reason
    assert "CORRECTED" not in reason  # attribute names, never values
    assert item["sha256"] == hashlib.sha256(second).hexdigest()


def test_a_spooled_stow_body_of_another_server_is_kept_at_start(tmp_path: Path) -> None:
    """Two servers may share a data directory: one starting must not delete the STOW-RS
    body the other is still storing (only an hour-old spool file is a crash's leftover)."""

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    reading = incoming / "a.stow.part"
    reading.write_bytes(b"x")
    crashed = incoming / "b.stow.part"
    crashed.write_bytes(b"x")
    write = incoming / "c.part"
    write.write_bytes(b"x")
    ten_minutes_ago = time.time() - 600
    os.utime(reading, (ten_minutes_ago, ten_minutes_ago))
    os.utime(write, (ten_minutes_ago, ten_minutes_ago))
    two_hours_ago = time.time() - 7200
    os.utime(crashed, (two_hours_ago, two_hours_ago))
    assert remove_stale_parts(incoming) == 2
    assert reading.exists() and not crashed.exists() and not write.exists()
