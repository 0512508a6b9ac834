"""Analysis in ``triage worker`` processes beside ``triage serve`` processes that only
receive (``TRIAGE_EMBEDDED_WORKER=false``), all real processes, studies sent with DCMTK
storescu.

The model is :mod:`tests.jobs.gated_model`: each analysis waits at a gate the test opens,
so a worker is stopped or killed while it is surely in the middle of one.

* PostgreSQL: two serves (their own HTTP and DICOM ports, one data folder) and three
  workers; a worker killed with SIGKILL mid-analysis; every study analysed and recorded
  exactly once, the dead worker's job finished by another after its lease lapsed.
* SQLite: one serve and two workers on one database file; a worker stopped with SIGTERM
  gives its study back to the queue and the other worker analyses it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import func, select

from tests.conftest import REPO_ROOT, new_postgresql_database
from tests.e2e.conftest import send
from tests.jobs.gated_model import FINDING, NAME, TRIAGE, entered, open_gate, write_spec
from triage.db import Database
from triage.db.tables import FindingRow, JobRow, StudyRow
from triage.demo.xray import write_demo_radiograph
from triage.serve.launcher import ServerProcess, stop_child

pytestmark = pytest.mark.e2e

LEASE_SECONDS = 4
DEADLINE_S = 120.0
START_TIMEOUT_S = 180.0  # processes start slowly on a busy two-core machine


def settings_env(data_dir: Path, specs: Path, database_url: str | None) -> dict[str, str]:
    """What serves and workers share: the data folder, the database, the model, timings."""
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_MODEL_SPECS_DIR": str(specs),
        "TRIAGE_MODELS": f'["{NAME}"]',
        "TRIAGE_DEVICE": "cpu",
        "TRIAGE_SERIES_QUIET_SECONDS": "0.5",
        "TRIAGE_WORKER_POLL_SECONDS": "0.1",
        "TRIAGE_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
        "TRIAGE_EMBEDDED_WORKER": "false",
    }
    if database_url is not None:
        env["TRIAGE_DATABASE_URL"] = database_url
    return env


class WorkerProcess:
    """A ``triage worker`` child (the gated model's kind registered), logging to a file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.log_path = log_dir / f"worker-{name}.log"
        child_env = {**os.environ, **env}
        if "TRIAGE_DATABASE_URL" not in env:
            child_env.pop("TRIAGE_DATABASE_URL", None)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*TRIAGE, "worker", "--grace", "0"],
                cwd=REPO_ROOT,
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.worker_id = f"{socket.gethostname()}:{self.proc.pid}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_child(self.proc, grace_s=15)


def wait_for(what: str, done: Callable[[], bool], logs: Callable[[], str]) -> None:
    """Poll ``done`` until it holds; fail with the processes' logs after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{logs()[-6000:]}")
        time.sleep(0.1)


def radiographs(out: Path, n: int) -> dict[str, Path]:
    """``n`` one-image chest radiograph studies: StudyInstanceUID -> file."""
    studies = {}
    for i in range(n):
        (path,) = write_demo_radiograph(out / f"study{i}", patient_id=f"WORKERS-{i}")
        studies[str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)] = path
    return studies


def jobs_by_study(db: Database) -> dict[str, list[tuple[str, int, str | None]]]:
    """StudyInstanceUID -> its jobs as (state, attempts, worker_id), oldest first."""
    with db.session() as s:
        rows = s.execute(
            select(StudyRow.StudyInstanceUID, JobRow.state, JobRow.attempts, JobRow.worker_id)
            .join(JobRow, JobRow.study_id == StudyRow.id)
            .order_by(JobRow.id)
        ).all()
    out: dict[str, list[tuple[str, int, str | None]]] = {}
    for uid, state, attempts, worker in rows:
        out.setdefault(uid, []).append((state, attempts, worker))
    return out


def all_done(db: Database, uids: set[str]) -> bool:
    jobs = jobs_by_study(db)
    return set(jobs) == uids and all(any(j[0] == "done" for j in js) for js in jobs.values())


def running_job(db: Database, worker_id: str) -> tuple[int, str] | None:
    """(job id, StudyInstanceUID) of the job ``worker_id`` runs, or None."""
    with db.session() as s:
        row = s.execute(
            select(JobRow.id, StudyRow.StudyInstanceUID)
            .join(StudyRow, StudyRow.id == JobRow.study_id)
            .where(JobRow.state == "running", JobRow.worker_id == worker_id)
        ).first()
    return None if row is None else (int(row[0]), str(row[1]))


def check_analysed_once(db: Database, uids: set[str], workers: list[WorkerProcess]) -> None:
    """One done job per study, its finding recorded once, one recording in the logs."""
    jobs = jobs_by_study(db)
    assert set(jobs) == uids
    for uid, js in jobs.items():
        assert [j[0] for j in js] == ["done"], (uid, js)
    with db.session() as s:
        findings = Counter(
            s.execute(
                select(StudyRow.StudyInstanceUID)
                .join(FindingRow, FindingRow.study_id == StudyRow.id)
                .where(FindingRow.finding == FINDING)
            ).scalars()
        )
        statuses = set(s.scalars(select(StudyRow.ai_status)))
        study_ids = set(s.scalars(select(StudyRow.id)))
    assert findings == dict.fromkeys(uids, 1)
    assert statuses == {"ok"}
    # "study #N: ai_status=ok" is logged once a worker has recorded the analysis.
    recorded = Counter(
        int(m) for w in workers for m in re.findall(r"study #(\d+): ai_status=", w.log())
    )
    assert recorded == dict.fromkeys(study_ids, 1)


def external_worker_detail(server: ServerProcess) -> str:
    """The worker component of the serve's /api/health (200: every component healthy)."""
    health = httpx.get(f"{server.http_url}/api/health", timeout=30)
    assert health.status_code == 200, health.text
    detail: str = health.json()["components"]["worker"]["detail"]
    return detail


