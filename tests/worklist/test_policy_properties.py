"""Properties of priority policy v2, checked with hypothesis on random worklists."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from triage.domain import Finding, ModelRef
from triage.worklist.priority import (
    CLASSES,
    DEFAULT_POLICY,
    PolicyConfig,
    StudyContext,
    classify,
    place,
    rank_studies,
    severity,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MODEL = ModelRef("blast-ct", "1")

findings = st.builds(
    Finding,
    finding=st.sampled_from(["intracranial_haemorrhage", "pneumothorax"]),
    flag=st.booleans(),
    score=st.floats(0.0, 1.0),
    volumes_ml=st.just({}),
    model=st.just(MODEL),
    severity=st.sampled_from([None, "high", "standard"]),
)
contexts = st.builds(
    StudyContext,
    StudyInstanceUID=st.from_regex(r"1\.2\.[0-9]{1,6}", fullmatch=True),
    arrived_at=st.integers(0, 3 * 24 * 60).map(lambda m: NOW - timedelta(minutes=m)),
    order_priority=st.sampled_from([None, "STAT", "HIGH", "ROUTINE", "LOW", "URGENT", "weird"]),
    findings=st.lists(findings, max_size=3).map(tuple),
    location=st.sampled_from([None, "emergency", "inpatient"]),
)
worklists = st.lists(contexts, max_size=25, unique_by=lambda c: c.StudyInstanceUID)
configs = st.builds(
    PolicyConfig,
    aging_fraction=st.floats(0.0, 1.0),
    sla_minutes=st.fixed_dictionaries({c: st.floats(1.0, 3000.0) for c in CLASSES}),
)


def without_ai(ctx: StudyContext) -> StudyContext:
    return StudyContext(ctx.StudyInstanceUID, ctx.arrived_at, ctx.order_priority, (), ctx.location)


@given(worklists, st.data())
@settings(max_examples=200, deadline=None)
def test_ai_never_lowers_a_study(studies: list[StudyContext], data: st.DataObject) -> None:
    """Adding a study's AI findings never moves it down relative to any other study."""
    if not studies:
        return
    target = data.draw(st.sampled_from(studies))
    others = [s for s in studies if s is not target]
    with_ai = rank_studies([*others, target], NOW)
    without = rank_studies([*others, without_ai(target)], NOW)
    rank_with = next(p.rank for p in with_ai if p.StudyInstanceUID == target.StudyInstanceUID)
    rank_without = next(p.rank for p in without if p.StudyInstanceUID == target.StudyInstanceUID)
    assert rank_with <= rank_without
    cls_with, _ = classify(target)
    cls_without, _ = classify(without_ai(target))
    assert CLASSES.index(cls_with) <= CLASSES.index(cls_without)


def without_severity(ctx: StudyContext) -> StudyContext:
    graded = tuple(dataclasses.replace(f, severity=None) for f in ctx.findings)
    return dataclasses.replace(ctx, findings=graded)


@given(worklists, configs)
@settings(max_examples=200, deadline=None)
def test_a_severe_critical_study_never_ranks_below_a_non_severe_one(
    studies: list[StudyContext], config: PolicyConfig
) -> None:
    """Among critical studies (one deadline tier), a study with a finding graded high comes
    before every critical study without one, whatever their deadlines and arrivals."""
    by_uid = {c.StudyInstanceUID: c for c in studies}
    placed = rank_studies(studies, NOW, config)
    critical = [p for p in placed if p.tier == "critical"]
    grades = [severity(by_uid[p.StudyInstanceUID], config) for p in critical]
    for i, grade in enumerate(grades):
        if grade == "high":
            assert all(g == "high" for g in grades[:i]), grades
            assert "severity:high" in critical[i].reasons


@given(worklists, st.data())
@settings(max_examples=200, deadline=None)
def test_severity_never_lowers_a_study(studies: list[StudyContext], data: st.DataObject) -> None:
    """Grading a study's findings never moves it down, nor changes its class."""
    if not studies:
        return
    target = data.draw(st.sampled_from(studies))
    others = [s for s in studies if s is not target]
    graded = rank_studies([*others, target], NOW)
    ungraded = rank_studies([*others, without_severity(target)], NOW)
    rank_with = next(p.rank for p in graded if p.StudyInstanceUID == target.StudyInstanceUID)
    rank_without = next(p.rank for p in ungraded if p.StudyInstanceUID == target.StudyInstanceUID)
    assert rank_with <= rank_without
    assert classify(target)[0] == classify(without_severity(target))[0]


@given(worklists, configs)
@settings(max_examples=200, deadline=None)
def test_overdue_ranks_above_every_non_critical_study_that_is_not(
    studies: list[StudyContext], config: PolicyConfig
) -> None:
    placed = rank_studies(studies, NOW, config)
    for i, a in enumerate(placed):
        for b in placed[i + 1 :]:
            # b is after a: b must not be overdue while a is a non-critical, non-overdue study
            if b.tier == "overdue":
                assert a.tier in ("critical", "overdue"), (a, b)


@given(worklists, configs, st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_order_is_total_and_stable_under_re_evaluation(
    studies: list[StudyContext], config: PolicyConfig, rnd: object
) -> None:
    first = rank_studies(studies, NOW, config)
    shuffled = list(studies)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    again = rank_studies(shuffled, NOW, config)
    assert [p.StudyInstanceUID for p in first] == [p.StudyInstanceUID for p in again]
    keys = [p.sort_key for p in first]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)  # strict: no ties
    assert [p.rank for p in first] == list(range(1, len(first) + 1))


@given(contexts)
@settings(max_examples=200, deadline=None)
def test_every_position_is_explained(ctx: StudyContext) -> None:
    _key, cls, deadline, tier, reasons = place(ctx, NOW, DEFAULT_POLICY)
    assert reasons and reasons[-1] == "arrival"
    assert deadline > ctx.arrived_at
    if cls == "critical":
        assert any(r.startswith("ai:") for r in reasons)
    if tier == "overdue":
        assert "aging:overdue" in reasons and NOW > deadline


def test_no_study_waits_without_bound() -> None:
    """A routine study that arrived first is read before a stream of new urgent studies once
    it is past its deadline."""
    old = StudyContext("1.1", NOW - timedelta(hours=25))
    stream = [StudyContext(f"2.{i}", NOW - timedelta(minutes=i), "HIGH") for i in range(1, 20)]
    placed = rank_studies([*stream, old], NOW)
    assert placed[0].StudyInstanceUID == "1.1" and placed[0].tier == "overdue"
