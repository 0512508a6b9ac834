"""Crash test of ingest durability: ``kill -9`` the server while DCMTK storescu sends.

Each trial sends a few hundred synthetic CT instances over one association and SIGKILLs
``triage serve`` at a random point (after a random number of store responses plus a random
delay, so the kill lands anywhere in receive / parse / write / fsync / rename / commit, and
now and then after the send finished). It then proves:

* every instance that storescu saw acknowledged (a Success or Warning store response) is in
  the index, its file exists, parses, its data set bytes hash to the source file's data set
  hash and the index row's sha256 is that of the stored file;
* after a restart on the same data directory and a resend of everything (in some trials
  after a second crash during a resend), the index holds exactly one row per source
  instance, every stored file matches its source, and the store holds no ``.dcm`` file that
  the index does not know (a file written before a kill but not indexed is overwritten on
  resend at the same hashed path).

Ten trials, each with its own data directory. The analysis worker never starts (long quiet
period), so no model weights are needed.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
N_STUDIES = 3
PER_STUDY = 100
TRIALS = 10
SERVER_ENV = {"TRIAGE_SERIES_QUIET_SECONDS": "600"}  # the analysis worker never starts
# DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1: with it each small C-STORE waits
# ~40-90 ms on delayed ACKs, without it ~8 ms (the server's fsyncs and commit).
STORESCU_ENV = {**os.environ, "TCP_NODELAY": "1"}

# Explicit VR little endian VRs whose length field is 4 bytes after 2 reserved bytes.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


@dataclass(frozen=True)
class Source:
    path: Path
    sop_uid: str
    dataset_sha256: str


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the preamble, ``DICM`` and every
    group 0002 element (file meta is always explicit VR little endian; walked element by
    element rather than trusting the group length)."""
    if data[128:132] != b"DICM":
        raise ValueError("not a Part 10 file")
    pos = 132
    while pos + 8 <= len(data):
        group, _element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return pos


def dataset_sha256(path: Path) -> str:
    """sha256 of the data set bytes of a Part 10 file (preamble and file meta excluded)."""
    data = path.read_bytes()
    return hashlib.sha256(data[dataset_offset(data) :]).hexdigest()


