"""The worklist's order kept in the database: the same order as the pure policy, updated by
any writer's change (triggers) and by time alone, paged, filtered and claimed from the
index, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update

from tests.studies import add_study
from triage.db import Database
from triage.db.tables import RANK_STALE, FindingRow, StudyRow
from triage.worklist import queue, rank
from triage.worklist.priority import PolicyConfig, rank_studies
from triage.worklist.service import context_of, worklist


def _flag(db: Database, uid: str, *, volume: float = 3.0, severity: str | None = None) -> None:
    payload = {
        "finding": "intracranial_haemorrhage",
        "flag": True,
        "score": 0.9,
        "volumes_ml": {"IPH": volume},
        "model": {"name": "blast-ct-v1", "version": "1"},
    }
    if severity:
        payload["severity"] = severity
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
                payload=payload,
                created_at=datetime.now(UTC),
            )
        )


def _uids(doc: dict) -> list[str]:
    return [item["StudyInstanceUID"] for item in doc["items"]]


def _policy_order(db: Database, now: datetime) -> list[str]:
    """The order the pure policy gives, from the rows as they are."""
    with db.session() as s:
        from sqlalchemy.orm import selectinload

        studies = s.scalars(
            select(StudyRow)
            .where(StudyRow.read_state != "completed")
            .options(selectinload(StudyRow.findings))
        ).all()
        contexts = [context_of(st, now) for st in studies]
    return [p.StudyInstanceUID for p in rank_studies(contexts, now)]


def test_kept_order_is_the_policys_order(db: Database) -> None:
    rng = random.Random(7)
    now = datetime.now(UTC)
    for i in range(60):
        priority = rng.choice([None, None, "STAT", "HIGH", "ROUTINE"])
        add_study(db, f"9.{i}", rng.uniform(0, 180), priority=priority, now=now)
    for i in rng.sample(range(60), 6):
        _flag(db, f"9.{i}", severity=rng.choice([None, "high"]))
    doc = worklist(db, now=now)
    assert _uids(doc) == _policy_order(db, now)
    assert [item["rank"] for item in doc["items"]] == list(range(1, 61))
    assert doc["total"] == 60 and doc["next_offset"] is None


def test_pages_cover_the_list_once_with_the_total(db: Database) -> None:
    now = datetime.now(UTC)
    for i in range(25):
        add_study(db, f"8.{i}", 100 - i, now=now)
    full = _uids(worklist(db, now=now))
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = worklist(db, now=now, limit=10, offset=offset)
        assert page["total"] == 25 and len(page["items"]) <= 10
        assert [i["rank"] for i in page["items"]] == list(
            range(offset + 1, offset + 1 + len(page["items"]))
        )
        seen += _uids(page)
        offset = page["next_offset"]
    assert seen == full


def test_a_finding_written_by_any_code_reorders_through_the_trigger(db: Database) -> None:
    now = datetime.now(UTC)
    add_study(db, "7.1", 30, now=now)
    add_study(db, "7.2", 5, now=now)
    assert _uids(worklist(db, now=now)) == ["7.1", "7.2"]
    _flag(db, "7.2")  # a plain insert: no call into the worklist
    doc = worklist(db, now=now)
    assert _uids(doc) == ["7.2", "7.1"]
    assert doc["items"][0]["priority_class"] == "critical"
    assert "ai:intracranial_haemorrhage" in doc["items"][0]["reasons"]
    with db.session() as s:  # the finding removed: back to arrival order
        s.execute(delete(FindingRow))
    assert _uids(worklist(db, now=now)) == ["7.1", "7.2"]


def test_order_priority_change_marks_the_rank_stale(db: Database) -> None:
    now = datetime.now(UTC)
    add_study(db, "6.1", 30, now=now)
    add_study(db, "6.2", 5, now=now)
    worklist(db, now=now)
    with db.session() as s:
        s.execute(
            update(StudyRow).where(StudyRow.StudyInstanceUID == "6.2").values(order_priority="STAT")
        )
        valid_until = s.scalar(
            select(StudyRow.rank_valid_until).where(StudyRow.StudyInstanceUID == "6.2")
        )
    assert valid_until.replace(tzinfo=UTC) == RANK_STALE
    assert _uids(worklist(db, now=now)) == ["6.2", "6.1"]


def test_time_alone_moves_a_study_when_its_tier_changes(db: Database) -> None:
    now = datetime.now(UTC)
    arrived = add_study(db, "5.1", 0, now=now)  # routine, 60 min deadline, due soon at 45
    add_study(db, "5.2", 0, priority="STAT", now=now + timedelta(seconds=1))
    first = worklist(db, now=now + timedelta(minutes=1))
    assert [i["tier"] for i in first["items"]] == ["queued", "queued"]
    assert _uids(first) == ["5.2", "5.1"]  # stat before routine while fresh
    with db.session() as s:
        until = s.scalar(
            select(StudyRow.rank_valid_until).where(StudyRow.StudyInstanceUID == "5.1")
        )
    assert until.replace(tzinfo=UTC) == arrived + timedelta(minutes=45)
    later = worklist(db, now=arrived + timedelta(minutes=61))
    tiers = {i["StudyInstanceUID"]: i["tier"] for i in later["items"]}
    assert tiers == {"5.1": "overdue", "5.2": "overdue"}
    assert _uids(later) == ["5.1", "5.2"]  # earliest deadline first once overdue


def test_another_policy_ranks_again(db: Database) -> None:
    now = datetime.now(UTC)
    add_study(db, "4.1", 30, now=now)
    add_study(db, "4.2", 5, priority="STAT", now=now)
    assert _uids(worklist(db, now=now)) == ["4.2", "4.1"]
    slow_stat = PolicyConfig(sla_minutes={"critical": 15, "stat": 600, "urgent": 60, "routine": 60})
    doc = worklist(db, now=now, config=slow_stat)
    assert doc["policy_config"] == slow_stat.digest()
    with db.session() as s:
        policies = set(s.scalars(select(StudyRow.rank_policy)))
    assert policies == {slow_stat.digest()}


def test_filters_and_claimable_in_sql(db: Database) -> None:
    now = datetime.now(UTC)
    add_study(db, "3.1", 30, now=now)  # CT head: neuro
    add_study(db, "3.2", 20, now=now, modality="CR", body_part="CHEST")
    add_study(db, "3.3", 10, now=now, modality="CT", body_part="CHEST")
    assert _uids(worklist(db, now=now, modalities=["cr"])) == ["3.2"]
    chest = worklist(db, now=now, subspecialties=["chest"])
    assert _uids(chest) == ["3.2", "3.3"] and chest["total"] == 2
    assert [i["rank"] for i in chest["items"]] == [1, 2]
    queue.claim(db, "3.1", "alice", now=now)
    assert _uids(worklist(db, now=now, claimable_only=True)) == ["3.2", "3.3"]
    # A lapsed claim is claimable again and shown unread.
    later = now + queue.DEFAULT_LEASE + timedelta(seconds=1)
    doc = worklist(db, now=later, claimable_only=True)
    assert _uids(doc)[0] == "3.1" and doc["items"][0]["read_state"] == "unread"


def test_completed_studies_leave_and_come_last_when_asked(db: Database) -> None:
    now = datetime.now(UTC)
    add_study(db, "2.1", 30, now=now)
    add_study(db, "2.2", 5, now=now)
    queue.claim(db, "2.1", "alice", now=now)
    queue.complete(db, "2.1", "alice", now=now)
    assert _uids(worklist(db, now=now)) == ["2.2"]
    both = worklist(db, now=now, include_completed=True)
    assert _uids(both) == ["2.2", "2.1"]
    assert both["items"][1]["tier"] == "read"


def test_findings_recorded_while_the_study_is_read_still_class_it(db: Database) -> None:
    """The AI's result can land after the study was claimed and before it is completed:
    completing must not hide that its placement is stale."""
    now = datetime.now(UTC)
    add_study(db, "12.1", 5, priority="STAT", now=now)
    assert worklist(db, now=now)["items"][0]["priority_class"] == "stat"
    queue.claim(db, "12.1", "alice", now=now)
    _flag(db, "12.1")  # recorded while alice reads it; no read of the worklist in between
    queue.complete(db, "12.1", "alice", now=now)
    (item,) = worklist(db, now=now, include_completed=True)["items"]
    assert item["read_state"] == "completed" and item["tier"] == "read"
    assert item["priority_class"] == "critical"
    assert "ai:intracranial_haemorrhage" in item["reasons"]


def test_next_hands_each_study_out_once_under_concurrency(db: Database) -> None:
    now = datetime.now(UTC)
    for i in range(40):
        add_study(db, f"1.{i}", 200 - i, now=now)
    handed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def reader(name: str) -> None:
        start.wait()
        while True:
            item = queue.claim_next(db, name)
            if item is None:
                return
            with lock:
                handed.append(item["StudyInstanceUID"])
            queue.complete(db, item["StudyInstanceUID"], name)

    threads = [threading.Thread(target=reader, args=(f"r{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(handed) == sorted(f"1.{i}" for i in range(40))
    assert len(handed) == len(set(handed))
    with db.session() as s:
        left = s.scalar(select(func.count()).where(StudyRow.read_state != "completed"))
    assert left == 0


def test_next_takes_the_first_in_order_with_its_rank(db: Database) -> None:
    now = datetime.now(UTC)
    add_study(db, "0.1", 30, now=now)
    add_study(db, "0.2", 5, now=now)
    _flag(db, "0.2")
    item = queue.claim_next(db, "alice", now=now)
    assert item is not None and item["StudyInstanceUID"] == "0.2"
    assert item["rank"] == 1 and item["read_state"] == "claimed"
    assert item["priority_class"] == "critical"
    nxt = queue.claim_next(db, "bob", now=now)
    assert nxt is not None and nxt["StudyInstanceUID"] == "0.1" and nxt["rank"] == 2
    assert queue.claim_next(db, "carol", now=now) is None


def test_refresh_touches_only_lapsed_rows(db: Database) -> None:
    now = datetime.now(UTC)
    for i in range(5):
        add_study(db, f"11.{i}", 5, now=now)
    with db.session() as s:
        assert rank.refresh(s, now) == 5
    with db.session() as s:
        assert rank.refresh(s, now) == 0
    _flag(db, "11.3")
    with db.session() as s:
        assert rank.refresh(s, now) == 1
