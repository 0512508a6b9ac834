"""Worklist priority: a pure function of (study context, AI findings, now) -> order + reasons.

Policy ``v1`` (issue 2): studies with a critical AI finding first, then by the order's
priority where the study carries one, then by arrival (oldest first). AI can only raise a
study's place, never lower it: a failed or pending analysis leaves the study at its normal
place ("fail open").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from triage.domain import Finding, FindingCode, ReasonCode

POLICY_VERSION = "v1"

# Findings that make a study critical, with the reason code they carry.
CRITICAL_FINDINGS: dict[str, ReasonCode] = {
    FindingCode.intracranial_haemorrhage: ReasonCode.ai_intracranial_haemorrhage,
}

# Order priorities as senders spell them (RequestedProcedurePriority, StudyPriorityID).
_ORDER_RANK: dict[str, tuple[int, ReasonCode | None]] = {
    "STAT": (0, ReasonCode.priority_stat),
    "HIGH": (1, ReasonCode.priority_urgent),
    "URGENT": (1, ReasonCode.priority_urgent),
    "ASAP": (1, ReasonCode.priority_urgent),
    "MEDIUM": (2, None),
    "MED": (2, None),
    "ROUTINE": (2, None),
    "LOW": (3, None),
}
_DEFAULT_ORDER_RANK = 2


@dataclass(frozen=True)
class StudyContext:
    """What the policy knows about a study."""

    StudyInstanceUID: str
    arrived_at: datetime
    order_priority: str | None = None
    findings: Sequence[Finding] = field(default_factory=tuple)


@dataclass(frozen=True)
class Placement:
    StudyInstanceUID: str
    rank: int
    reasons: list[str]
    sort_key: tuple[int, int, float, str]


def _key_and_reasons(ctx: StudyContext) -> tuple[tuple[int, int, float, str], list[str]]:
    reasons: list[str] = []
    critical = 1
    for f in ctx.findings:
        code = CRITICAL_FINDINGS.get(f.finding)
        if f.flag and code is not None:
            critical = 0
            if code.value not in reasons:
                reasons.append(code.value)
    order_rank, order_reason = _ORDER_RANK.get(
        (ctx.order_priority or "").strip().upper(), (_DEFAULT_ORDER_RANK, None)
    )
    if order_reason is not None:
        reasons.append(order_reason.value)
    reasons.append(ReasonCode.arrival.value)
    key = (critical, order_rank, ctx.arrived_at.timestamp(), ctx.StudyInstanceUID)
    return key, reasons


def rank_studies(studies: Sequence[StudyContext], now: datetime) -> list[Placement]:
    """Order studies for reading.

    Args:
        studies: every study on the worklist.
        now: the evaluation time (policy v1 does not age studies yet; kept for the API).

    Returns:
        Placements in reading order, ``rank`` starting at 1. The order is total (ties broken
        by arrival, then StudyInstanceUID) and does not depend on the input order.
    """
    del now
    keyed = [(*_key_and_reasons(ctx), ctx) for ctx in studies]
    keyed.sort(key=lambda item: item[0])
    return [
        Placement(ctx.StudyInstanceUID, rank, reasons, key)
        for rank, (key, reasons, ctx) in enumerate(keyed, start=1)
    ]
