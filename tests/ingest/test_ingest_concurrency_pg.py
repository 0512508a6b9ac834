"""Several ingest processes on one PostgreSQL database and one storage directory.

Each :class:`~triage.ingest.store.Ingestor` runs in its own process (``spawn``: no
in-process lock is shared), and a barrier lines them up before every step, so that the
first instances of a new study and of its series, the same instance, or different copies
under one SOPInstanceUID reach every process at the same moment. The guarantees are those
of one process: one studies row per StudyInstanceUID, one series row per
SeriesInstanceUID, every instance indexed once with its file on disk, every sender told
success, and the duplicate policy's answer for copies of one instance.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select, update

from tests.conftest import new_postgresql_database, pydicom_file
from triage.db import Database
from triage.db.tables import InstanceRow, QuarantineRow, SeriesRow, StudyRow
from triage.domain import AIStatus, SeriesState
from triage.ingest.store import DuplicatePolicy, Ingestor, StoreStatus

PROCESSES = 4
ROOT = "1.2.826.0.1.3680043.8.498.4242"


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (dropped after); skips without a server."""
    with new_postgresql_database() as url:
        db = Database(url)
        db.migrate()
        db.dispose()
        yield url


def instance(study: int, series: int, number: int, **changes: Any) -> bytes:
    """A small CT instance (pydicom's CT_small) of study ``study``, series ``series``."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID = f"{ROOT}.{study}"
    ds.SeriesInstanceUID = f"{ROOT}.{study}.{series}"
    ds.SOPInstanceUID = f"{ROOT}.{study}.{series}.{number}"
    ds.InstanceNumber = number
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass(frozen=True)
class Dirs:
    store: Path
    incoming: Path
    quarantine: Path

    @classmethod
    def under(cls, root: Path) -> Dirs:
        dirs = cls(root / "dicom", root / "incoming", root / "quarantine")
        for d in (dirs.store, dirs.incoming, dirs.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        return dirs


Result = tuple[str, int, bool, str]
"""(SOPInstanceUID, DICOM status, duplicate, reason) of one ingest."""


def ingest_process(
    index: int,
    url: str,
    dirs: Dirs,
    steps: list[bytes],
    policy: str,
    barrier: Any,
    results: Any,
) -> None:
    """One ingest process: its own engine and Ingestor; waits at the barrier before each
    step so that every process ingests its step's instance at the same moment."""
    db = Database(url)
    ingestor = Ingestor(
        db,
        dirs.store,
        dirs.incoming,
        dirs.quarantine,
        min_free_bytes=0,
        duplicate_policy=DuplicatePolicy(policy),
    )
    out: list[Result] = []
    try:
        for data in steps:
            barrier.wait(timeout=60)
            outcome = ingestor.ingest(data, source=f"proc{index}")
            out.append(
                (str(outcome.SOPInstanceUID), outcome.status, outcome.duplicate, outcome.reason)
            )
    finally:
        results.put((index, out))
        db.dispose()


