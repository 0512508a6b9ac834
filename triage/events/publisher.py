"""The publisher: turns changes of the worklist into ``worklist_changed`` and ``task`` events.

A background thread of ``triage serve`` computes the worklist every ``interval_seconds``
(the same document as ``GET /api/worklist``, with the server's policy) and compares each
study with the previous round, kept in memory:

- a study whose (rank, class, tier, read state, reader, AI status) changed, appeared or
  left the worklist (read) is listed in one ``worklist_changed`` event;
- a study whose FHIR Task changed (anything but ``lastModified``) gets one ``task`` event
  carrying the Task.

At start the publisher takes the current worklist as its first snapshot and emits a single
``worklist_changed`` event with ``"resync": true`` and no changes: what changed while the
server was down is not replayed, so a consumer re-reads ``GET /api/worklist`` (and the
Tasks it follows) when it sees ``resync``. Changes of time alone (a study becoming due soon
or overdue) are changes too. Run one publisher per database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from triage.db import Database
from triage.db.tables import StudyRow
from triage.domain import ReadState
from triage.events import outbox
from triage.events.fhir import comparable, task_from_item
from triage.worklist import service
from triage.worklist.priority import DEFAULT_POLICY, PolicyConfig, place

log = logging.getLogger(__name__)

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


def _key(item: dict[str, Any]) -> tuple[Any, ...]:
    return (
        item.get("rank"),
        item.get("priority_class"),
        item.get("tier"),
        item.get("read_state"),
        item.get("claimed_by"),
        item.get("ai_status"),
    )


def _change(change: str, item: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"StudyInstanceUID": item["StudyInstanceUID"], "change": change}
    doc.update({name: item.get(name) for name in _CHANGE_FIELDS})
    return doc


def study_outside_worklist(
    db: Database, study_uid: str, now: datetime, config: PolicyConfig = DEFAULT_POLICY
) -> dict[str, Any] | None:
    """A study that is not on the worklist (read already) as an item without a rank.

    Returns None when the study is unknown.
    """
    detail = service.study_detail(db, study_uid)
    if detail is None:
        return None
    with db.session() as s:
        study = s.scalar(
            select(StudyRow)
            .where(StudyRow.StudyInstanceUID == study_uid)
            .options(selectinload(StudyRow.findings), selectinload(StudyRow.series))
        )
        if study is None:
            return None
        ctx = service.context_of(study, now)
    _key_, cls, deadline, tier, reasons = place(ctx, now, config)
    item = {k: v for k, v in detail.items() if k not in ("series", "routing", "overlays")}
    item.update(
        rank=None,
        priority_class=cls,
        deadline=deadline.isoformat(),
        tier="read" if item.get("read_state") == ReadState.completed else tier,
        reasons=reasons,
    )
    return item


def study_item(
    db: Database, study_uid: str, now: datetime, config: PolicyConfig = DEFAULT_POLICY
) -> dict[str, Any] | None:
    """One study's worklist item (with its rank), or its item without a rank when it has
    been read; None when the study is unknown."""
    for item in service.worklist(db, now=now, config=config)["items"]:
        if item["StudyInstanceUID"] == study_uid:
            return item
    return study_outside_worklist(db, study_uid, now, config)


@dataclass(frozen=True)
class _Seen:
    key: tuple[Any, ...]
    task: dict[str, Any]  # without lastModified


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

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
                self._maybe_prune()
            except Exception:
                log.exception("publishing worklist changes failed")
            # Ranking a long worklist costs CPU that the DICOM listener shares (one Python
            # process): keep this thread under about a tenth of it (2,000 waiting studies
            # take about 0.2 s to rank, so changes are then published every 2 s).
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

    def tick(self, now: datetime | None = None) -> int:
        """Compare the worklist with the previous round and emit the changes.

        Returns:
            The number of events emitted (the first round emits one ``resync`` event).
        """
        now = now or datetime.now(UTC)
        doc = service.worklist(self.db, now=now, config=self.policy)
        items = {item["StudyInstanceUID"]: item for item in doc["items"]}
        tasks = {
            uid: task_from_item(item, now, accession_system=self.accession_system)
            for uid, item in items.items()
        }
        current = {uid: _Seen(_key(items[uid]), comparable(tasks[uid])) for uid in items}
        header = {
            "generated_at": now.isoformat(),
            "policy": doc["policy"],
            "policy_config": doc["policy_config"],
            "count": len(items),
        }
        previous = self._snapshot
        if previous is None:
            with self.db.session() as s:
                payload = {"version": self.version + 1, **header, "resync": True, "changes": []}
                self._emit(s, outbox.WORKLIST_CHANGED, None, payload, now)
            self.version += 1
            self._snapshot = current
            return 1

        changes: list[dict[str, Any]] = []
        changed_tasks: list[tuple[str, dict[str, Any]]] = []
        for uid, seen in current.items():
            old = previous.get(uid)
            if old is None:
                changes.append(_change("added", items[uid]))
            elif old.key != seen.key:
                changes.append(_change("updated", items[uid]))
            if old is None or old.task != seen.task:
                changed_tasks.append((uid, tasks[uid]))
        for uid in sorted(previous.keys() - current.keys()):
            gone = study_outside_worklist(self.db, uid, now, self.policy)
            if gone is None:
                changes.append({"StudyInstanceUID": uid, "change": "removed"})
                continue
            completed = gone.get("read_state") == ReadState.completed
            changes.append(_change("completed" if completed else "removed", gone))
            changed_tasks.append(
                (uid, task_from_item(gone, now, accession_system=self.accession_system))
            )
        if not changes and not changed_tasks:
            self._snapshot = current
            return 0
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
