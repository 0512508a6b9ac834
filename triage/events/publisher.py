"""The publisher: turns changes of the worklist into ``worklist_changed`` and ``task`` events.

A background thread of ``triage serve`` reads the kept order (:mod:`triage.worklist.rank`,
the same order as ``GET /api/worklist`` with the server's policy) every ``interval_seconds``
— one narrow indexed query for the placements, not the documents — and compares each
study with the previous round, kept in memory:

- a study whose own placement or state (class, tier, reasons, read state, reader, AI status
  or the time of its analysis) changed, that appeared, or that left the worklist (read) is
  listed in one ``worklist_changed`` event with its current rank; a study whose rank moved
  only because another was placed before it is not listed (re-read ``GET /api/worklist``
  for positions);
- each listed study's FHIR Task is compared too, and a ``task`` event carries one that
  changed.

Only the listed studies' documents are read. At start the publisher takes the current
order as its first snapshot and emits a single ``worklist_changed`` event with
``"resync": true`` and no changes: what changed while no publisher ran is not replayed, so a
consumer re-reads ``GET /api/worklist`` (and the Tasks it follows) when it sees ``resync``.
Changes of time alone (a study becoming due soon or overdue) are changes too.

One publisher runs per database: on PostgreSQL each ``triage serve`` process's publisher
tries a session-level advisory lock every round and publishes only while it holds it (when
the holder stops or its connection drops, another takes over and starts with ``resync``);
on SQLite the one ``triage serve`` publishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, String, and_, case, cast, select, text
from sqlalchemy.orm import Session

from triage.db import Database
from triage.db.tables import StudyRow
from triage.domain import ReadState
from triage.events import outbox
from triage.events.fhir import task_from_item
from triage.worklist import service
from triage.worklist.priority import DEFAULT_POLICY, POLICY_VERSION, PolicyConfig
from triage.worklist.rank import RANK_ORDER, waiting

log = logging.getLogger(__name__)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_CHANGE_FIELDS = (
    "rank",
    "priority_class",
    "tier",
    "deadline",
    "read_state",
    "claimed_by",
    "ai_status",
    "reasons",
)
_LEADER_LOCK = 0x7472_6961_6765_0001
"""The PostgreSQL advisory lock that makes one process the publisher ("triage" + 1)."""


def _change(change: str, item: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"StudyInstanceUID": item["StudyInstanceUID"], "change": change}
    doc.update({name: item.get(name) for name in _CHANGE_FIELDS})
    return doc


def _load(s: Session, uids: Collection[str]) -> dict[str, StudyRow]:
    out: dict[str, StudyRow] = {}
    ordered = sorted(uids)
    for start in range(0, len(ordered), 500):
        batch = ordered[start : start + 500]
        stmt = (
            select(StudyRow)
            .where(StudyRow.StudyInstanceUID.in_(batch))
            .options(*service.ITEM_LOADS)
        )
        out.update((st.StudyInstanceUID, st) for st in s.scalars(stmt))
    return out


def study_item(
    db: Database, study_uid: str, now: datetime, config: PolicyConfig = DEFAULT_POLICY
) -> dict[str, Any] | None:
    """One study's worklist item (with its rank), or its item without a rank when it has
    been read; None when the study is unknown."""
    with db.session() as s:
        service.ranked(s, None, config)
        study = _load(s, [study_uid]).get(study_uid)
        return None if study is None else service.study_item(s, study, now)


class _Leadership:
    """Whether this process is the database's publisher (always, on SQLite)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Connection | None = None

    def held(self) -> bool:
        if self.db.engine.dialect.name != "postgresql":
            return True
        if self._conn is not None:
            try:
                self._conn.exec_driver_sql("SELECT 1")
                self._conn.commit()
                return True
            except Exception:
                log.warning("lost the publisher's database connection; electing again")
                self.release()
        conn = self.db.engine.connect()
        try:
            got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LEADER_LOCK}))
            conn.commit()
        except Exception:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        log.info("this process publishes the worklist's events")
        return True

    def release(self) -> None:
        """Give the lock up: its database session is ended, not returned to the pool (a
        pooled session would keep holding the session-level lock)."""
        if self._conn is not None:
            try:
                self._conn.invalidate()  # closes the session, and the lock goes with it
                self._conn.close()
            except Exception:
                log.debug("closing the publisher's connection failed", exc_info=True)
            self._conn = None


@dataclass(frozen=True)
class _Seen:
    rank: int
    key: tuple[Any, ...]


