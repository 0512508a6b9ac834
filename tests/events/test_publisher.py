"""The publisher: worklist and Task changes become events (real database, both backends)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from tests.studies import add_study
from triage.db import Database
from triage.db.tables import EventRow, FindingRow, StudyRow
from triage.events import outbox
from triage.events.publisher import Publisher
from triage.worklist import queue


def drain(db: Database, cursor: outbox.EventCursor) -> list[outbox.Event]:
    return cursor.poll(db, now=datetime.now(UTC) + timedelta(minutes=1))


def changes(event: outbox.Event) -> dict[str, dict[str, Any]]:
    return {c["StudyInstanceUID"]: c for c in event.payload["changes"]}


def add_flagged_finding(db: Database, uid: str) -> None:
    with db.session() as s:
        study_id = s.scalar(select(StudyRow.id).where(StudyRow.StudyInstanceUID == uid))
        s.add(
            FindingRow(
                study_id=study_id,
                finding="intracranial_haemorrhage",
                flag=1,
                score=0.9,
                model_name="blast-ct-v1",
                model_version="1",
                payload={
                    "finding": "intracranial_haemorrhage",
                    "flag": True,
                    "score": 0.9,
                    "volumes_ml": {"IPH": 3.0},
                    "model": {"name": "blast-ct-v1", "version": "1"},
                },
                created_at=datetime.now(UTC),
            )
        )


def test_publisher_emits_claims_findings_and_completion(db: Database) -> None:
    add_study(db, "1.1", 6)
    add_study(db, "1.2", 5)
    cursor = outbox.EventCursor(0)
    pub = Publisher(db, webhook_kinds={"task"})

    # First round: the snapshot, announced as one resync event without changes.
    assert pub.tick() == 1
    (resync,) = drain(db, cursor)
    assert resync.kind == "worklist_changed"
    assert resync.payload["resync"] is True and resync.payload["changes"] == []
    assert resync.payload["count"] == 2 and resync.payload["version"] == 1
    assert pub.tick() == 0  # nothing changed
    assert drain(db, cursor) == []

    # A claim: the study's read state changes, its Task goes in-progress.
    queue.claim(db, "1.2", "alice")
    assert pub.tick() == 2
    wl, task = drain(db, cursor)
    assert wl.kind == "worklist_changed" and wl.payload["version"] == 2
    assert wl.payload["resync"] is False
    (change,) = wl.payload["changes"]
    assert change["StudyInstanceUID"] == "1.2" and change["change"] == "updated"
    assert change["read_state"] == "claimed" and change["claimed_by"] == "alice"
    assert task.kind == "task" and task.StudyInstanceUID == "1.2"
    assert task.payload["resourceType"] == "Task"
    assert task.payload["status"] == "in-progress"
    assert task.payload["owner"] == {"display": "alice"}

    # A flagged finding arrives for 1.2: it goes critical and first. 1.1 moves down only
    # because 1.2 went before it: not a change of 1.1 (its rank is re-read with the page).
    add_flagged_finding(db, "1.2")
    assert pub.tick() == 2
    wl, task = drain(db, cursor)
    moved = changes(wl)
    assert moved["1.2"]["priority_class"] == "critical" and moved["1.2"]["rank"] == 1
    assert moved["1.2"]["tier"] == "critical"
    assert list(moved) == ["1.2"]
    assert task.StudyInstanceUID == "1.2" and task.payload["priority"] == "stat"
    assert task.payload["extension"][0]["extension"][0]["valueCode"] == ("intracranial_haemorrhage")

    # Read: the study leaves the worklist as "completed", its Task is completed.
    queue.complete(db, "1.2", "alice")
    pub.tick()
    wl, *tasks = drain(db, cursor)
    assert changes(wl)["1.2"]["change"] == "completed"
    assert changes(wl)["1.2"]["rank"] is None
    assert "1.1" not in changes(wl)
    done = {t.StudyInstanceUID: t.payload for t in tasks}["1.2"]
    assert done["status"] == "completed" and done["owner"] == {"display": "alice"}

    # A new study appears.
    add_study(db, "1.3", 4, priority="STAT")
    pub.tick()
    wl, *tasks = drain(db, cursor)
    assert changes(wl)["1.3"]["change"] == "added"
    assert changes(wl)["1.3"]["priority_class"] == "stat"

    # Only task events were queued for the webhook (webhook_kinds={"task"}).
    with db.session() as s:
        states = {(r.kind, r.webhook_state) for r in s.scalars(select(EventRow))}
    assert states == {("worklist_changed", None), ("task", "pending")}


def test_time_alone_changes_the_order(db: Database) -> None:
    """A routine study passing its deadline becomes overdue: an update and an asap Task."""
    arrived = add_study(db, "2.1", 5)
    pub = Publisher(db)
    cursor = outbox.EventCursor(0)
    pub.tick(now=arrived + timedelta(minutes=10))
    drain(db, cursor)
    pub.tick(now=arrived + timedelta(hours=25))
    wl, task = drain(db, cursor)
    assert changes(wl)["2.1"]["tier"] == "overdue"
    assert task.payload["priority"] == "asap"


def test_publisher_thread_runs_and_stops(db: Database) -> None:
    add_study(db, "3.1")
    pub = Publisher(db, interval_seconds=0.05)
    pub.start()

    def wait_for(kind: str) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(e.kind == kind for e in outbox.events_after(db, 0)):
                return True
            time.sleep(0.02)
        return False

    try:
        assert wait_for("worklist_changed")  # the first round (resync)
        queue.claim(db, "3.1", "bob")
        assert wait_for("task")
    finally:
        pub.stop()
    assert pub._thread is None


def test_one_publisher_per_database_and_another_takes_over(db: Database) -> None:
    """Two serve processes on one PostgreSQL: one publishes (the advisory lock); when it
    stops, the other takes over with a resync. (On SQLite each publishes: one serve.)"""
    if db.engine.dialect.name != "postgresql":
        return
    add_study(db, "4.1", 5)
    other = Database(db.engine.url.render_as_string(hide_password=False))
    first, second = Publisher(db), Publisher(other)
    cursor = outbox.EventCursor(0)
    try:
        assert first.tick() == 1  # the elected one: its resync
        assert second.tick() == 0  # not elected: nothing, whatever changed
        queue.claim(db, "4.1", "alice")
        assert second.tick() == 0
        assert first.tick() == 2  # the change and its Task, once
        kinds = [e.kind for e in drain(db, cursor)]
        assert kinds == ["worklist_changed", "worklist_changed", "task"]
        first.stop()  # its connection, and the lock, go
        assert second.tick() == 1
        (resync,) = drain(db, cursor)
        assert resync.payload["resync"] is True
    finally:
        first.stop()
        second.stop()
        other.dispose()
