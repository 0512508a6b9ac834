"""The reading work queue: radiologists claim, renew, release and complete studies.

A claim is exclusive and carries a lease: a study whose reader walked away comes back to
the queue when the lease expires. Every change is one conditional UPDATE (``WHERE`` the
study is still claimable, or still held by this reader), so two readers can never hold one
study, on SQLite (writes are serialised) and on PostgreSQL (the row lock, and ``SKIP
LOCKED`` when picking the next study so that concurrent readers do not queue on one row).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, or_, select, update
from sqlalchemy.orm import Session

from triage.db import Database
from triage.db.tables import StudyRow
from triage.domain import ReadState
from triage.worklist import rank
from triage.worklist.priority import DEFAULT_POLICY, PolicyConfig
from triage.worklist.rank import claimable

__all__ = ["ClaimError", "claim", "claim_next", "claimable", "complete", "release", "renew"]

# Matched with fullmatch: ``$`` would also accept a name ending in a newline ("alice\n"),
# which plain "alice" could then never release.
_READER_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
DEFAULT_LEASE = timedelta(minutes=15)
MIN_LEASE = timedelta(seconds=30)
MAX_LEASE = timedelta(hours=24)
"""The range of a lease a reader may ask for: a shorter one lapses before the reader has
opened the study (a lease of 1e-300 s is over when it is granted), a longer one keeps an
abandoned study off the queue for more than a day."""


class ClaimError(Exception):
    """A claim operation that cannot be done; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_reader(reader: str) -> str:
    """The reader's name, if it is 1-64 ASCII letters, digits or ``. _ @ -`` (nothing else:
    no spaces, newlines or other control characters); else a 400 ClaimError."""
    if not _READER_RE.fullmatch(reader or ""):
        raise ClaimError(400, "reader must be 1-64 letters, digits or . _ @ -")
    return reader


def _held_by(reader: str, now: datetime) -> ColumnElement[bool]:
    return and_(
        StudyRow.read_state == ReadState.claimed,
        StudyRow.claimed_by == reader,
        StudyRow.claim_expires_at >= now,
    )


def _explain(s: Session, study_uid: str, reader: str, now: datetime) -> ClaimError:
    row = s.execute(
        select(StudyRow.read_state, StudyRow.claimed_by, StudyRow.claim_expires_at).where(
            StudyRow.StudyInstanceUID == study_uid
        )
    ).first()
    if row is None:
        return ClaimError(404, "unknown StudyInstanceUID")
    state, holder, _expires = row
    if state == "completed":
        return ClaimError(409, "the study has been read already")
    if state == "claimed" and holder != reader:
        return ClaimError(409, f"the study is being read by {holder}")
    return ClaimError(409, "the study is not claimed by this reader (the lease may have expired)")


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


Record = Callable[[Connection, str], None]
"""Called with the transaction's connection and the study's UID once a change is made and
before it commits: the audit record of the change commits with it (one commit, not two)."""


def _transition(
    db: Database,
    study_uid: str,
    reader: str,
    now: datetime,
    condition: ColumnElement[bool],
    values: dict[str, Any],
    record: Record | None = None,
) -> None:
    """One conditional UPDATE of a study's claim; an explained ClaimError when it fails."""
    check_reader(reader)
    with db.session() as s:
        result = s.execute(
            update(StudyRow)
            .where(StudyRow.StudyInstanceUID == study_uid, condition)
            .values(**values)
        )
        if _rowcount(result) != 1:
            raise _explain(s, study_uid, reader, now)
        if record is not None:
            record(s.connection(), study_uid)


def claim(
    db: Database,
    study_uid: str,
    reader: str,
    *,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
    record: Record | None = None,
) -> datetime:
    """Claim one study (or renew the reader's own claim). Returns the lease's end."""
    now = now or datetime.now(UTC)
    expires = now + lease
    values = {"read_state": ReadState.claimed, "claimed_by": reader, "claim_expires_at": expires}
    condition = or_(claimable(now), _held_by(reader, now))
    _transition(db, study_uid, reader, now, condition, values, record)
    return expires


def renew(
    db: Database,
    study_uid: str,
    reader: str,
    *,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
    record: Record | None = None,
) -> datetime:
    """Extend the reader's own lease (409 when it is not theirs any more)."""
    now = now or datetime.now(UTC)
    expires = now + lease
    values = {"claim_expires_at": expires}
    _transition(db, study_uid, reader, now, _held_by(reader, now), values, record)
    return expires


def release(
    db: Database,
    study_uid: str,
    reader: str,
    *,
    now: datetime | None = None,
    record: Record | None = None,
) -> None:
    """Give the study back to the queue, unread."""
    now = now or datetime.now(UTC)
    values = {"read_state": ReadState.unread, "claimed_by": None, "claim_expires_at": None}
    _transition(db, study_uid, reader, now, _held_by(reader, now), values, record)


def complete(
    db: Database,
    study_uid: str,
    reader: str,
    *,
    now: datetime | None = None,
    record: Record | None = None,
) -> None:
    """Mark the study read by the reader holding it."""
    now = now or datetime.now(UTC)
    values = {
        "read_state": ReadState.completed,
        "completed_by": reader,
        "completed_at": now,
        "claim_expires_at": None,
        **rank.read_placement(now),  # after the waiting studies, the latest read first
    }
    _transition(db, study_uid, reader, now, _held_by(reader, now), values, record)


def claim_next(
    db: Database,
    reader: str,
    *,
    modalities: Sequence[str] = (),
    subspecialties: Sequence[str] = (),
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
    config: PolicyConfig = DEFAULT_POLICY,
    record: Record | None = None,
) -> dict[str, Any] | None:
    """Claim the first study in reading order that the reader may take (filters applied).

    The order is the one kept in the database (:mod:`triage.worklist.rank`): the first
    claimable row of the index, locked with ``SKIP LOCKED`` on PostgreSQL so that readers
    asking at the same moment take the next rows instead of waiting for one another; on
    SQLite writes are serial and a lost race (the conditional UPDATE finds the study taken)
    moves on to the next row.

    Returns:
        The worklist item of the claimed study (with ``claim_expires_at`` and its ``rank``
        among the waiting studies the filters admit), or None when nothing is waiting.
    """
    from triage.worklist import service

    check_reader(reader)
    with db.session() as s:
        now = service.ranked(s, now, config)
    expires = now + lease
    conditions = [claimable(now), *rank.filters(modalities, subspecialties)]
    skipped: list[int] = []
    while True:
        with db.session() as s:
            stmt = select(StudyRow.id).where(*conditions)
            if skipped:
                stmt = stmt.where(StudyRow.id.not_in(skipped))
            study_id = s.scalar(
                stmt.order_by(*rank.RANK_ORDER).limit(1).with_for_update(skip_locked=True)
            )
            if study_id is None:
                return None
            result = s.execute(
                update(StudyRow)
                .where(StudyRow.id == study_id, claimable(now))
                .values(read_state=ReadState.claimed, claimed_by=reader, claim_expires_at=expires)
            )
            if _rowcount(result) != 1:
                skipped.append(study_id)  # another reader took it first (SQLite)
                continue
            study = s.scalars(
                select(StudyRow).where(StudyRow.id == study_id).options(*service.ITEM_LOADS)
            ).one()
            if record is not None:
                record(s.connection(), study.StudyInstanceUID)
            return service.study_item(
                s, study, now, modalities=modalities, subspecialties=subspecialties
            )
