from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from triage.domain import Finding, ModelRef
from triage.worklist.priority import StudyContext, rank_studies

T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
MODEL = ModelRef("blast-ct", "1")


def ich(flag: bool) -> Finding:
    vols = {"IPH": 20.0 if flag else 0.0, "EAH": 0.0, "oedema": 0.0, "IVH": 0.0}
    return Finding("intracranial_haemorrhage", flag, 0.9 if flag else 0.01, vols, MODEL)


def ctx(uid: str, minutes: int, priority: str | None = None, *findings: Finding) -> StudyContext:
    return StudyContext(uid, T0 + timedelta(minutes=minutes), priority, tuple(findings))


def test_critical_finding_first_then_order_priority_then_arrival() -> None:
    studies = [
        ctx("1.1", 0),
        ctx("1.2", 1, "STAT"),
        ctx("1.3", 2, None, ich(False)),
        ctx("1.4", 3, None, ich(True)),
        ctx("1.5", 4, "HIGH"),
    ]
    placed = rank_studies(studies, T0)
    assert [p.StudyInstanceUID for p in placed] == ["1.4", "1.2", "1.5", "1.1", "1.3"]
    assert [p.rank for p in placed] == [1, 2, 3, 4, 5]
    by_uid = {p.StudyInstanceUID: p for p in placed}
    assert by_uid["1.4"].reasons == ["ai:intracranial_haemorrhage", "arrival"]
    assert by_uid["1.2"].reasons == ["order:stat", "arrival"]
    assert by_uid["1.5"].reasons == ["order:urgent", "arrival"]
    assert by_uid["1.3"].reasons == ["arrival"]


def test_unflagged_finding_never_lowers_a_study() -> None:
    with_ai = rank_studies([ctx("1.1", 0, None, ich(False)), ctx("1.2", 5)], T0)
    without = rank_studies([ctx("1.1", 0), ctx("1.2", 5)], T0)
    assert [p.StudyInstanceUID for p in with_ai] == [p.StudyInstanceUID for p in without]


def test_order_is_total_and_independent_of_input_order() -> None:
    rng = random.Random(7)
    studies = [
        ctx(f"1.{i}", rng.randint(0, 5), rng.choice([None, "STAT", "LOW"]), ich(rng.random() < 0.3))
        for i in range(40)
    ]
    expected = [p.StudyInstanceUID for p in rank_studies(studies, T0)]
    for _ in range(5):
        rng.shuffle(studies)
        assert [p.StudyInstanceUID for p in rank_studies(studies, T0)] == expected