def run_processes(
    url: str, dirs: Dirs, plan: list[list[bytes]], policy: DuplicatePolicy
) -> list[Result]:
    """Run ``plan[p]`` (one instance per step) in process ``p``, all in step; every result."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(plan))
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=ingest_process,
            args=(i, url, dirs, steps, policy.value, barrier, results),
        )
        for i, steps in enumerate(plan)
    ]
    for p in procs:
        p.start()
    collected: dict[int, list[Result]] = {}
    try:
        while len(collected) < len(procs):
            try:
                i, out = results.get(timeout=5)
                collected[i] = out
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"an ingest process died: exit codes {[p.exitcode for p in dead]}"
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert all(len(collected[i]) == len(plan[i]) for i in range(len(plan)))
    return [r for i in sorted(collected) for r in collected[i]]


def check_store(db: Database, dirs: Dirs) -> dict[str, InstanceRow]:
    """Every instance indexed once, its file on disk with the indexed hash; no file in the
    store that no row points at; no temporary file left. Returns the rows by UID."""
    with db.session() as s:
        rows = s.scalars(select(InstanceRow)).all()
        studies = s.scalars(select(StudyRow.StudyInstanceUID)).all()
        series = s.scalars(select(SeriesRow)).all()
        counts = Counter(r.series_id for r in rows)
        for se in series:
            assert se.n_instances == counts[se.id], se.SeriesInstanceUID
    assert len(studies) == len(set(studies))
    assert len(series) == len({se.SeriesInstanceUID for se in series})
    by_uid = {r.SOPInstanceUID: r for r in rows}
    assert len(by_uid) == len(rows)
    for r in rows:
        path = Path(r.path)
        assert path.is_file(), f"indexed file missing: {path}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r.sha256
    assert {Path(r.path) for r in rows} == set(dirs.store.rglob("*.dcm")), "orphan files"
    assert not list(dirs.incoming.glob("*.part"))
    return by_uid


def test_new_studies_and_series_at_several_processes_at_once(pg_url: str, tmp_path: Path) -> None:
    """Per step, every process gets an instance of one new series (of a new study for the
    first series of a study), then all get the same instance, then different data sets
    under one SOPInstanceUID; afterwards late instances of complete series and a new series
    of each analysed study arrive at every process at once."""
    dirs = Dirs.under(tmp_path)
    plan: list[list[bytes]] = [[] for _ in range(PROCESSES)]
    expected: set[str] = set()
    for study in range(3):
        for series in range(2):
            for p in range(PROCESSES):
                plan[p].append(instance(study, series, p))
                expected.add(f"{ROOT}.{study}.{series}.{p}")
            same = instance(study, series, 99)
            for p in range(PROCESSES):
                plan[p].append(same)
            expected.add(f"{ROOT}.{study}.{series}.99")
    for p in range(PROCESSES):  # different data sets under one new SOPInstanceUID
        plan[p].append(instance(0, 0, 77, ImageComments=f"copy {p}"))
    expected.add(f"{ROOT}.0.0.77")

    results = run_processes(pg_url, dirs, plan, DuplicatePolicy.KEEP_FIRST)

    failures = [r for r in results if r[1] != StoreStatus.success]
    assert not failures, f"not success: {failures}"
    firsts = Counter(r[0] for r in results if not r[2])
    assert firsts == Counter(expected), "each instance stored once, the others duplicates"
    db = Database(pg_url)
    try:
        rows = check_store(db, dirs)
        assert set(rows) == expected
        with db.session() as s:
            assert len(s.scalars(select(StudyRow)).all()) == 3
            assert len(s.scalars(select(SeriesRow)).all()) == 6
            quarantined = s.scalars(select(QuarantineRow.sha256)).all()
        copies = {
            hashlib.sha256(instance(0, 0, 77, ImageComments=f"copy {p}")).hexdigest()
            for p in range(PROCESSES)
        }
        kept = rows[f"{ROOT}.0.0.77"].sha256
        assert kept in copies
        assert sorted(quarantined) == sorted(copies - {kept}), "keep_first: the others kept"

        # The studies were assembled and analysed; late instances reopen them.
        with db.session() as s:
            s.execute(update(SeriesRow).values(state=SeriesState.complete))
            s.execute(update(StudyRow).values(ai_status=AIStatus.ok))
        late: list[list[bytes]] = [[] for _ in range(PROCESSES)]
        for study in range(3):
            for p in range(PROCESSES):
                late[p].append(instance(study, 0, 10 + p))  # an existing series
                late[p].append(instance(study, 5, p))  # a new series of an analysed study
                expected |= {f"{ROOT}.{study}.0.{10 + p}", f"{ROOT}.{study}.5.{p}"}
        results = run_processes(pg_url, dirs, late, DuplicatePolicy.KEEP_FIRST)
        assert all(r[1] == StoreStatus.success and not r[2] for r in results), results
        rows = check_store(db, dirs)
        assert set(rows) == expected
        with db.session() as s:
            assert set(s.scalars(select(StudyRow.ai_status))) == {AIStatus.pending}
            states = {se.SeriesInstanceUID: se.state for se in s.scalars(select(SeriesRow))}
        assert len(states) == 9
        for study in range(3):
            assert states[f"{ROOT}.{study}.0"] == SeriesState.receiving
            assert states[f"{ROOT}.{study}.1"] == SeriesState.complete
            assert states[f"{ROOT}.{study}.5"] == SeriesState.receiving
    finally:
        db.dispose()


def test_replace_policy_at_several_processes_at_once(pg_url: str, tmp_path: Path) -> None:
    """A stored instance, then corrected copies at every process at once under the replace
    policy, two of them identical: one copy is indexed, its file is on disk, no other copy
    is left in the store, and the series is receiving again."""
    dirs = Dirs.under(tmp_path)
    first = instance(1, 1, 1)
    corrected = [instance(1, 1, 1, ImageComments=f"fix {p % 3}") for p in range(PROCESSES)]
    plan = [[first if p == 0 else instance(1, 1, 100 + p)] for p in range(PROCESSES)]
    for p in range(PROCESSES):
        plan[p].append(corrected[p])
        plan[p].append(first)  # and the first copy again, at every process

    results = run_processes(pg_url, dirs, plan, DuplicatePolicy.REPLACE)
    assert all(r[1] == StoreStatus.success for r in results), results
    db = Database(pg_url)
    try:
        rows = check_store(db, dirs)
        assert len(rows) == PROCESSES
        assert rows[f"{ROOT}.1.1.1"].sha256 in {
            hashlib.sha256(c).hexdigest() for c in [first, *corrected]
        }
    finally:
        db.dispose()
