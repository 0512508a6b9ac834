"""The audit trail: one record per append, a hash chain that ``verify`` checks, and every
kind of tampering directly in the database found and named."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, update

from triage.audit.chain import AuditEvent, Outcome, append, listing, verify
from triage.db import Database
from triage.db.tables import AuditHeadRow, AuditRow

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def fill(db: Database, n: int = 5) -> None:
    for i in range(n):
        append(
            db,
            AuditEvent(
                action="claim" if i % 2 else "login",
                outcome=Outcome.success if i != 3 else Outcome.failure,
                actor=f"reader{i % 2}",
                actor_role="radiologist",
                target_kind="study",
                target=f"1.2.3.{i}",
                source_address="10.0.0.7",
                detail={"n": i, "text": "ünïcode"},
            ),
            now=T0 + timedelta(seconds=i, microseconds=123),
        )


def test_an_intact_chain_verifies_and_lists_filtered(db: Database) -> None:
    assert verify(db).ok and verify(db).checked == 0
    fill(db)
    result = verify(db)
    assert result.ok and result.checked == 5
    items = listing(db, actor="reader1")
    assert [i["id"] for i in items] == [4, 2]
    assert items[0]["at"] == "2026-12-01T08:00:03.000123Z"
    assert [i["id"] for i in listing(db, action="login", limit=2)] == [5, 3]
    assert [i["id"] for i in listing(db, since=T0 + timedelta(seconds=4))] == [5]


@pytest.mark.parametrize(
    ("tamper", "first_bad"),
    [
        (update(AuditRow).where(AuditRow.id == 3).values(target="1.2.3.99"), 3),
        (update(AuditRow).where(AuditRow.id == 2).values(outcome="failure"), 2),
        (update(AuditRow).where(AuditRow.id == 4).values(detail={"n": 0}), 4),
        (update(AuditRow).where(AuditRow.id == 2).values(at=T0 - timedelta(days=1)), 2),
        (delete(AuditRow).where(AuditRow.id == 3), 4),
        (delete(AuditRow).where(AuditRow.id == 5), 5),  # cut from the end: the head knows
        (delete(AuditRow).where(AuditRow.id == 1), 2),
    ],
    ids=["target", "outcome", "detail", "time", "removed", "removed-last", "removed-first"],
)
def test_tampering_is_found_at_the_first_broken_record(
    db: Database, tamper: object, first_bad: int
) -> None:
    fill(db)
    with db.engine.begin() as conn:
        conn.execute(tamper)  # type: ignore[call-overload]
    result = verify(db)
    assert not result.ok and result.first_bad_id == first_bad, result


def test_reordering_records_is_found(db: Database) -> None:
    fill(db)
    with db.engine.begin() as conn:  # swap records 2 and 3 (their ids stay in place)
        rows = {r.id: r for r in conn.execute(AuditRow.__table__.select())}
        for a, b in ((2, 3), (3, 2)):
            src = rows[b]
            conn.execute(
                update(AuditRow)
                .where(AuditRow.id == a)
                .values(
                    at=src.at,
                    actor=src.actor,
                    action=src.action,
                    outcome=src.outcome,
                    target=src.target,
                    detail=src.detail,
                    prev_hash=src.prev_hash,
                    hash=src.hash,
                )
            )
    result = verify(db)
    assert not result.ok and result.first_bad_id == 2


def test_a_rewritten_head_does_not_hide_a_cut_end(db: Database) -> None:
    fill(db)
    with db.engine.begin() as conn:
        conn.execute(delete(AuditRow).where(AuditRow.id == 5))
        conn.execute(update(AuditHeadRow).values(count=4, last_id=4))
    result = verify(db)
    assert not result.ok and result.first_bad_id == 5  # last_hash still names record 5


def test_concurrent_appends_keep_one_chain(db: Database) -> None:
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(10):
                append(db, AuditEvent(action="view", actor=f"w{k}", target=str(i)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = verify(db)
    assert result.ok and result.checked == 40
