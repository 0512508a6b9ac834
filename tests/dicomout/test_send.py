"""The result sender against a real DICOM storage SCP (pynetdicom, in this process, on a free
port): one association per destination and round, persisted retries with capped exponential
backoff, giving up after the last attempt, exclusive leases, TLS, and the settings."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import insert, select

from triage.audit.chain import listing
from triage.config import ResultDestination, Settings
from triage.db import Database
from triage.db.tables import DicomResultRow, ResultExportRow, StudyRow
from triage.dicomout.index import NewResult, replace_results
from triage.dicomout.send import SOP_CLASSES, ExportConfig, ResultSender, backoff
from triage.domain import DicomResultKind
from triage.serve.launcher import free_port

STUDY_UID = "1.2.826.0.1.3680043.10.543.8801"
FAST = ExportConfig(backoff_seconds=0.01, max_backoff_seconds=0.05, timeout_seconds=5)


# --- a storage SCP ----------------------------------------------------------------------


@dataclass
class Store:
    """A pynetdicom storage SCP for SEG, Comprehensive 3D SR and Secondary Capture on
    127.0.0.1."""

    port: int = field(default_factory=free_port)
    statuses: list[int] = field(default_factory=list)  # answered in turn, then 0x0000
    sop_classes: Sequence[str] = (
        SegmentationStorage,
        Comprehensive3DSRStorage,
        SecondaryCaptureImageStorage,
    )
    hold: threading.Event | None = None  # each C-STORE waits for it when set
    received: list[tuple[str, str, int]] = field(default_factory=list)  # (SOP UID, AE, assoc)
    arrived: threading.Event = field(default_factory=threading.Event)
    ssl_context: ssl.SSLContext | None = None
    require_called_aet: bool = False
    server: ThreadedAssociationServer | None = None

    def handle_store(self, event: Any) -> int:
        self.received.append(
            (
                str(event.request.AffectedSOPInstanceUID),
                str(event.assoc.requestor.ae_title),
                id(event.assoc),
            )
        )
        self.arrived.set()
        if self.hold is not None:
            self.hold.wait(10)
        return self.statuses.pop(0) if self.statuses else 0x0000

    def start(self) -> Store:
        ae = AE(ae_title="STORE")
        ae.require_called_aet = self.require_called_aet
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.handle_store)],
            ssl_context=self.ssl_context,
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def destination(self) -> ResultDestination:
        return ResultDestination(ae_title="STORE", host="127.0.0.1", port=self.port)

    def __enter__(self) -> Store:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- results in the index ---------------------------------------------------------------


_SOP_CLASS = {
    DicomResultKind.seg: SegmentationStorage,
    DicomResultKind.sr: Comprehensive3DSRStorage,
    DicomResultKind.sc: SecondaryCaptureImageStorage,
}


def _file(path: Path, kind: DicomResultKind) -> NewResult:
    """A small Part 10 file of the result's SOP class (the sender never decodes it)."""
    sop_class = _SOP_CLASS[kind]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = kind.value.upper()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return NewResult(
        kind=kind,
        SOPInstanceUID=str(ds.SOPInstanceUID),
        SeriesInstanceUID=str(ds.SeriesInstanceUID),
        SOPClassUID=str(sop_class),
        path=path,
        finding="intracranial_haemorrhage",
        model_name="blast-ct-v1",
    )


def seed(
    db: Database,
    folder: Path,
    destinations: Sequence[str],
    kinds: Sequence[DicomResultKind] = (DicomResultKind.seg, DicomResultKind.sr),
) -> list[NewResult]:
    """A study with a result of each of ``kinds`` (a SEG and an SR), each queued for
    ``destinations``."""
    now = datetime.now(UTC)
    results = [_file(folder / f"{k.value}.dcm", k) for k in kinds]
    with db.session() as s:
        study_id = s.scalar(
            insert(StudyRow)
            .returning(StudyRow.id)
            .values(StudyInstanceUID=STUDY_UID, first_received_at=now, last_received_at=now)
        )
        assert study_id is not None
        replace_results(
            s,
            study_id=study_id,
            model_name="blast-ct-v1",
            results=results,
            destinations=destinations,
            outcomes=[],
            now=now,
        )
    return results


