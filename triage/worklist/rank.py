"""The worklist's order, kept in the database so that reading it costs what a reader sees.

The pure policy (:mod:`triage.worklist.priority`) stays the single source of the order and
its reasons: :func:`refresh` runs ``priority.place`` for each study whose placement may have
changed and keeps the result on the study's row — the sort key (``rank_tier``,
``rank_severity``, ``rank_a``, ``rank_b``, ``rank_c``, then ``StudyInstanceUID``), class,
tier, deadline and reasons — with the moment it stops being true:

- a change of what the policy reads (a new study, a new series, an order priority, the AI's
  findings) sets ``rank_valid_until`` to :data:`RANK_STALE` in the transaction that makes
  the change (database triggers, migration 0010); the UPDATE that completes a study sets
  its placement after the waiting ones (:func:`read_placement`);
- a change of time alone (a queued study becoming due soon, a due-soon one overdue) is
  known in advance: ``rank_valid_until`` is that moment;
- a study ranked under another policy configuration (``rank_policy``, the configuration's
  digest) is ranked again.

Every read first refreshes the rows whose placement lapsed (an indexed range, usually
empty), then reads the order from the index ``ix_studies_rank``: a page, the next study for
a reader, or the total are index scans and counts, not a ranking of every waiting study.

Ties beyond the arrival time (to the microsecond) are broken by ``StudyInstanceUID`` in the
database's collation (the pure policy compares code points; PostgreSQL's collation may
order two such UIDs differently).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, tuple_
from sqlalchemy.orm import Session, selectinload

from triage.db.tables import StudyRow
from triage.domain import Finding, ReadState
from triage.preprocess.routing import regions_from_text
from triage.worklist.priority import DEFAULT_POLICY, PolicyConfig, StudyContext, place

READ_TIER = 9
"""``rank_tier`` of a study that has been read: after every waiting study."""
FOREVER = datetime(9999, 1, 1, tzinfo=UTC)
"""``rank_valid_until`` of a placement that time alone does not change."""
_BATCH = 500

RANK_ORDER = (
    StudyRow.rank_tier,
    StudyRow.rank_severity,
    StudyRow.rank_a,
    StudyRow.rank_b,
    StudyRow.rank_c,
    StudyRow.StudyInstanceUID,
)
"""The reading order: the columns of ``ix_studies_rank``."""


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_SUBSPECIALTY_OF_REGION = {
    "HEAD": "neuro",
    "NECK": "neuro",
    "SPINE": "msk",
    "CHEST": "chest",
    "ABDOMEN": "body",
    "PELVIS": "body",
    "EXTREMITY": "msk",
    "BREAST": "breast",
}


def subspecialties(study: StudyRow) -> list[str]:
    """Reading subspecialties of a study, from the body regions its series show."""
    regions: set[str] = set()
    routing = study.routing or {}
    for entry in (routing.get("series_regions") or {}).values():
        regions.update(entry.get("regions") or [])
    if not regions:
        for se in study.series:
            regions.update(regions_from_text(se.BodyPartExamined or "", se.SeriesDescription or ""))
        regions.update(regions_from_text("", study.StudyDescription or ""))
    found = sorted({_SUBSPECIALTY_OF_REGION.get(r, "general") for r in regions})
    return found or ["general"]


def modalities(study: StudyRow) -> list[str]:
    """The modalities of a study's series, sorted."""
    return sorted({se.Modality for se in study.series if se.Modality})


def _tags(values: Sequence[str]) -> str:
    return "|" + "|".join(values) + "|" if values else ""


def kept_tags(value: str | None) -> list[str] | None:
    """The values of a kept ``|A|B|`` column (None when it has not been computed)."""
    if value is None:
        return None
    return [v for v in value.split("|") if v]


def context_of(study: StudyRow, now: datetime) -> StudyContext:
    """What the priority policy sees of a study."""
    return StudyContext(
        StudyInstanceUID=study.StudyInstanceUID,
        arrived_at=_utc(study.first_received_at) or now,
        order_priority=study.order_priority,
        findings=[Finding.from_json(f.payload) for f in study.findings],
        location=study.location_class,
    )


def _valid_until(tier: str, deadline: datetime, sla: timedelta, config: PolicyConfig) -> datetime:
    """When time alone changes a placement of this tier (``priority.place``'s boundaries)."""
    if tier == "queued":
        return deadline - sla * config.aging_fraction  # due soon from then on
    if tier == "due_soon":
        return deadline + timedelta(microseconds=1)  # overdue once past the deadline
    return FOREVER  # critical and overdue stay so


def read_placement(completed_at: datetime) -> dict[str, Any]:
    """The kept sort key of a study read at ``completed_at``: after every waiting study, the
    latest read first (set by the UPDATE that completes it, which leaves
    ``rank_valid_until`` as it is: a study marked stale meanwhile, say by findings recorded
    while it was being read, is still ranked again for its class and reasons)."""
    return {
        "tier": "read",
        "rank_tier": READ_TIER,
        "rank_severity": 0,
        "rank_a": -completed_at.timestamp(),
        "rank_b": 0.0,
        "rank_c": 0.0,
    }


