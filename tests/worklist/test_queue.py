"""The reading work queue on a real database (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from tests.studies import add_study as add_head_or_other
from triage.db import Database
from triage.worklist import queue
from triage.worklist.queue import ClaimError
from triage.worklist.service import worklist


def add_study(db: Database, uid: str, minutes: int = 0, **kwargs: object) -> None:
    """A study arriving ``minutes`` after a start 30 minutes ago."""
    add_head_or_other(db, uid, 30 - minutes, **kwargs)  # type: ignore[arg-type]


def test_claim_is_exclusive_and_release_and_complete(db: Database) -> None:
    add_study(db, "1.1")
    expires = queue.claim(db, "1.1", "alice")
    assert expires > datetime.now(UTC)
    with pytest.raises(ClaimError, match="being read by alice") as err:
        queue.claim(db, "1.1", "bob")
    assert err.value.status == 409
    queue.claim(db, "1.1", "alice")  # her own claim: renewed, not refused
    with pytest.raises(ClaimError):
        queue.release(db, "1.1", "bob")
    queue.release(db, "1.1", "alice")
    queue.claim(db, "1.1", "bob")
    queue.complete(db, "1.1", "bob")
    with pytest.raises(ClaimError, match="read already"):
        queue.claim(db, "1.1", "alice")
    assert worklist(db)["items"] == []  # completed studies leave the worklist
    (item,) = worklist(db, include_completed=True)["items"]
    assert item["read_state"] == "completed" and item["completed_by"] == "bob"
    with pytest.raises(ClaimError) as unknown:
        queue.claim(db, "9.9", "alice")
    assert unknown.value.status == 404
    with pytest.raises(ClaimError) as bad:
        queue.claim(db, "1.1", "alice; drop table")
    assert bad.value.status == 400


def test_abandoned_claim_returns_after_the_lease(db: Database) -> None:
    add_study(db, "1.1")
    now = datetime.now(UTC)
    queue.claim(db, "1.1", "alice", lease=timedelta(minutes=5), now=now)
    assert queue.claim_next(db, "bob", now=now + timedelta(minutes=1)) is None
    later = now + timedelta(minutes=6)
    (item,) = worklist(db, now=later)["items"]
    assert item["read_state"] == "unread"  # shown as back in the queue
    taken = queue.claim_next(db, "bob", now=later)
    assert taken is not None and taken["claimed_by"] == "bob"
    with pytest.raises(ClaimError, match="lease may have expired|being read by bob"):
        queue.complete(db, "1.1", "alice", now=later)
    queue.renew(db, "1.1", "bob", now=later)


def test_claim_next_follows_the_order_and_filters(db: Database) -> None:
    add_study(db, "1.1", 0)
    add_study(db, "1.2", 1, priority="STAT")
    add_study(db, "1.3", 2, modality="CR", body_part="CHEST")
    first = queue.claim_next(db, "alice")
    assert first is not None and first["StudyInstanceUID"] == "1.2"  # STAT first
    chest = queue.claim_next(db, "bob", subspecialties=["chest"])
    assert chest is not None and chest["StudyInstanceUID"] == "1.3"
    assert queue.claim_next(db, "carol", modalities=["CR"]) is None
    neuro = queue.claim_next(db, "carol", subspecialties=["neuro"])
    assert neuro is not None and neuro["StudyInstanceUID"] == "1.1"
    assert queue.claim_next(db, "dave") is None


def test_twenty_concurrent_readers_never_get_the_same_study(db: Database) -> None:
    n_studies, n_readers = 60, 20
    for i in range(n_studies):
        add_study(db, f"1.{i}", i % 7)
    taken: list[tuple[str, str]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_readers)

    def reader(name: str) -> None:
        try:
            barrier.wait()
            while True:
                item = queue.claim_next(db, name)
                if item is None:
                    return
                with lock:
                    taken.append((item["StudyInstanceUID"], name))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(f"r{i}",)) for i in range(n_readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    counts = Counter(uid for uid, _ in taken)
    assert len(counts) == n_studies and max(counts.values()) == 1  # each once, none twice
    assert len({name for _, name in taken}) > 1  # the work was shared
    items = worklist(db)["items"]
    assert {i["read_state"] for i in items} == {"claimed"}
    assert all(
        i["claimed_by"] == dict((u, n) for u, n in taken)[i["StudyInstanceUID"]] for i in items
    )