def exports(db: Database) -> list[ResultExportRow]:
    with db.session() as s:
        return list(s.scalars(select(ResultExportRow).order_by(ResultExportRow.id)))


def by_uid(db: Database) -> dict[str, ResultExportRow]:
    with db.session() as s:
        rows = s.execute(
            select(DicomResultRow.SOPInstanceUID, ResultExportRow).join(
                ResultExportRow, ResultExportRow.result_id == DicomResultRow.id
            )
        ).all()
    return {str(uid): row for uid, row in rows}


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def aware(value: datetime | None) -> datetime:
    assert value is not None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@pytest.fixture()
def store() -> Iterator[Store]:
    with Store() as scp:
        yield scp


# --- the tests --------------------------------------------------------------------------


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff(n, 30.0, 3600.0).total_seconds() for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert backoff(20, 30.0, 3600.0) == timedelta(hours=1)
    assert backoff(0, 2.0, 10.0) == timedelta(seconds=2)


def test_results_are_sent_once_over_one_association(
    db: Database, tmp_path: Path, store: Store
) -> None:
    results = seed(db, tmp_path, [store.destination.name])
    sender = ResultSender(db, [store.destination], ExportConfig(calling_ae_title="TRIAGE_T"))
    assert sender.send_due() == 2
    assert [uid for uid, _, _ in store.received] == [r.SOPInstanceUID for r in results]
    assert {ae for _, ae, _ in store.received} == {"TRIAGE_T"}  # our AE title calls
    assert len({assoc for _, _, assoc in store.received}) == 1  # one association
    for row in exports(db):
        assert (row.state, row.attempts, row.last_error, row.next_at) == ("sent", 1, None, None)
        assert row.sent_at is not None
    assert sender.send_due() == 0 and len(store.received) == 2  # sent once
    records = listing(db, action="export")[::-1]  # oldest first
    assert len(records) == 2
    for record, result in zip(records, results, strict=True):
        assert record["actor"] == "triage-export" and record["outcome"] == "success"
        assert (record["target_kind"], record["target"]) == ("study", STUDY_UID)
        assert record["detail"]["destination"] == store.destination.name
        assert record["detail"]["SOPInstanceUID"] == result.SOPInstanceUID


def test_a_secondary_capture_is_proposed_and_sent(
    db: Database, tmp_path: Path, store: Store
) -> None:
    assert SOP_CLASSES == (
        SegmentationStorage,
        Comprehensive3DSRStorage,
        SecondaryCaptureImageStorage,
    )
    (sc,) = seed(db, tmp_path, [store.destination.name], kinds=[DicomResultKind.sc])
    assert ResultSender(db, [store.destination], FAST).send_due() == 1
    assert [uid for uid, _, _ in store.received] == [sc.SOPInstanceUID]
    assert {(r.state, r.attempts) for r in exports(db)} == {("sent", 1)}


def test_an_unreachable_destination_backs_off_and_a_new_sender_resumes(
    db: Database, tmp_path: Path
) -> None:
    """The retry state is in the database: after connection refused, the export waits out
    its backoff, and a new sender (a restarted server) delivers it once the PACS is up."""
    later = Store()  # its port, nothing listening yet: connection refused
    results = seed(db, tmp_path, [later.destination.name])
    config = ExportConfig(backoff_seconds=60, max_backoff_seconds=600, timeout_seconds=5)
    before = datetime.now(UTC)
    first = ResultSender(db, [later.destination], config)
    assert first.send_due() == 0
    for row in exports(db):
        assert (row.state, row.attempts) == ("pending", 1)
        assert row.last_error and "no association" in row.last_error
        assert aware(row.next_at) >= before + timedelta(seconds=59)
        assert row.sent_at is None
    assert first.send_due() == 0 and {r.attempts for r in exports(db)} == {1}  # not due
    with later:
        second = ResultSender(db, [later.destination], config)
        assert second.send_due() == 0  # the backoff is honoured
        assert second.send_due(now=datetime.now(UTC) + timedelta(seconds=61)) == 2
    assert [uid for uid, _, _ in later.received] == [r.SOPInstanceUID for r in results]
    assert {(r.state, r.attempts) for r in exports(db)} == {("sent", 2)}