def rank_study(study: StudyRow, now: datetime, config: PolicyConfig) -> None:
    """Compute the study's placement with the policy and keep it on the row."""
    study.modalities = _tags(modalities(study))
    study.subspecialties = _tags(subspecialties(study))
    study.rank_policy = config.digest()
    study.rank_valid_from = now
    ctx = context_of(study, now)
    key, cls, deadline, tier, reasons = place(ctx, now, config)
    study.priority_class = cls
    study.deadline = deadline
    study.rank_reasons = reasons
    if study.read_state == ReadState.completed:
        for name, value in read_placement(_utc(study.completed_at) or now).items():
            setattr(study, name, value)
        study.rank_valid_until = FOREVER
        return
    sla = timedelta(minutes=float(config.sla_minutes.get(cls, config.sla_minutes["routine"])))
    study.tier = tier
    study.rank_tier, study.rank_severity = int(key[0]), int(key[1])
    study.rank_a, study.rank_b, study.rank_c = float(key[2]), float(key[3]), float(key[4])
    study.rank_valid_until = _valid_until(tier, deadline, sla, config)


def _lapsed_conditions(now: datetime, digest: str, *, past: bool) -> list[ColumnElement[bool]]:
    """Rows whose kept placement is not the policy's at ``now``: lapsed or marked stale, or
    ranked under another configuration; ``past``: also rows ranked after ``now`` (a caller
    evaluating an earlier moment)."""
    conditions = [
        StudyRow.rank_valid_until <= now,
        StudyRow.rank_policy < digest,
        StudyRow.rank_policy > digest,
        StudyRow.rank_policy.is_(None),
    ]
    if past:
        conditions.append(StudyRow.rank_valid_from > now)
    return conditions


def refresh(
    session: Session,
    now: datetime,
    config: PolicyConfig = DEFAULT_POLICY,
    *,
    past: bool = False,
) -> int:
    """Rank again every study whose kept placement lapsed (in the caller's transaction).

    The lapsed rows are found with one index range per condition (an OR of them would scan
    the table), usually all empty. They are then locked in id order (on PostgreSQL a reader
    that finds another ranking them waits for it, and the conditions, evaluated again on
    the rows it committed, leave them out: a study is never handed out, or left out, on a
    placement that is being replaced). Returns the number of studies ranked.
    """
    conditions = _lapsed_conditions(now, config.digest(), past=past)
    done = 0
    while True:
        ids: set[int] = set()
        for condition in conditions:
            ids.update(session.scalars(select(StudyRow.id).where(condition).limit(_BATCH)))
        if not ids:
            return done
        stmt = (
            select(StudyRow)
            .where(StudyRow.id.in_(sorted(ids)), or_(*conditions))
            .order_by(StudyRow.id)
            .options(selectinload(StudyRow.series), selectinload(StudyRow.findings))
            .with_for_update(of=StudyRow)
        )
        rows = list(session.scalars(stmt).all())
        for study in rows:
            rank_study(study, now, config)
        session.flush()
        done += len(rows)
        if len(ids) < _BATCH or not rows:
            return done


def waiting() -> ColumnElement[bool]:
    """Studies not read yet."""
    return StudyRow.read_state != ReadState.completed


def tag_filter(column: Any, wanted: Sequence[str]) -> ColumnElement[bool] | None:
    """Rows whose ``|A|B|`` column holds one of ``wanted`` (None: no filter)."""
    if not wanted:
        return None
    return or_(*[column.like(f"%|{w}|%") for w in wanted])


def filters(modalities_: Sequence[str], subspecialties_: Sequence[str]) -> list[Any]:
    """SQL conditions for the worklist's modality and subspecialty filters."""
    out: list[Any] = []
    m = tag_filter(StudyRow.modalities, sorted({x.upper() for x in modalities_}))
    if m is not None:
        out.append(m)
    sub = tag_filter(StudyRow.subspecialties, sorted({x.lower() for x in subspecialties_}))
    if sub is not None:
        out.append(sub)
    return out


def ahead_of(study: StudyRow) -> ColumnElement[bool]:
    """Rows before ``study`` in reading order."""
    return tuple_(*RANK_ORDER) < tuple_(
        study.rank_tier,
        study.rank_severity,
        study.rank_a,
        study.rank_b,
        study.rank_c,
        study.StudyInstanceUID,
    )


def placement(study: StudyRow, rank: int | None) -> dict[str, Any]:
    """The kept placement as the worklist item's fields (``priority.Placement.to_json``)."""
    deadline = _utc(study.deadline)
    return {
        "rank": rank,
        "reasons": list(study.rank_reasons or []),
        "priority_class": study.priority_class,
        "deadline": deadline.isoformat() if deadline else None,
        "tier": study.tier,
    }


def claimable(now: datetime) -> ColumnElement[bool]:
    """Unread, or claimed with an expired lease (an abandoned claim)."""
    return or_(
        StudyRow.read_state == ReadState.unread,
        and_(StudyRow.read_state == ReadState.claimed, StudyRow.claim_expires_at < now),
    )
