"""Worklist priority: a pure function of (study context, AI findings, now) -> order + reasons.

Policy ``v2``:

1. **Base class** from the order (RequestedProcedurePriority / StudyPriorityID: STAT ->
   ``stat``, HIGH/URGENT/ASAP -> ``urgent``, otherwise ``routine``) and the patient's
   location (an emergency department lifts a study to at least ``urgent``).
2. **AI escalation**: each flagged finding whose score reaches its configured confidence
   lifts the study to the finding's class (the default rules come from the installed models'
   specs: intracranial haemorrhage and pneumothorax -> ``critical``). Escalation only ever
   raises the class: AI never lowers a study.
3. **Deadline** = arrival + the service-level time of the study's class.
4. **Order** (first to last):
   ``critical`` studies, **severe first** (a flagged finding graded ``high``, e.g. a
   haemorrhage of 30 ml or more or with intraventricular blood), then earliest deadline
   first; then studies **past their deadline**,
   earliest deadline first (no study waits without bound); then studies **due soon** (in the
   last ``aging_fraction`` of their service-level time), earliest deadline first; then the
   rest by class (stat, urgent, routine) and arrival. Ties: arrival, then StudyInstanceUID,
   so the order is total and does not depend on input order.

Every placement carries its reason codes, class and deadline. The configuration is a
:class:`PolicyConfig` (defaults from common teleradiology service levels); its version and
a hash of its content are reported with every worklist so a position can be audited.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from triage.domain import SEVERITY_RANK, Finding, Severity
from triage.models.catalog import finding_specs

POLICY_VERSION = "v2"

CLASSES: tuple[str, ...] = ("critical", "stat", "urgent", "routine")
"""Priority classes, most urgent first."""

_ORDER_CLASS: dict[str, str] = {
    "STAT": "stat",
    "HIGH": "urgent",
    "URGENT": "urgent",
    "ASAP": "urgent",
    "MEDIUM": "routine",
    "MED": "routine",
    "ROUTINE": "routine",
    "LOW": "routine",
}


class FindingRule(BaseModel):
    """How one AI finding escalates a study."""

    escalate_to: str = "critical"
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)


class PolicyConfig(BaseModel):
    """The configurable parts of the policy (JSON/TOML-friendly).

    Attributes:
        sla_minutes: reading-order deadline per class, in minutes (the deadline is arrival
            plus this; a study starts to age towards it). Defaults: critical 15 min, and 60 min
            for stat, urgent and routine alike. These are not contractual turnaround times
            (routine is often 24 h): measured with ``triage simulate`` (docs/simulation.md),
            a routine deadline of 24 h lets stat and urgent studies starve routine ones (the
            worst routine wait grows to 2.7x FIFO's), while one deadline for every
            non-critical class keeps the order stat, urgent, routine for fresh studies and
            serves any study near its deadline oldest first (worst wait 1.08x FIFO's).
        aging_fraction: a study enters "due soon" when less than this fraction of its
            service-level time is left.
        findings: finding code -> escalation rule. The installed models' specs give the
            defaults (each finding's ``escalate_to``); a policy file's rules are laid over them.
        location_classes: patient location class -> the class it lifts a study to.
    """

    sla_minutes: dict[str, float] = Field(
        default_factory=lambda: {"critical": 15.0, "stat": 60.0, "urgent": 60.0, "routine": 60.0}
    )
    aging_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    findings: dict[str, FindingRule] = Field(default_factory=lambda: default_finding_rules())
    location_classes: dict[str, str] = Field(default_factory=lambda: {"emergency": "urgent"})

    @model_validator(mode="after")
    def _known_classes(self) -> PolicyConfig:
        self.findings = {**default_finding_rules(), **self.findings}
        for name in self.sla_minutes:
            if name not in CLASSES:
                raise ValueError(f"sla_minutes: unknown class {name!r} (classes: {CLASSES})")
        missing = [c for c in CLASSES if c not in self.sla_minutes]
        if missing:
            raise ValueError(f"sla_minutes: no service-level time for {missing}")
        targets = [r.escalate_to for r in self.findings.values()]
        for target in [*targets, *self.location_classes.values()]:
            if target not in CLASSES:
                raise ValueError(f"unknown priority class {target!r} (classes: {CLASSES})")
        return self

    def digest(self) -> str:
        """A short hash of the configuration, reported with each worklist."""
        text = json.dumps(self.model_dump(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_finding_rules() -> dict[str, FindingRule]:
    """Escalation rules from the installed models' specs (findings that raise priority)."""
    return {
        code: FindingRule(escalate_to=f.escalate_to)
        for code, f in finding_specs().items()
        if f.escalate_to is not None
    }


DEFAULT_POLICY = PolicyConfig()


@dataclass(frozen=True)
class StudyContext:
    """What the policy knows about a study."""

    StudyInstanceUID: str
    arrived_at: datetime
    order_priority: str | None = None
    findings: Sequence[Finding] = field(default_factory=tuple)
    location: str | None = None  # "emergency", "inpatient" or None


@dataclass(frozen=True)
class Placement:
    """A study's place: rank (1 = read first), class, deadline and the reasons."""

    StudyInstanceUID: str
    rank: int
    reasons: list[str]
    priority_class: str
    deadline: datetime
    tier: str
    sort_key: tuple[Any, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "reasons": list(self.reasons),
            "priority_class": self.priority_class,
            "deadline": self.deadline.isoformat(),
            "tier": self.tier,
        }


def _rank(cls: str) -> int:
    return CLASSES.index(cls) if cls in CLASSES else len(CLASSES) - 1


def _escalating(ctx: StudyContext, config: PolicyConfig) -> list[tuple[Finding, FindingRule]]:
    """The flagged findings whose rule applies (score at or above its minimum)."""
    out = []
    for f in ctx.findings:
        rule = config.findings.get(str(f.finding))
        if rule is not None and f.flag and f.score >= rule.min_score:
            out.append((f, rule))
    return out


def severity(ctx: StudyContext, config: PolicyConfig = DEFAULT_POLICY) -> str | None:
    """The most severe grade among the findings that make the study critical (None when no
    such finding is graded)."""
    graded = [
        f.severity
        for f, rule in _escalating(ctx, config)
        if rule.escalate_to == "critical" and f.severity is not None
    ]
    return min(graded, key=lambda s: SEVERITY_RANK.get(s, len(SEVERITY_RANK)), default=None)


def classify(ctx: StudyContext, config: PolicyConfig = DEFAULT_POLICY) -> tuple[str, list[str]]:
    """The study's class and the reason codes that set it (AI escalation included)."""
    reasons: list[str] = []
    order = (ctx.order_priority or "").strip().upper()
    cls = _ORDER_CLASS.get(order, "routine")
    if cls != "routine":
        reasons.append(f"order:{cls}")
    lifted = config.location_classes.get(ctx.location or "")
    if lifted is not None and _rank(lifted) < _rank(cls):
        cls = lifted
        reasons.append(f"location:{ctx.location}")
    for f, rule in _escalating(ctx, config):
        reason = f"ai:{f.finding}"
        if reason not in reasons:
            reasons.append(reason)
        if _rank(rule.escalate_to) < _rank(cls):
            cls = rule.escalate_to
    return cls, reasons


def place(
    ctx: StudyContext, now: datetime, config: PolicyConfig = DEFAULT_POLICY
) -> tuple[tuple[Any, ...], str, datetime, str, list[str]]:
    """(sort key, class, deadline, tier, reasons) of one study at ``now``."""
    cls, reasons = classify(ctx, config)
    sla = timedelta(minutes=float(config.sla_minutes.get(cls, config.sla_minutes["routine"])))
    deadline = ctx.arrived_at + sla
    arrived = ctx.arrived_at.timestamp()
    severity_rank = SEVERITY_RANK[Severity.standard.value]
    if cls == "critical":
        tier, tier_rank = "critical", 0
        grade = severity(ctx, config)
        if grade is not None:
            severity_rank = SEVERITY_RANK.get(grade, severity_rank)
            if grade == Severity.high.value:
                reasons.append(f"severity:{grade}")
    elif now > deadline:
        tier, tier_rank = "overdue", 1
        reasons.append("aging:overdue")
    elif now >= deadline - sla * config.aging_fraction:
        tier, tier_rank = "due_soon", 2
        reasons.append("aging:due_soon")
    else:
        tier, tier_rank = "queued", 3
    reasons.append("arrival")
    if tier_rank < 3:
        key: tuple[Any, ...] = (
            tier_rank,
            severity_rank,
            deadline.timestamp(),
            _rank(cls),
            arrived,
            ctx.StudyInstanceUID,
        )
    else:
        key = (tier_rank, severity_rank, _rank(cls), arrived, arrived, ctx.StudyInstanceUID)
    return key, cls, deadline, tier, reasons


def rank_studies(
    studies: Sequence[StudyContext], now: datetime, config: PolicyConfig = DEFAULT_POLICY
) -> list[Placement]:
    """Order studies for reading.

    Args:
        studies: every study waiting to be read.
        now: the evaluation time (deadlines and aging are relative to it).
        config: the policy's configuration.

    Returns:
        Placements in reading order, ``rank`` starting at 1. The order is total and does not
        depend on the input order.
    """
    keyed = []
    for ctx in studies:
        key, cls, deadline, tier, reasons = place(ctx, now, config)
        keyed.append((key, cls, deadline, tier, reasons, ctx))
    keyed.sort(key=lambda item: item[0])
    return [
        Placement(ctx.StudyInstanceUID, rank, reasons, cls, deadline, tier, key)
        for rank, (key, cls, deadline, tier, reasons, ctx) in enumerate(keyed, start=1)
    ]


def load_policy(path: Path | None) -> PolicyConfig:
    """The policy configuration from a TOML or JSON file; the defaults when ``path`` is None.

    Raises:
        ValueError: the file is not valid TOML/JSON or does not describe a policy (the message
            names the field).
    """
    if path is None:
        return DEFAULT_POLICY
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        return PolicyConfig.model_validate(data)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"policy file {path.name}: {exc}") from exc


def policy_document(config: PolicyConfig = DEFAULT_POLICY) -> Mapping[str, Any]:
    """The policy's name, version and configuration hash (reported with the worklist)."""
    return {"version": POLICY_VERSION, "config_sha256": config.digest()}
