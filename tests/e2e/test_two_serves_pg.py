"""Two ``triage serve`` processes on one PostgreSQL database and one data directory (as
behind a load balancer), each with its own DICOM and HTTP port and its embedded worker: one
study's instances, split over both and sent by two DCMTK ``storescu`` at once (one instance
to both), end as one study with every instance stored once, analysed once."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import func, select

from tests.conftest import new_postgresql_database, pydicom_file
from triage.db import Database
from triage.db.tables import InstanceRow, JobRow, SeriesRow, StudyRow
from triage.demo.run import dcmtk_env, storescu_commands
from triage.serve.launcher import ServerProcess

pytestmark = pytest.mark.e2e

ROOT = "1.2.826.0.1.3680043.8.498.4243"
PER_SERIES = 8


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (dropped after); skips without a server."""
    with new_postgresql_database() as url:
        yield url


def write_study(folder: Path) -> list[list[Path]]:
    """Two series of small chest CT instances (no installed model reads a chest CT, so the
    analysis needs no weights); the files by series, in instance order."""
    folder.mkdir(parents=True)
    template = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    by_series: list[list[Path]] = []
    for series in (1, 2):
        paths = []
        for number in range(PER_SERIES):
            ds = template.copy()
            ds.StudyInstanceUID = ROOT
            ds.SeriesInstanceUID = f"{ROOT}.{series}"
            ds.SOPInstanceUID = f"{ROOT}.{series}.{number}"
            ds.SeriesNumber = series
            ds.InstanceNumber = number + 1
            ds.BodyPartExamined = "CHEST"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            path = folder / f"s{series}-{number}.dcm"
            path.write_bytes(buf.getvalue())
            paths.append(path)
        by_series.append(paths)
    return by_series


def storescu_at(storescu: str, server: ServerProcess, paths: list[Path]) -> list[str]:
    (cmd,) = storescu_commands(
        storescu,
        paths,
        host="127.0.0.1",
        port=server.dicom_port,
        called_ae=server.ae_title,
        calling_ae="SPLITSCU",
    )
    return cmd


def test_two_serves_one_database_one_study(pg_url: str, tmp_path: Path, storescu: str) -> None:
    data_dir = tmp_path / "data"
    by_series = write_study(tmp_path / "in")
    # Both senders start with the first instances of both series (the study and each
    # series are new at both servers at once); the first instance goes to both.
    to_a = [p for i in range(0, PER_SERIES, 2) for p in (by_series[0][i], by_series[1][i])]
    to_b = [by_series[0][0]] + [
        p for i in range(1, PER_SERIES, 2) for p in (by_series[0][i], by_series[1][i])
    ]
    env = {
        "TRIAGE_DATABASE_URL": pg_url,
        "TRIAGE_SERIES_QUIET_SECONDS": "1",
        "TRIAGE_DEVICE": "cpu",
    }
    # The schema is made once before both start (two first starts on an empty database
    # would both create it); the admin account is made through the first only.
    db = Database(pg_url)
    db.migrate()
    a = ServerProcess(data_dir, env)
    b = ServerProcess(data_dir, env, sign_in=False)
    b.log_path = data_dir / "serve-b.log"  # the data directory is shared, not the log
    try:
        with ThreadPoolExecutor(2) as pool:
            starts = [pool.submit(server.start) for server in (a, b)]
        problems = [str(f.exception()) for f in starts if f.exception() is not None]
        if problems:
            pytest.fail("\n".join(problems))
        senders = [
            subprocess.Popen(
                storescu_at(storescu, server, paths),
                env=dcmtk_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for server, paths in ((a, to_a), (b, to_b))
        ]
        for sender in senders:
            out, _ = sender.communicate(timeout=60)
            assert sender.returncode == 0, out
            assert "Failed" not in out and "Error" not in out, out

        study = wait_for_analysis(db, deadline_s=30, logs=lambda: a.log() + b.log())
        assert study.ai_status == "no_applicable_model", study.ai_error
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(StudyRow)) == 1
            series = s.scalars(select(SeriesRow).order_by(SeriesRow.SeriesInstanceUID)).all()
            assert [se.SeriesInstanceUID for se in series] == [f"{ROOT}.1", f"{ROOT}.2"]
            assert [se.n_instances for se in series] == [PER_SERIES, PER_SERIES]
            rows = s.scalars(select(InstanceRow)).all()
            jobs = s.scalars(select(JobRow.state)).all()
        assert sorted(r.SOPInstanceUID for r in rows) == sorted(
            f"{ROOT}.{series}.{number}" for series in (1, 2) for number in range(PER_SERIES)
        )
        for row in rows:
            stored = Path(row.path)
            assert stored.is_relative_to(data_dir / "dicom") and stored.is_file()
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
            assert pydicom.dcmread(stored).SOPInstanceUID == row.SOPInstanceUID
        assert set((data_dir / "dicom").rglob("*.dcm")) == {Path(r.path) for r in rows}
        assert not list((data_dir / "incoming").glob("*.part"))
        assert "done" in jobs and not {"running", "queued"} & set(jobs)
        # Both servers list the one study with its analysis (one token: one database).
        for server in (a, b):
            listed = httpx.get(f"{server.http_url}/api/worklist", headers=a.headers, timeout=10)
            assert listed.status_code == 200
            (item,) = listed.json()["items"]
            assert item["StudyInstanceUID"] == ROOT
            assert item["ai_status"] == "no_applicable_model"
    finally:
        for server in (a, b):
            server.stop()
        db.dispose()


def wait_for_analysis(db: Database, *, deadline_s: float, logs: Callable[[], str]) -> StudyRow:
    """The study once its series are complete and its analysis recorded (polled)."""
    deadline = time.monotonic() + deadline_s
    while True:
        with db.session() as s:
            study = s.scalar(select(StudyRow).where(StudyRow.StudyInstanceUID == ROOT))
            states = set(s.scalars(select(SeriesRow.state)))
            jobs = set(s.scalars(select(JobRow.state)))
        if (
            study is not None
            and study.ai_status != "pending"
            and states == {"complete"}
            and jobs
            and jobs <= {"done", "failed"}
        ):
            return study
        if time.monotonic() > deadline:
            pytest.fail(
                f"not analysed in {deadline_s} s: study {study and study.ai_status},"
                f" series {states}, jobs {jobs}\n{logs()}"
            )
        time.sleep(0.25)