def serve(data_dir: Path, env: dict[str, str], name: str) -> ServerProcess:
    srv = ServerProcess(data_dir, env, sign_in=False)
    srv.log_path = data_dir.parent / f"serve-{name}.log"  # two serves share the data folder
    return srv


def test_two_serves_and_three_workers_on_postgresql(tmp_path: Path, storescu: str) -> None:
    with new_postgresql_database() as url:
        data, gate = tmp_path / "shared-data", tmp_path / "gate"
        env = settings_env(data, write_spec(tmp_path / "specs", gate), url)
        serves = [serve(data, env, "a"), serve(data, env, "b")]
        workers: list[WorkerProcess] = []
        db = Database(url)

        def logs() -> str:
            return "\n".join(w.log() for w in workers) + "\n".join(s.log() for s in serves)

        try:
            serves[0].start(START_TIMEOUT_S)  # first and alone: it creates the schema
            workers = [WorkerProcess(str(i), env, tmp_path) for i in range(3)]
            serves[1].start(START_TIMEOUT_S)
            studies = radiographs(tmp_path / "studies", 6)
            paths = list(studies.values())
            send(storescu, serves[0], paths[:3])
            send(storescu, serves[1], paths[3:])
            assert "external" in external_worker_detail(serves[1])

            # Every worker is in the middle of an analysis (the gate is closed).
            wait_for("three workers at the gate", lambda: len(set(entered(gate))) == 3, logs)
            victim = next(w for w in workers if w.proc.pid in entered(gate))
            wait_for(
                "the victim's job", lambda: running_job(db, victim.worker_id) is not None, logs
            )
            victim_job = running_job(db, victim.worker_id)
            assert victim_job is not None
            victim.proc.send_signal(signal.SIGKILL)
            assert victim.proc.wait(30) == -signal.SIGKILL
            open_gate(gate)

            wait_for("every study analysed", lambda: all_done(db, set(studies)), logs)
            check_analysed_once(db, set(studies), workers)
            jobs = jobs_by_study(db)
            ((_, attempts, finished_by),) = jobs[victim_job[1]]
            # Its lease lapsed; another worker claimed it again and finished it.
            assert attempts == 2 and finished_by not in (None, victim.worker_id)
            others = [j for uid, js in jobs.items() if uid != victim_job[1] for j in js]
            assert {attempts for _, attempts, _ in others} == {1}
            assert victim.worker_id not in {w for _, _, w in others}
            with db.session() as s:
                assert s.scalar(select(func.count()).select_from(JobRow)) == len(studies)
        finally:
            for w in workers:
                w.stop()
            for srv in serves:
                srv.stop()
            db.dispose()


def test_a_serve_and_two_workers_on_sqlite(tmp_path: Path, storescu: str) -> None:
    data, gate = tmp_path / "data", tmp_path / "gate"
    env = settings_env(data, write_spec(tmp_path / "specs", gate), None)
    srv = serve(data, env, "a")
    workers: list[WorkerProcess] = []

    def logs() -> str:
        return "\n".join(w.log() for w in workers) + srv.log()

    srv.start(START_TIMEOUT_S)  # creates the database the workers open
    db = Database(srv.database_url)
    try:
        workers = [WorkerProcess(name, env, tmp_path) for name in ("a", "b")]
        studies = radiographs(tmp_path / "studies", 2)
        send(storescu, srv, list(studies.values()))
        wait_for("both workers at the gate", lambda: len(set(entered(gate))) == 2, logs)
        stopped = workers[0]
        job = running_job(db, stopped.worker_id)
        assert job is not None
        # SIGTERM (with --grace 0): the study goes back to the queue at once, uncounted.
        stopped.proc.send_signal(signal.SIGTERM)
        assert stopped.proc.wait(60) == 0, stopped.log()
        assert jobs_by_study(db)[job[1]] == [("queued", 0, None)]
        assert "given back to the queue" in stopped.log()
        open_gate(gate)
        wait_for("every study analysed", lambda: all_done(db, set(studies)), logs)
        check_analysed_once(db, set(studies), workers)
        jobs = jobs_by_study(db)
        assert {uid: js[0][1:] for uid, js in jobs.items()} == dict.fromkeys(
            studies, (1, workers[1].worker_id)
        )
        assert "external" in external_worker_detail(srv)
    finally:
        for w in workers:
            w.stop()
        srv.stop()
        db.dispose()
