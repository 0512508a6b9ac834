"""The outbox on a real database (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import inspect, update

from triage.db import Database
from triage.db.tables import EventRow
from triage.events import outbox


def test_emit_then_read_in_order(db: Database) -> None:
    assert outbox.latest_id(db) == 0
    with db.session() as s:
        outbox.emit(s, outbox.CRITICAL_FINDING, "1.2.3", {"finding": "x"}, webhook=True)
        outbox.emit(s, outbox.WORKLIST_CHANGED, None, {"changes": []}, webhook=False)
    events = outbox.events_after(db, 0)
    assert [e.kind for e in events] == ["critical_finding", "worklist_changed"]
    first, second = events
    assert first.StudyInstanceUID == "1.2.3" and first.payload == {"finding": "x"}
    assert first.created_at.tzinfo is not None
    assert outbox.latest_id(db) == second.id > first.id
    assert outbox.events_after(db, first.id) == [second]
    assert outbox.events_after(db, 0, kinds=["worklist_changed"]) == [second]
    with db.session() as s:
        rows = {r.kind: r for r in s.query(EventRow)}
        assert rows["critical_finding"].webhook_state == "pending"
        assert rows["critical_finding"].webhook_attempts == 0
        assert rows["worklist_changed"].webhook_state is None
    # The SSE wire format: id, event, one line of JSON data, a blank line.
    lines = first.sse().split("\n")
    assert lines[:2] == [f"id: {first.id}", "event: critical_finding"]
    assert lines[3:] == ["", ""]
    data = json.loads(lines[2].removeprefix("data: "))
    assert data == first.to_json()
    assert set(data) == {"id", "kind", "created_at", "StudyInstanceUID", "payload"}


def test_nothing_is_visible_before_the_producer_commits(db: Database) -> None:
    class Boom(Exception):
        pass

    try:
        with db.session() as s:
            outbox.emit(s, outbox.TASK, "1.2.3", {}, webhook=False)
            raise Boom
    except Boom:
        pass
    assert outbox.events_after(db, 0) == []


def test_cursor_waits_for_a_gap_then_passes_it(db: Database) -> None:
    now = datetime.now(UTC)
    with db.session() as s:
        for i in range(3):
            outbox.emit(s, outbox.TASK, f"1.{i}", {"i": i}, webhook=False, now=now)
    ids = [e.id for e in outbox.events_after(db, 0)]
    # Pretend the middle one is not committed yet: delete it (a hole in the ids).
    with db.session() as s:
        s.query(EventRow).filter(EventRow.id == ids[1]).delete()
    cursor = outbox.EventCursor(0, gap_grace=timedelta(seconds=2))
    assert [e.id for e in cursor.poll(db, now=now)] == [ids[0]]
    assert cursor.poll(db, now=now) == []  # still within the grace period
    later = now + timedelta(seconds=3)
    assert [e.id for e in cursor.poll(db, now=later)] == [ids[2]]
    filtered = outbox.EventCursor(0, kinds={"worklist_changed"})
    assert filtered.poll(db, now=later) == [] and filtered.last_id == ids[2]


def test_prune_keeps_what_the_webhook_still_owes(db: Database) -> None:
    old = datetime.now(UTC) - timedelta(days=30)
    with db.session() as s:
        outbox.emit(s, outbox.CRITICAL_FINDING, "1.1", {}, webhook=True, now=old)
        outbox.emit(s, outbox.CRITICAL_FINDING, "1.2", {}, webhook=True, now=old)
        outbox.emit(s, outbox.WORKLIST_CHANGED, None, {}, webhook=False, now=old)
        outbox.emit(s, outbox.WORKLIST_CHANGED, None, {}, webhook=False)
    with db.session() as s:
        s.execute(
            update(EventRow)
            .where(EventRow.StudyInstanceUID == "1.2")
            .values(webhook_state="delivered")
        )
    assert outbox.prune(db, datetime.now(UTC) - timedelta(days=7)) == 2
    left = outbox.events_after(db, 0)
    assert [(e.kind, e.StudyInstanceUID) for e in left] == [
        ("critical_finding", "1.1"),
        ("worklist_changed", None),
    ]
    # Ids are never reused after pruning (SQLite AUTOINCREMENT; sequences on PostgreSQL).
    top = outbox.latest_id(db)
    outbox.prune(db, datetime.now(UTC) + timedelta(days=1))
    with db.session() as s:
        row = outbox.emit(s, outbox.TASK, None, {}, webhook=False)
        s.flush()
        assert row.id > top


def test_migration_creates_the_table_with_its_indexes(db: Database) -> None:
    insp = inspect(db.engine)
    columns = {c["name"] for c in insp.get_columns("events")}
    assert columns == {
        "id",
        "created_at",
        "kind",
        "StudyInstanceUID",
        "payload",
        "webhook_state",
        "webhook_attempts",
        "webhook_next_at",
        "webhook_error",
    }
    indexed = {tuple(ix["column_names"]) for ix in insp.get_indexes("events")}
    assert {("kind",), ("webhook_state",)} <= indexed
