"""DICOM results delivered to a real PACS: Debian's Orthanc on free loopback ports
(``triage.demo.orthanc``) receives the SEG and SR of a synthetic head CT whose overlay and
finding are put in place as the worker leaves them (the network does not run).

- the sender delivers both, and Orthanc lists them (``/instances``, ``/series``) with our
  UIDs and modalities;
- with Orthanc down, exports stay pending, counting attempts and saying why; once it is up
  again every result arrives exactly once (Orthanc's instance count, one sent record each);
- ``triage serve`` with TRIAGE_RESULT_DESTINATIONS sends what is queued, and its API shows
  the export states.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.conftest import running_server
from tests.dicomout.stored import StoredStudy, store_cube_study
from tests.e2e.conftest import send
from triage.audit.chain import listing
from triage.config import ResultDestination
from triage.db import Database
from triage.db.tables import DicomResultRow, ResultExportRow
from triage.demo.orthanc import OrthancProcess, find_orthanc
from triage.demo.phantom import PhantomSpec, write_head_ct_series
from triage.dicomout.results import make_results
from triage.dicomout.send import ExportConfig, ResultSender

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Short waits, so that an outage costs a few attempts within seconds.
CONFIG = ExportConfig(
    calling_ae_title="TRIAGE",
    max_attempts=1000,
    backoff_seconds=0.05,
    max_backoff_seconds=0.2,
    timeout_seconds=5,
    poll_seconds=0.05,
)


@pytest.fixture(scope="session")
def orthanc_executable() -> str:
    found = find_orthanc()
    if found is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    return found


@pytest.fixture()
def orthanc(orthanc_executable: str, tmp_path: Path) -> Iterator[OrthancProcess]:
    """An Orthanc of this test, not started (the test starts and stops it)."""
    server = OrthancProcess(orthanc_executable, tmp_path / "orthanc")
    try:
        yield server
    finally:
        server.stop()


def destination(orthanc: OrthancProcess) -> ResultDestination:
    return ResultDestination(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port)


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def make(db: Database, data_dir: Path, study: StoredStudy, name: str) -> list[str]:
    """The study's results, queued for ``name``; their SOPInstanceUIDs."""
    (outcome,) = make_results(
        db,
        study.StudyInstanceUID,
        findings=[study.finding],
        overlays=study.overlays,
        results_dir=data_dir / "results",
        destinations=[name],
    )
    assert outcome.error is None, outcome.error
    return [r.SOPInstanceUID for r in outcome.made]


def exports(db: Database) -> dict[str, ResultExportRow]:
    """SOPInstanceUID -> its export row."""
    with db.session() as s:
        rows = s.execute(
            select(DicomResultRow.SOPInstanceUID, ResultExportRow).join(
                ResultExportRow, ResultExportRow.result_id == DicomResultRow.id
            )
        ).all()
    return {str(uid): row for uid, row in rows}


def in_orthanc(orthanc: OrthancProcess) -> dict[str, dict[str, str]]:
    """SOPInstanceUID -> its series' main tags (Modality, SeriesInstanceUID...), from
    Orthanc's REST API."""
    found: dict[str, dict[str, str]] = {}
    for instance_id in orthanc.get("/instances"):
        instance = orthanc.get(f"/instances/{instance_id}")
        series = orthanc.get(f"/series/{instance['ParentSeries']}")
        found[instance["MainDicomTags"]["SOPInstanceUID"]] = series["MainDicomTags"]
    return found


def test_the_sender_delivers_seg_and_sr_to_orthanc(
    db: Database, tmp_path: Path, orthanc: OrthancProcess
) -> None:
    orthanc.start()
    study = store_cube_study(db, tmp_path)
    seg_uid, sr_uid = make(db, tmp_path, study, destination(orthanc).name)
    sender = ResultSender(db, [destination(orthanc)], CONFIG)
    sender.start()
    try:
        assert wait_until(lambda: {e.state for e in exports(db).values()} == {"sent"})
    finally:
        sender.stop()
    stored = in_orthanc(orthanc)
    assert set(stored) == {seg_uid, sr_uid}
    assert stored[seg_uid]["Modality"] == "SEG" and stored[sr_uid]["Modality"] == "SR"
    with db.session() as s:
        series = dict(
            s.execute(select(DicomResultRow.SOPInstanceUID, DicomResultRow.SeriesInstanceUID)).all()
        )
    assert stored[seg_uid]["SeriesInstanceUID"] == series[seg_uid]
    assert stored[sr_uid]["SeriesInstanceUID"] == series[sr_uid]
    study_ids = {orthanc.get(f"/series/{sid}")["ParentStudy"] for sid in orthanc.get("/series")}
    (study_id,) = study_ids  # both in the source study
    assert orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"] == (
        study.StudyInstanceUID
    )
    assert {(e.attempts, e.last_error) for e in exports(db).values()} == {(1, None)}
    print(f"Orthanc holds {orthanc.count_instances()} instances: {sorted(stored)}")