def _write_instance(
    path: Path, study: str, series: str, number: int, rng: np.random.Generator
) -> str:
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = uid
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.PatientName = "CRASH^TEST"
    ds.PatientID = "CRASH0001"
    ds.StudyDate = "20240101"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.Rows = 32
    ds.Columns = 32
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = rng.integers(-1024, 2000, size=(32, 32), dtype=np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return uid


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    """N_STUDIES x PER_STUDY small CT instances, explicit VR little endian."""
    out = tmp_path_factory.mktemp("crash-src")
    rng = np.random.default_rng(2024)
    result: list[Source] = []
    for s in range(N_STUDIES):
        study, series = generate_uid(), generate_uid()
        for i in range(PER_STUDY):
            path = out / f"s{s}_{i:03d}.dcm"
            uid = _write_instance(path, study, series, i + 1, rng)
            result.append(Source(path, uid, dataset_sha256(path)))
    return result


def start_server(data_dir: Path) -> ServerProcess:
    srv = ServerProcess(data_dir, SERVER_ENV)
    try:
        return srv.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def kill9(srv: ServerProcess) -> None:
    assert srv.proc is not None
    srv.proc.kill()  # SIGKILL
    srv.proc.wait()
    srv.proc = None


def storescu_cmd(storescu: str, srv: ServerProcess, files: list[Source]) -> list[str]:
    """One association for all files, uncompressed explicit VR little endian, verbose log."""
    return [
        storescu,
        "-v",
        "-aet",
        "CRASHSCU",
        "-aec",
        srv.ae_title,
        "-xe",
        "127.0.0.1",
        str(srv.dicom_port),
        *(str(f.path) for f in files),
    ]


def acknowledged(log: str) -> list[str]:
    """Files whose store request got a Success or Warning response, from ``storescu -v``.

    The log reads ``I: Sending file: <path>`` ... ``I: Received Store Response (<status>)``
    for each file in turn (storescu waits for each response before the next request); a file
    counts only when such a response follows its own ``Sending file`` line.
    """
    acked: list[str] = []
    current: str | None = None
    for line in log.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif line.startswith("I: Received Store Response (") and current is not None:
            status = line.removeprefix("I: Received Store Response (")
            if status.startswith(("Success", "Warning")):
                acked.append(current)
            current = None
    return acked


def send_and_kill(
    storescu: str, srv: ServerProcess, files: list[Source], log_path: Path, rng: random.Random
) -> tuple[list[str], int]:
    """Send all files and SIGKILL the server after a random number of responses (up to a
    little past the end, so some kills land after the send finished) plus a random delay.

    Returns:
        The acknowledged paths and the response count the kill waited for.
    """
    target = rng.randint(0, len(files) + len(files) // 10)
    delay = rng.uniform(0.0, 0.02)  # ~0-3 more instances: lands mid-write
    with log_path.open("wb") as log:  # the log is on stderr; stdout has progress dots
        proc = subprocess.Popen(
            storescu_cmd(storescu, srv, files),
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=STORESCU_ENV,
        )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if log_path.read_bytes().count(b"Received Store Response") >= target:
                break
            time.sleep(0.002)
        time.sleep(delay)
        kill9(srv)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return acknowledged(log_path.read_text(errors="replace")), target


@dataclass(frozen=True)
class Row:
    sop_uid: str
    path: Path
    sha256: str
    size_bytes: int


def snapshot_db(data_dir: Path, scratch: Path) -> Path:
    """A copy of the index as the killed server left it (database and WAL), so that reading
    it here does not recover or checkpoint the original: the restarted server must."""
    scratch.mkdir(parents=True, exist_ok=True)
    for stale in scratch.glob("triage.db*"):
        stale.unlink()
    for name in ("triage.db", "triage.db-wal"):
        if (data_dir / name).exists():
            shutil.copyfile(data_dir / name, scratch / name)
    return scratch / "triage.db"


def index_rows(db_path: Path) -> list[Row]:
    """Every row of the instances table."""
    con = sqlite3.connect(db_path)
    try:
        rows = con.execute(
            "SELECT SOPInstanceUID, path, sha256, size_bytes FROM instances"
        ).fetchall()
    finally:
        con.close()
    return [Row(str(u), Path(p), str(h), int(n)) for u, p, h, n in rows]


def series_count_mismatches(db_path: Path) -> list[tuple[str, int, int]]:
    """Series whose ``n_instances`` differs from their number of instance rows."""
    con = sqlite3.connect(db_path)
    try:
        return con.execute(
            "SELECT s.SeriesInstanceUID, s.n_instances, COUNT(i.id) FROM series s"
            " LEFT JOIN instances i ON i.series_id = s.id GROUP BY s.id"
            " HAVING s.n_instances != COUNT(i.id)"
        ).fetchall()
    finally:
        con.close()


def check_row(row: Row, source: Source) -> None:
    """The stored file exists, parses, matches its row and its source's data set."""
    assert row.path.is_file(), f"{row.sop_uid}: indexed file {row.path} is missing"
    data = row.path.read_bytes()
    assert len(data) == row.size_bytes, f"{row.sop_uid}: size differs from the index"
    assert hashlib.sha256(data).hexdigest() == row.sha256, f"{row.sop_uid}: sha256 != index"
    ds = pydicom.dcmread(row.path)
    assert str(ds.SOPInstanceUID) == source.sop_uid
    assert len(ds.PixelData) == 32 * 32 * 2
    assert dataset_sha256(row.path) == source.dataset_sha256, f"{row.sop_uid}: data set differs"


def stored_files(data_dir: Path) -> set[Path]:
    return {p.resolve() for p in (data_dir / "dicom").rglob("*.dcm")}


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill9_during_ingest_loses_nothing_acknowledged(
    trial: int, sources: list[Source], storescu: str, tmp_path: Path
) -> None:
    rng = random.Random(trial)
    data_dir = tmp_path / "data"
    by_path = {str(s.path): s for s in sources}
    by_uid = {s.sop_uid: s for s in sources}
    acked_ever: set[str] = set()
    # Every third trial crashes a second time, during the resend after the first restart.
    crashes = 2 if trial % 3 == 2 else 1
    report: list[str] = []

    for crash in range(crashes):
        srv = start_server(data_dir)
        try:
            acked, target = send_and_kill(
                storescu, srv, sources, tmp_path / f"storescu-crash{crash}.log", rng
            )
        finally:
            srv.stop()  # a no-op after the kill; stops the server when the send failed
        assert len(acked) == len(set(acked)), "storescu acknowledged a file twice"
        acked_ever |= {by_path[p].sop_uid for p in acked}
        db = snapshot_db(data_dir, tmp_path / "db-snapshot")
        rows = index_rows(db)
        uids = [r.sop_uid for r in rows]
        assert len(uids) == len(set(uids)), "duplicate SOPInstanceUID rows after a kill"
        assert series_count_mismatches(db) == [], "series.n_instances != instance rows"
        indexed = {r.sop_uid: r for r in rows}
        lost = acked_ever - indexed.keys()
        assert not lost, f"{len(lost)} acknowledged instances are not indexed after kill -9"
        for row in rows:  # the acknowledged ones, and those committed but not yet answered
            check_row(row, by_uid[row.sop_uid])
        files = stored_files(data_dir)
        orphans = files - {r.path.resolve() for r in rows}
        parts = list((data_dir / "incoming").glob("*.part"))
        report.append(
            f"crash {crash}: kill after {target} responses -> {len(acked)} acknowledged this"
            f" send, {len(rows)} indexed, {len(orphans)} unindexed .dcm, {len(parts)} .part"
        )
        # One association sends one file at a time: at most one written, unindexed file per
        # kill (an earlier kill's is overwritten and indexed when the resend reaches it).
        assert len(orphans) <= crash + 1, f"{len(orphans)} unindexed files after {crash + 1} kills"

    srv = start_server(data_dir)
    try:
        log_path = tmp_path / "storescu-final.log"
        result = subprocess.run(
            storescu_cmd(storescu, srv, sources),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=STORESCU_ENV,
            text=True,
            timeout=300,
        )
        log_path.write_text(result.stderr)
        assert result.returncode == 0, f"resend failed:\n{result.stderr[-3000:]}"
        acked = acknowledged(result.stderr)
        assert sorted(acked) == sorted(by_path), "not every file was acknowledged on resend"
    finally:
        srv.stop()

    db = data_dir / "triage.db"
    rows = index_rows(db)
    uids = [r.sop_uid for r in rows]
    assert len(uids) == len(set(uids)), "duplicate SOPInstanceUID rows"
    assert set(uids) == set(by_uid), "index does not hold exactly the source instances"
    assert len(rows) == len(sources)
    for row in rows:
        check_row(row, by_uid[row.sop_uid])
    files = stored_files(data_dir)
    assert files == {r.path.resolve() for r in rows}, "files in the store the index lacks"
    assert len(files) == len(rows)
    assert series_count_mismatches(db) == [], "series.n_instances != instance rows"
    parts = list((data_dir / "incoming").glob("*.part"))
    report.append(f"final: {len(rows)} rows, {len(files)} files, {len(parts)} .part left")
    print(f"trial {trial}: " + "; ".join(report))
