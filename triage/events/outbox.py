"""The durable outbox: events are rows of the ``events`` table.

A producer adds its event in the same transaction as the change it describes
(:func:`emit`), so an event exists exactly when its change was committed, whichever process
made it. Readers follow the table by id: the SSE stream with an :class:`EventCursor`, the
webhook sender by each row's delivery state. Payloads never carry patient names or IDs.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from triage.db import Database
from triage.db.tables import EventRow
from triage.domain import WebhookState

CRITICAL_FINDING = "critical_finding"
WORKLIST_CHANGED = "worklist_changed"
TASK = "task"
KINDS: tuple[str, ...] = (CRITICAL_FINDING, WORKLIST_CHANGED, TASK)
"""Every event kind the server emits."""
MAX_EVENT_ID = 2**31 - 1
"""The largest id a reader may resume after: the range of the events table's id column (a
32-bit INTEGER on PostgreSQL, where a larger number cannot even be compared with an id)."""


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Event:
    """One committed event, as readers see it."""

    id: int
    created_at: datetime
    kind: str
    StudyInstanceUID: str | None
    payload: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The message document (the SSE ``data`` and the webhook body)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "created_at": self.created_at.isoformat(),
            "StudyInstanceUID": self.StudyInstanceUID,
            "payload": self.payload,
        }

    def sse(self) -> str:
        """The event as one server-sent-events message."""
        data = json.dumps(self.to_json(), separators=(",", ":"))
        return f"id: {self.id}\nevent: {self.kind}\ndata: {data}\n\n"


def event_of_row(row: EventRow) -> Event:
    """The reader's view of an ``events`` row."""
    return Event(
        id=row.id,
        created_at=_utc(row.created_at),
        kind=row.kind,
        StudyInstanceUID=row.StudyInstanceUID,
        payload=dict(row.payload),
    )


def emit(
    session: Session,
    kind: str,
    study_uid: str | None,
    payload: dict[str, Any],
    *,
    webhook: bool,
    now: datetime | None = None,
) -> EventRow:
    """Add an event in the caller's transaction (it is visible once the caller commits).

    Args:
        session: the producer's open session (its transaction carries the change).
        kind: one of :data:`KINDS`.
        study_uid: the study the event is about, or None.
        payload: a JSON-able document without patient data.
        webhook: queue the event for the webhook (``webhook_state='pending'``).
        now: creation time (default: the current time).
    """
    now = now or datetime.now(UTC)
    row = EventRow(
        created_at=now,
        kind=kind,
        StudyInstanceUID=study_uid,
        payload=payload,
        webhook_state=WebhookState.pending if webhook else None,
        webhook_attempts=0,
        webhook_next_at=now if webhook else None,
    )
    session.add(row)
    return row


def events_after(
    db: Database, last_id: int, limit: int = 500, *, kinds: Collection[str] | None = None
) -> list[Event]:
    """Committed events with an id above ``last_id``, oldest first (``kinds``: only these)."""
    stmt = select(EventRow).where(EventRow.id > last_id)
    if kinds is not None:
        stmt = stmt.where(EventRow.kind.in_(list(kinds)))
    with db.session() as s:
        rows = s.scalars(stmt.order_by(EventRow.id).limit(limit)).all()
        return [event_of_row(r) for r in rows]


def parse_event_id(text: str) -> int | None:
    """An event id written by a client (``Last-Event-ID``), or None when ``text`` is not a
    whole decimal number from 0 to :data:`MAX_EVENT_ID`."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_EVENT_ID)):
        return None
    value = int(text)
    return value if value <= MAX_EVENT_ID else None


def latest_id(db: Database) -> int:
    """The id of the newest event (0 when there is none)."""
    with db.session() as s:
        return int(s.scalar(select(func.max(EventRow.id))) or 0)


def prune(db: Database, older_than: datetime) -> int:
    """Delete events created before ``older_than``, except those the webhook still owes."""
    with db.session() as s:
        result = s.execute(
            delete(EventRow).where(
                EventRow.created_at < older_than,
                or_(
                    EventRow.webhook_state.is_(None), EventRow.webhook_state != WebhookState.pending
                ),
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)


class EventCursor:
    """Follows the outbox in id order without skipping a late commit.

    Ids are handed out when a row is inserted, not when it is committed: on PostgreSQL a
    transaction holding id 10 may commit after id 11 is visible. The cursor therefore stops
    before a gap in the ids until the row after the gap is ``gap_grace`` old (a rolled-back
    insert leaves a gap that never fills; pruned rows leave old gaps). On SQLite writes are
    serialised and ids have no gaps, so nothing waits.

    Args:
        last_id: the last event already seen (0: from the start).
        kinds: deliver only these kinds (None: all); the cursor still advances past others.
        gap_grace: how long to wait for a gap in the ids to fill.
    """

    def __init__(
        self,
        last_id: int,
        *,
        kinds: Collection[str] | None = None,
        gap_grace: timedelta = timedelta(seconds=2),
        batch: int = 500,
    ) -> None:
        self.last_id = last_id
        self.kinds = frozenset(kinds) if kinds is not None else None
        self.gap_grace = gap_grace
        self.batch = batch

    def poll(self, db: Database, now: datetime | None = None) -> list[Event]:
        """The next events in order (possibly none); advances the cursor past them."""
        now = now or datetime.now(UTC)
        out: list[Event] = []
        for event in events_after(db, self.last_id, self.batch):
            if event.id != self.last_id + 1 and now - event.created_at < self.gap_grace:
                break  # an earlier id may still commit: wait for it
            self.last_id = event.id
            if self.kinds is None or event.kind in self.kinds:
                out.append(event)
        return out