def test_an_outage_keeps_exports_pending_and_each_result_arrives_once(
    db: Database, tmp_path: Path, orthanc: OrthancProcess
) -> None:
    name = destination(orthanc).name
    sender = ResultSender(db, [destination(orthanc)], CONFIG)
    sender.start()
    try:
        # Down before the export: attempts count up, with the reason.
        first = make(db, tmp_path, store_cube_study(db, tmp_path, name="first"), name)

        def retried(uids: list[str]) -> bool:
            rows = exports(db)
            return all(rows[u].state == "pending" and rows[u].attempts >= 2 for u in uids)

        assert wait_until(lambda: retried(first))
        for uid in first:
            row = exports(db)[uid]
            assert row.last_error and "no association" in row.last_error
            assert row.sent_at is None
        orthanc.start()
        assert wait_until(lambda: all(exports(db)[u].state == "sent" for u in first))

        # Down again while the sender runs: new results wait, then go.
        orthanc.stop()
        second = make(db, tmp_path, store_cube_study(db, tmp_path, name="second"), name)
        assert wait_until(lambda: retried(second))
        orthanc.start()
        assert wait_until(lambda: all(exports(db)[u].state == "sent" for u in second))
    finally:
        sender.stop()

    rows = exports(db)
    print(
        "attempts before delivery:",
        {uid[-12:]: rows[uid].attempts for uid in first + second},
    )
    assert set(in_orthanc(orthanc)) == set(first + second)
    assert orthanc.count_instances() == len(first + second) == 4
    for uid in first + second:
        assert rows[uid].state == "sent" and rows[uid].attempts >= 2
        assert rows[uid].last_error is None and rows[uid].sent_at is not None
    sent = [r for r in listing(db, action="export") if r["outcome"] == "success"]
    assert sorted(r["detail"]["SOPInstanceUID"] for r in sent) == sorted(first + second)


