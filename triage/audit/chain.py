"""An append-only, tamper-evident audit trail.

Each record carries the sha256 of the record before it and its own sha256 over its content
and that link (a hash chain). Records get consecutive ids under a lock on the one head row,
which also keeps the count and the last hash, so :func:`verify` sees a record that was
altered (its hash no longer matches), removed or reordered (the next record's link no longer
matches, or ids skip), or cut from the end (the head disagrees), and names the first one.

The chain shows tampering by anyone who can write to the database but not recompute every
hash after the change; it is not a signature. Records hold identifiers (usernames,
StudyInstanceUIDs, addresses), never patient names.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from triage.db import Database
from triage.db.tables import AuditHeadRow, AuditRow

GENESIS = "0" * 64


class Outcome(enum.StrEnum):
    success = "success"
    failure = "failure"


@dataclass(frozen=True)
class AuditEvent:
    """What to record. ``action`` is a short verb (``login``, ``claim``, ``account_create``)."""

    action: str
    outcome: Outcome = Outcome.success
    actor: str | None = None
    actor_role: str | None = None
    target_kind: str | None = None  # study | account | token | audit
    target: str | None = None
    source_address: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


def _utc_text(at: datetime) -> str:
    """A time as the chain hashes it: UTC, microseconds (SQLite returns naive UTC)."""
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.isoformat(timespec="microseconds")


def record_hash(record_id: int, at: datetime, event: AuditEvent, prev_hash: str) -> str:
    content = {
        "id": record_id,
        "at": _utc_text(at),
        "actor": event.actor,
        "actor_role": event.actor_role,
        "action": event.action,
        "outcome": str(event.outcome),
        "target_kind": event.target_kind,
        "target": event.target,
        "source_address": event.source_address,
        "detail": dict(event.detail),
        "prev": prev_hash,
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def append_in(conn: Connection, event: AuditEvent, *, now: datetime | None = None) -> int:
    """Append a record inside the caller's transaction (so it commits with the action it
    records). Returns its id."""
    at = now or datetime.now(UTC)
    # The UPDATE first: it takes the head row's lock (PostgreSQL) or the write lock (SQLite),
    # so concurrent appends line up behind each other and ids stay consecutive.
    conn.execute(
        update(AuditHeadRow).where(AuditHeadRow.id == 1).values(count=AuditHeadRow.count + 1)
    )
    head = conn.execute(
        select(AuditHeadRow.last_id, AuditHeadRow.last_hash).where(AuditHeadRow.id == 1)
    ).one()
    record_id = int(head.last_id) + 1
    digest = record_hash(record_id, at, event, str(head.last_hash))
    conn.execute(
        insert(AuditRow).values(
            id=record_id,
            at=at,
            actor=event.actor,
            actor_role=event.actor_role,
            action=event.action,
            outcome=str(event.outcome),
            target_kind=event.target_kind,
            target=event.target,
            source_address=event.source_address,
            detail=dict(event.detail),
            prev_hash=str(head.last_hash),
            hash=digest,
        )
    )
    conn.execute(
        update(AuditHeadRow).where(AuditHeadRow.id == 1).values(last_id=record_id, last_hash=digest)
    )
    return record_id


def append(db: Database, event: AuditEvent, *, now: datetime | None = None) -> int:
    """Append a record in a transaction of its own and, once it is committed, send it to
    the ATNA syslog repository when one is configured (:mod:`triage.audit.atna`). Returns
    its id. (:func:`append_in` leaves sending to its caller, after the commit.)"""
    from triage.audit import atna  # late: atna imports this module

    at = now or datetime.now(UTC)
    with db.engine.begin() as conn:
        record_id = append_in(conn, event, now=at)
    atna.emit(event, at)
    return record_id


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    first_bad_id: int | None = None
    problem: str | None = None


def _event_of(row: Any) -> AuditEvent:
    return AuditEvent(
        action=row.action,
        outcome=Outcome(row.outcome),
        actor=row.actor,
        actor_role=row.actor_role,
        target_kind=row.target_kind,
        target=row.target,
        source_address=row.source_address,
        detail=row.detail or {},
    )


def verify(db: Database) -> Verification:
    """Check the whole chain; the first record that breaks it, and how."""
    expected_prev, expected_id, checked = GENESIS, 1, 0
    with db.engine.connect() as conn:
        head = conn.execute(select(AuditHeadRow).where(AuditHeadRow.id == 1)).one_or_none()
        if head is None:
            return Verification(False, 0, None, "the audit head row is missing")
        for row in conn.execute(select(AuditRow).order_by(AuditRow.id)):
            if row.id != expected_id:
                return Verification(
                    False,
                    checked,
                    row.id,
                    f"record {row.id} follows record {expected_id - 1}: records are missing"
                    " or reordered",
                )
            if row.prev_hash != expected_prev:
                return Verification(
                    False,
                    checked,
                    row.id,
                    f"record {row.id} does not link to the record before it (removed,"
                    " reordered or altered)",
                )
            if record_hash(row.id, row.at, _event_of(row), row.prev_hash) != row.hash:
                return Verification(
                    False, checked, row.id, f"record {row.id} was altered after it was written"
                )
            expected_prev, expected_id, checked = row.hash, row.id + 1, checked + 1
    if head.count != checked or head.last_id != expected_id - 1 or head.last_hash != expected_prev:
        return Verification(
            False,
            checked,
            expected_id,
            f"the chain ends at record {expected_id - 1} but {head.count} record(s) were"
            f" written, the last {head.last_id}: records were removed from the end",
        )
    return Verification(True, checked)


def _as_utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def listing(
    db: Database,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 500,
) -> list[dict[str, Any]]:
    """Records, newest first, filtered; each as a plain dict (what the API and CLI show)."""
    stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(max(1, min(limit, 10_000)))
    if actor is not None:
        stmt = stmt.where(AuditRow.actor == actor)
    if action is not None:
        stmt = stmt.where(AuditRow.action == action)
    if target is not None:
        stmt = stmt.where(AuditRow.target == target)
    # In UTC, as the records are kept (SQLite compares the stored text, so a time with
    # another offset would be hours off); a time without an offset is taken as UTC.
    if since is not None:
        stmt = stmt.where(AuditRow.at >= _as_utc(since))
    if until is not None:
        stmt = stmt.where(AuditRow.at < _as_utc(until))
    with db.engine.connect() as conn:
        return [
            {
                "id": r.id,
                "at": _utc_text(r.at) + "Z",
                "actor": r.actor,
                "actor_role": r.actor_role,
                "action": r.action,
                "outcome": r.outcome,
                "target_kind": r.target_kind,
                "target": r.target,
                "source_address": r.source_address,
                "detail": r.detail,
                "hash": r.hash,
            }
            for r in conn.execute(stmt)
        ]