def test_a_failure_status_is_retried_until_the_last_attempt(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Store(statuses=[0xA700] * 100) as store:
        results = seed(db, tmp_path, [store.destination.name])
        config = ExportConfig(max_attempts=3, backoff_seconds=0.01, max_backoff_seconds=0.02)
        sender = ResultSender(db, [store.destination], config)

        def gave_up() -> bool:
            sender.send_due()
            return {r.state for r in exports(db)} == {"failed"}

        assert wait_until(gave_up)
        assert sender.send_due(now=datetime.now(UTC) + timedelta(days=1)) == 0
    for row in exports(db):
        assert (row.state, row.attempts, row.next_at) == ("failed", 3, None)
        assert row.last_error == "C-STORE status 0xA700 (Failure)"
    assert len(store.received) == 3 * len(results)  # never sent after giving up
    assert "failed after 3 attempts" in caplog.text
    failures = [r for r in listing(db, action="export") if r["outcome"] != "success"]
    assert len(failures) == 2 and failures[0]["detail"]["error"].startswith("C-STORE status")


def test_a_warning_status_counts_as_stored(db: Database, tmp_path: Path) -> None:
    with Store(statuses=[0xB000, 0xB007]) as store:
        seed(db, tmp_path, [store.destination.name])
        assert ResultSender(db, [store.destination]).send_due() == 2
    assert {r.state for r in exports(db)} == {"sent"}


def test_a_class_the_destination_does_not_accept_fails_that_export_only(
    db: Database, tmp_path: Path
) -> None:
    with Store(sop_classes=[Comprehensive3DSRStorage]) as store:
        seg, sr = seed(db, tmp_path, [store.destination.name])
        assert ResultSender(db, [store.destination], FAST).send_due() == 1
    rows = by_uid(db)
    assert rows[sr.SOPInstanceUID].state == "sent"
    assert rows[seg.SOPInstanceUID].state == "pending"
    assert rows[seg.SOPInstanceUID].last_error == (
        "the destination accepted no presentation context for the seg"
    )


def test_a_rejected_association_is_an_attempt_with_its_reason(db: Database, tmp_path: Path) -> None:
    with Store(require_called_aet=True) as store:
        wrong = ResultDestination(ae_title="NOT_STORE", host="127.0.0.1", port=store.port)
        seed(db, tmp_path, [wrong.name])
        assert ResultSender(db, [wrong], FAST).send_due() == 0
        assert store.received == []
    for row in exports(db):
        assert (row.state, row.attempts) == ("pending", 1)
        assert row.last_error == "association rejected by the destination (check the AE titles)"


def test_a_missing_file_fails_at_once(db: Database, tmp_path: Path, store: Store) -> None:
    seg, sr = seed(db, tmp_path, [store.destination.name])
    seg.path.unlink()
    assert ResultSender(db, [store.destination], FAST).send_due() == 1
    rows = by_uid(db)
    assert rows[seg.SOPInstanceUID].state == "failed"
    assert "missing" in (rows[seg.SOPInstanceUID].last_error or "")
    assert rows[sr.SOPInstanceUID].state == "sent"


def test_exports_to_a_destination_no_longer_configured_wait(
    db: Database, tmp_path: Path, store: Store
) -> None:
    seed(db, tmp_path, ["GONE@192.0.2.1:104", store.destination.name])
    assert ResultSender(db, [store.destination], FAST).send_due() == 2
    states = {(r.destination, r.state, r.attempts) for r in exports(db)}
    assert states == {
        ("GONE@192.0.2.1:104", "pending", 0),
        (store.destination.name, "sent", 1),
    }


def test_an_attempt_is_leased_to_one_sender(db: Database, tmp_path: Path) -> None:
    """Two senders on one database: while one holds an association, the other finds
    nothing due, and every result reaches the PACS once."""
    hold = threading.Event()
    with Store(hold=hold) as store:
        results = seed(db, tmp_path, [store.destination.name])
        a = ResultSender(db, [store.destination], FAST)
        b = ResultSender(db, [store.destination], FAST)
        worker = threading.Thread(target=a.send_due)
        worker.start()
        try:
            assert store.arrived.wait(10)  # a is inside its association
            assert b.send_due() == 0
        finally:
            hold.set()
            worker.join(20)
        assert b.send_due() == 0
    assert sorted(uid for uid, _, _ in store.received) == sorted(r.SOPInstanceUID for r in results)
    assert {(r.state, r.attempts) for r in exports(db)} == {("sent", 1)}


def test_the_thread_delivers_what_is_queued_while_it_runs(
    db: Database, tmp_path: Path, store: Store
) -> None:
    sender = ResultSender(
        db, [store.destination], ExportConfig(poll_seconds=0.05, timeout_seconds=5)
    )
    sender.start()
    try:
        seed(db, tmp_path, [store.destination.name])
        assert wait_until(lambda: {r.state for r in exports(db)} == {"sent"})
    finally:
        sender.stop()
    assert sender.thread() is None and len(store.received) == 2


def test_stopping_gives_back_what_it_had_not_sent(db: Database, tmp_path: Path) -> None:
    hold = threading.Event()
    with Store(hold=hold) as store:
        seg, sr = seed(db, tmp_path, [store.destination.name])
        sender = ResultSender(db, [store.destination], ExportConfig(poll_seconds=0.05))
        sender.start()
        assert store.arrived.wait(10)  # inside the first C-STORE
        stopping = threading.Thread(target=sender.stop)
        stopping.start()
        assert wait_until(lambda: sender._stop.is_set())
        hold.set()
        stopping.join(20)
        assert not stopping.is_alive()
    rows = by_uid(db)
    assert (rows[seg.SOPInstanceUID].state, rows[seg.SOPInstanceUID].attempts) == ("sent", 1)
    untried = rows[sr.SOPInstanceUID]
    assert (untried.state, untried.attempts, untried.next_at) == ("pending", 0, None)
    assert [uid for uid, _, _ in store.received] == [seg.SOPInstanceUID]


def test_tls_destinations_check_the_certificate(
    db: Database, tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tls_files["server.pem"], tls_files["server.key"])
    with Store(ssl_context=server) as store:
        seed(db, tmp_path, [f"STORE@localhost:{store.port}"])
        untrusted = ResultDestination(ae_title="STORE", host="localhost", port=store.port, tls=True)
        assert ResultSender(db, [untrusted], FAST).send_due() == 0  # unknown CA: refused
        assert store.received == []
        assert {r.attempts for r in exports(db)} == {1}
        trusted = ResultDestination(
            ae_title="STORE",
            host="localhost",
            port=store.port,
            tls=True,
            ca_file=tls_files["ca.pem"],
        )
        later = datetime.now(UTC) + timedelta(minutes=1)
        assert ResultSender(db, [trusted], FAST).send_due(now=later) == 2
    assert len(store.received) == 2


def test_destinations_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    value = [
        {"ae_title": "PACS", "host": "pacs.hospital.local", "port": 104},
        {"ae_title": "ARCHIVE", "host": "10.1.2.3", "port": 2762, "tls": True, "ca_file": "/ca"},
    ]
    monkeypatch.setenv("TRIAGE_RESULT_DESTINATIONS", json.dumps(value))
    settings = Settings()
    assert [d.name for d in settings.result_destinations] == [
        "PACS@pacs.hospital.local:104",
        "ARCHIVE@10.1.2.3:2762",
    ]
    assert settings.result_destinations[1].tls and settings.result_destinations[1].ca_file
    for bad in (
        {"ae_title": "A\\B", "host": "h", "port": 104},
        {"ae_title": "SEVENTEEN_LETTERS", "host": "h", "port": 104},
        {"ae_title": "PACS", "host": "h", "port": 0},
        {"ae_title": "PACS", "host": "h", "port": 104, "tsl": True},
    ):
        monkeypatch.setenv("TRIAGE_RESULT_DESTINATIONS", json.dumps([bad]))
        with pytest.raises(ValueError):
            Settings()