def test_triage_serve_sends_queued_results_and_shows_their_state(
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    orthanc.start()
    data_dir = tmp_path / "data"
    db = Database(f"sqlite:///{data_dir / 'triage.db'}")
    data_dir.mkdir()
    db.migrate()
    try:
        study = store_cube_study(db, data_dir)
        uids = make(db, data_dir, study, destination(orthanc).name)
    finally:
        db.dispose()
    env = {
        "TRIAGE_SERIES_QUIET_SECONDS": "3600",  # no analysis: the results are in place
        "TRIAGE_RESULT_DESTINATIONS": json.dumps([destination(orthanc).model_dump(mode="json")]),
        "TRIAGE_RESULT_EXPORT_BACKOFF_SECONDS": "0.1",
        "TRIAGE_RESULT_EXPORT_POLL_SECONDS": "0.1",
    }
    with running_server(data_dir, env) as server, server.client() as api:

        def states() -> set[str]:
            doc = api.get(f"/api/studies/{study.StudyInstanceUID}/results").json()
            return {e["state"] for r in doc["results"] for e in r["exports"]}

        assert wait_until(lambda: states() == {"sent"}), server.log()
        doc = api.get(f"/api/studies/{study.StudyInstanceUID}").json()
        assert [r["SOPInstanceUID"] for r in doc["dicom_results"]] == uids
        (export,) = doc["dicom_results"][0]["exports"]
        assert export["destination"] == destination(orthanc).name and export["sent_at"]
    assert set(in_orthanc(orthanc)) == set(uids)


@pytest.mark.realdata
def test_a_head_ct_analysed_by_blast_ct_reaches_the_pacs_as_seg_and_sr(
    tmp_path: Path, orthanc: OrthancProcess, storescu: str, weights_mirror: Path
) -> None:
    """The whole way: a phantom head CT with a bleed sent by storescu, analysed by the real
    network on CPU, its SEG and SR made by the worker and sent to Orthanc by the server."""
    orthanc.start()
    study_uid = generate_uid()
    paths = write_head_ct_series(
        tmp_path / "ct", PhantomSpec(haemorrhage=True, seed=21), StudyInstanceUID=study_uid
    )
    env = {
        "TRIAGE_MODEL_MIRROR": str(weights_mirror),
        "TRIAGE_MODELS": '["blast-ct-v1"]',
        "TRIAGE_DEVICE": "cpu",
        "TRIAGE_SERIES_QUIET_SECONDS": "1.5",
        "TRIAGE_RESULT_DESTINATIONS": json.dumps([destination(orthanc).model_dump(mode="json")]),
        "TRIAGE_RESULT_EXPORT_POLL_SECONDS": "0.2",
    }
    with running_server(tmp_path / "data", env) as server, server.client() as api:
        send(storescu, server, paths)

        def sent() -> bool:
            doc = api.get(f"/api/studies/{study_uid}/results")
            states = [e["state"] for r in doc.json()["results"] for e in r["exports"]]
            return doc.status_code == 200 and states == ["sent", "sent"]

        assert wait_until(sent, timeout=900), server.log()[-4000:]
        doc = api.get(f"/api/studies/{study_uid}").json()
        (finding,) = doc["findings"]
        assert finding["flag"] is True
        kinds = {r["kind"]: r["SOPInstanceUID"] for r in doc["dicom_results"]}
        assert set(kinds) == {"seg", "sr"}
        assert doc["routing"]["dicom_output"][0]["status"] == "made"
        patient_name = str(pydicom.dcmread(paths[0], stop_before_pixels=True).PatientName)
        assert patient_name and patient_name not in server.log()  # nor any warning
    stored = in_orthanc(orthanc)
    assert stored[kinds["seg"]]["Modality"] == "SEG" and stored[kinds["sr"]]["Modality"] == "SR"


def test_the_real_head_ct_results_reach_the_pacs(
    db: Database, tmp_path: Path, orthanc: OrthancProcess, cq500_dir: Path
) -> None:
    """The SEG and SR made from the real head CT (238 slices; a made-up bleed laid on its
    real grid, the network not run) are received by Orthanc and read back by highdicom."""
    import highdicom as hd
    import numpy as np

    from tests.dicomout.builders import model_output
    from tests.dicomout.stored import MODEL
    from triage.domain import Finding
    from triage.ingest.store import ingest_instance
    from triage.preprocess.ct import prepare_head_ct

    files = sorted(p for p in cq500_dir.rglob("*") if p.is_file())
    (tmp_path / "incoming").mkdir()
    for path in files:
        outcome = ingest_instance(
            path.read_bytes(),
            db=db,
            store_dir=tmp_path / "dicom",
            tmp_dir=tmp_path / "incoming",
            quarantine_dir=tmp_path / "quarantine",
            source="test",
        )
        assert outcome.ok, outcome.reason
    prepared = prepare_head_ct(files)
    labels = np.zeros(prepared.hu.shape, dtype=np.uint8)
    middle = np.argwhere(prepared.head_mask).mean(axis=0).astype(int)
    z, y, x = middle
    labels[z - 5 : z + 5, y - 8 : y + 8, x - 8 : x + 8] = 1  # IPH
    overlay, finding = model_output(prepared, labels, prepared.SeriesInstanceUID)
    finding = Finding(**{**vars(finding), "model": MODEL})
    study = StoredStudy(
        StudyInstanceUID=prepared.StudyInstanceUID,
        SeriesInstanceUID=prepared.SeriesInstanceUID,
        source_uids=frozenset(),
        overlay=overlay,
        finding=finding,
    )
    orthanc.start()
    seg_uid, sr_uid = make(db, tmp_path, study, destination(orthanc).name)
    sender = ResultSender(db, [destination(orthanc)], CONFIG)
    sender.start()
    try:
        assert wait_until(lambda: {e.state for e in exports(db).values()} == {"sent"}, 120)
    finally:
        sender.stop()
    stored = in_orthanc(orthanc)
    assert set(stored) == {seg_uid, sr_uid}
    assert (stored[seg_uid]["Modality"], stored[sr_uid]["Modality"]) == ("SEG", "SR")
    with db.session() as s:
        path = s.scalar(select(DicomResultRow.path).where(DicomResultRow.SOPInstanceUID == seg_uid))
    seg = hd.seg.segread(path)
    assert seg.StudyInstanceUID == prepared.StudyInstanceUID
    assert seg.number_of_segments == 1