class Publisher:
    """Emits worklist and Task changes into the outbox, from a background thread.

    Args:
        db: the database.
        policy: the server's priority policy configuration.
        interval_seconds: how often the worklist is compared.
        webhook_kinds: event kinds queued for the webhook (empty: none).
        accession_system: FHIR identifier system of accession numbers.
        retention: events older than this are deleted (those the webhook still owes kept).
    """

    def __init__(
        self,
        db: Database,
        *,
        policy: PolicyConfig = DEFAULT_POLICY,
        interval_seconds: float = 1.0,
        webhook_kinds: Collection[str] = (),
        accession_system: str | None = None,
        retention: timedelta = timedelta(days=7),
        prune_every: timedelta = timedelta(minutes=10),
    ) -> None:
        self.db = db
        self.policy = policy
        self.interval_seconds = interval_seconds
        self.webhook_kinds = frozenset(webhook_kinds)
        self.accession_system = accession_system
        self.retention = retention
        self.prune_every = prune_every
        self.version = 0
        self._snapshot: dict[str, _Seen] | None = None
        self._leadership = _Leadership(db)
        self._last_prune: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="triage-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._leadership.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if self.tick() >= 0 and self._snapshot is not None:
                    self._maybe_prune()  # the publisher alone prunes
            except Exception:
                log.exception("publishing worklist changes failed")
            # Reading every placement costs CPU that the DICOM listener shares (one Python
            # process): keep this thread under about a tenth of it on a very long list.
            elapsed = time.monotonic() - started
            self._stop.wait(max(self.interval_seconds, 9 * elapsed))

    def _maybe_prune(self) -> None:
        now = datetime.now(UTC)
        if self._last_prune is not None and now - self._last_prune < self.prune_every:
            return
        self._last_prune = now
        n = outbox.prune(self.db, now - self.retention)
        if n:
            log.info("pruned %d old event(s)", n)

    def _emit(
        self, s: Session, kind: str, uid: str | None, payload: dict[str, Any], now: datetime
    ) -> None:
        outbox.emit(s, kind, uid, payload, webhook=kind in self.webhook_kinds, now=now)

    def _placements(self, now: datetime | None) -> tuple[datetime, dict[str, _Seen]]:
        """Every waiting study's rank and what makes its placement (one indexed query; the
        comparison is on the database's text of each value, nothing decoded, so a round on
        10,000 waiting studies stays short)."""
        with self.db.session() as s:
            now = service.ranked(s, now, self.policy)
            abandoned = and_(
                StudyRow.read_state == ReadState.claimed, StudyRow.claim_expires_at < now
            )
            rows = s.execute(
                select(
                    StudyRow.StudyInstanceUID,
                    StudyRow.priority_class,
                    StudyRow.tier,
                    cast(StudyRow.rank_reasons, String),
                    case((abandoned, ReadState.unread.value), else_=StudyRow.read_state),
                    case((abandoned, None), else_=StudyRow.claimed_by),
                    StudyRow.ai_status,
                    cast(StudyRow.ai_updated_at, String),
                )
                .where(waiting())
                .order_by(*RANK_ORDER)
            ).all()
        current = {row[0]: _Seen(position, tuple(row[1:])) for position, row in enumerate(rows, 1)}
        return now, current

    def tick(self, now: datetime | None = None) -> int:
        """Compare the order with the previous round and emit the changes.

        Returns:
            The number of events emitted (the first round emits one ``resync`` event; a
            process that is not the database's publisher emits none).
        """
        if not self._leadership.held():
            self._snapshot = None  # resync when this process becomes the publisher
            return 0
        now, current = self._placements(now)
        header = {
            "generated_at": now.isoformat(),
            "policy": POLICY_VERSION,
            "policy_config": self.policy.digest(),
            "count": len(current),
        }
        previous = self._snapshot
        if previous is None:
            with self.db.session() as s:
                payload = {"version": self.version + 1, **header, "resync": True, "changes": []}
                self._emit(s, outbox.WORKLIST_CHANGED, None, payload, now)
            self.version += 1
            self._snapshot = current
            return 1

        added = [uid for uid in current if uid not in previous]
        updated = [
            uid
            for uid, seen in current.items()
            if uid in previous and previous[uid].key != seen.key
        ]
        gone = sorted(previous.keys() - current.keys())
        if not added and not updated and not gone:
            self._snapshot = current
            return 0
        changes: list[dict[str, Any]] = []
        changed_tasks: list[tuple[str, dict[str, Any]]] = []
        with self.db.session() as s:
            studies = _load(s, [*added, *updated, *gone])
            for kind, uids in (("added", added), ("updated", updated)):
                for uid in uids:
                    study = studies.get(uid)
                    if study is None:
                        continue
                    item = service.item_of(study, current[uid].rank, now)
                    changes.append(_change(kind, item))
                    changed_tasks.append((uid, self._task(item, now)))
            for uid in gone:
                study = studies.get(uid)
                if study is None:
                    changes.append({"StudyInstanceUID": uid, "change": "removed"})
                    continue
                item = service.item_of(study, None, now)
                completed = item.get("read_state") == ReadState.completed
                changes.append(_change("completed" if completed else "removed", item))
                changed_tasks.append((uid, self._task(item, now)))
        changes.sort(key=lambda c: (c.get("rank") is None, c.get("rank") or 0))
        emitted = 0
        with self.db.session() as s:
            if changes:
                payload = {
                    "version": self.version + 1,
                    **header,
                    "resync": False,
                    "changes": changes,
                }
                self._emit(s, outbox.WORKLIST_CHANGED, None, payload, now)
                emitted += 1
            for uid, task in changed_tasks:
                self._emit(s, outbox.TASK, uid, task, now)
                emitted += 1
        if changes:
            self.version += 1
        self._snapshot = current
        return emitted

    def _task(self, item: dict[str, Any], now: datetime) -> dict[str, Any]:
        return task_from_item(item, now, accession_system=self.accession_system)
