"""The queue simulator: draws, the event loop, the triage discipline and the metrics."""

from __future__ import annotations

import math
import random

import pytest

from triage.simulate.config import SimulationConfig
from triage.simulate.model import (
    ReadRecord,
    SimStudy,
    TriageQueue,
    at,
    generate_studies,
    group_stats,
    run_day,
    simulate,
    summarise,
)
from triage.worklist.priority import PolicyConfig, rank_studies

SMALL = {"studies_per_day": 200, "radiologists": 1}


def small(**kw: object) -> SimulationConfig:
    return SimulationConfig.model_validate({**SMALL, **kw})


def study(
    i: int,
    arrival: float,
    read: float,
    *,
    priority: str = "ROUTINE",
    location: str | None = None,
    critical: bool = False,
    flag: bool = False,
    latency: float = 1.0,
) -> SimStudy:
    return SimStudy(
        index=i,
        uid=f"sim.{i:06d}",
        arrival=arrival,
        modality="CT head",
        order_priority=priority,
        location=location,
        critical=critical,
        ai_covered=True,
        ai_flag=flag,
        ai_ready=arrival + latency,
        read_minutes=read,
    )


def test_same_seed_same_day_and_other_seed_other_day() -> None:
    cfg = small(seed=11)
    assert generate_studies(cfg) == generate_studies(cfg)
    assert generate_studies(cfg) != generate_studies(cfg, seed=12)
    assert run_day(cfg, 11).to_json() == run_day(cfg, 11).to_json()


def test_draws_follow_the_configuration() -> None:
    cfg = SimulationConfig(seed=3)  # 2,000 studies; drawing them is cheap
    studies = generate_studies(cfg)
    assert len(studies) == 2000
    arrivals = [s.arrival for s in studies]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 24 * 60
    crit = [s for s in studies if s.critical]
    others = [s for s in studies if not s.critical]
    assert 0.035 < len(crit) / len(studies) < 0.065
    assert 0.8 < sum(s.ai_flag for s in crit) / len(crit) <= 1.0
    assert 0.03 < sum(s.ai_flag for s in others) / len(others) < 0.07
    for s in studies:
        spec = cfg.modalities[s.modality]
        assert 0 < s.read_minutes <= (spec.max_minutes or math.inf)
        assert s.ai_ready == pytest.approx(s.arrival + cfg.ai_latency_minutes)
    # More arrivals at the daytime peak than in the night trough.
    night = sum(3 * 60 <= a < 6 * 60 for a in arrivals)
    day = sum(11 * 60 <= a < 14 * 60 for a in arrivals)
    assert day > 2.5 * night


def test_ai_sees_only_the_covered_modalities() -> None:
    studies = generate_studies(SimulationConfig(ai_modalities=["CT head"], seed=1))
    assert all(s.ai_covered == (s.modality == "CT head") for s in studies)
    assert not any(s.ai_flag for s in studies if s.modality != "CT head")
    assert all(math.isinf(s.ai_ready) for s in studies if s.modality != "CT head")


def test_fifo_serves_in_arrival_order_and_every_study_is_read() -> None:
    cfg = small(radiologists=2, seed=5)
    studies = generate_studies(cfg)
    log = simulate(studies, cfg, "fifo")
    assert len(log.records) == len(studies)
    starts = [r.start for r in sorted(log.records, key=lambda r: r.arrival)]
    assert starts == sorted(starts)
    assert all(r.start >= r.arrival for r in log.records)


def test_both_disciplines_read_the_same_studies_with_the_same_read_times() -> None:
    cfg = small(seed=2)
    studies = generate_studies(cfg)
    fifo, tri = simulate(studies, cfg, "fifo"), simulate(studies, cfg, "triage")
    assert [r.read_minutes for r in fifo.records] == [r.read_minutes for r in tri.records]
    assert fifo.busy_minutes == pytest.approx(tri.busy_minutes)
    # One reader, work-conserving: the reader is never idle while studies wait.
    assert fifo.end == pytest.approx(tri.end)


def test_hand_made_day_fifo_and_triage() -> None:
    cfg = small()
    studies = [
        study(0, 0.0, 10.0),
        study(1, 1.0, 5.0),
        study(2, 2.0, 5.0, critical=True, flag=True),
    ]
    fifo = {r.index: r.start for r in simulate(studies, cfg, "fifo").records}
    tri = {r.index: r.start for r in simulate(studies, cfg, "triage").records}
    no_ai = {r.index: r.start for r in simulate(studies, cfg, "policy_no_ai").records}
    assert fifo == {0: 0.0, 1: 10.0, 2: 15.0}
    assert tri == {0: 0.0, 1: 15.0, 2: 10.0}
    assert no_ai == fifo  # all routine: without the flag the policy reads by arrival


def test_the_ai_result_counts_only_after_its_latency() -> None:
    cfg = small()
    # The reader frees up at 10; the flag of study 2 is available only at 12.
    studies = [
        study(0, 0.0, 10.0),
        study(1, 1.0, 5.0),
        study(2, 2.0, 5.0, critical=True, flag=True, latency=10.0),
    ]
    tri = {r.index: r.start for r in simulate(studies, cfg, "triage").records}
    assert tri == {0: 0.0, 1: 10.0, 2: 15.0}


def _random_study(rng: random.Random, i: int, now: float) -> SimStudy:
    return study(
        i,
        now,
        rng.uniform(1, 20),
        priority=rng.choice(["STAT", "URGENT", "ROUTINE", "LOW", "HIGH"]),
        location=rng.choice([None, "emergency", "inpatient"]),
        critical=(c := rng.random() < 0.2),
        flag=rng.random() < (0.9 if c else 0.1),
        latency=rng.choice([0.0, 0.5, 3.0]),
    )


POLICIES = [
    PolicyConfig(),
    PolicyConfig(sla_minutes={"critical": 5.0, "stat": 10.0, "urgent": 20.0, "routine": 40.0}),
    PolicyConfig(
        aging_fraction=0.0,
        sla_minutes={"critical": 5.0, "stat": 10.0, "urgent": 20.0, "routine": 40.0},
    ),
    PolicyConfig(
        aging_fraction=1.0,
        sla_minutes={"critical": 15.0, "stat": 15.0, "urgent": 15.0, "routine": 15.0},
    ),
]


@pytest.mark.parametrize("policy", POLICIES)
def test_fast_pick_is_rank_studies_first_on_random_states(policy: PolicyConfig) -> None:
    rng = random.Random(int(policy.digest(), 16))
    queue = TriageQueue(policy, "intracranial_haemorrhage")
    pending_ai: list[SimStudy] = []
    now, index, checked = 0.0, 0, 0
    for _ in range(600):
        now += rng.choice([0.0, rng.expovariate(1.0), rng.uniform(0, 8)])
        for s in [s for s in pending_ai if s.ai_ready <= now]:
            queue.ai_result(s, s.ai_ready if rng.random() < 0.5 else now)
            pending_ai.remove(s)
        action = rng.random()
        if action < 0.5 or not len(queue):
            s = _random_study(rng, index, now)
            index += 1
            queue.add(s, now)
            if s.ai_ready > now:
                pending_ai.append(s)
        else:
            ranked = rank_studies(queue.contexts(), at(now), policy)
            expected = ranked[0].StudyInstanceUID
            assert queue.peek(now).uid == expected
            # Every cached key is the policy's key at ``now``, not only the first.
            assert queue.keys(now) == [p.sort_key for p in ranked]
            checked += 1
            if action > 0.8:
                assert queue.pop(now).uid == expected
    assert checked > 100


@pytest.mark.parametrize(
    ("policy", "discipline"),
    [(p, "triage") for p in POLICIES[:3]] + [(POLICIES[1], "policy_no_ai")],
)
def test_fast_triage_simulation_equals_rank_studies_at_every_pick(
    policy: PolicyConfig, discipline: str
) -> None:
    cfg = small(studies_per_day=300, duration_hours=12.0, radiologists=2, policy=policy, seed=4)
    studies = generate_studies(cfg)
    fast = simulate(studies, cfg, discipline)
    slow = simulate(studies, cfg, discipline, reference=True)
    assert [r.start for r in fast.records] == [r.start for r in slow.records]


def test_critical_studies_wait_less_under_triage_on_a_loaded_system() -> None:
    cfg = small(radiologists=1, prevalence=0.1, seed=8)
    result = run_day(cfg, 8)
    assert result.utilisation > 0.9
    fifo, tri = result.stats["fifo"]["critical"], result.stats["triage"]["critical"]
    assert fifo.n == tri.n > 5
    assert tri.median < 0.3 * fifo.median
    assert result.goal_critical_median
    assert tri.misses_true < fifo.misses_true


def test_metrics_of_a_hand_made_log() -> None:
    def rec(i: int, wait: float, critical: bool, sla_order: float, flagged: bool) -> ReadRecord:
        return ReadRecord(i, 100.0, 100.0 + wait, 5.0, critical, flagged, sla_order, 15.0)

    records = [
        rec(0, 0.0, True, 60.0, True),
        rec(1, 10.0, True, 30.0, True),
        rec(2, 20.0, True, 1440.0, False),  # missed by the AI, waits past 15 min
        rec(3, 40.0, False, 30.0, False),  # past its 30-min order deadline
        rec(4, 5.0, False, 60.0, True),
    ]
    s = summarise(records)
    crit = s["critical"]
    assert (crit.n, crit.median, crit.max, crit.mean) == (3, 10.0, 20.0, 10.0)
    assert crit.p95 == pytest.approx(19.0)  # linear: 10 + 0.9 * (20 - 10)
    assert (crit.misses_order, crit.misses_true) == (0, 1)
    others = s["others"]
    assert (others.n, others.median, others.max, others.misses_order) == (2, 22.5, 40.0, 1)
    assert others.p95 == pytest.approx(38.25)
    assert s["all"].n == 5 and s["all"].max == 40.0
    assert s["critical_ai_missed"].n == 1 and s["others_ai_flagged"].n == 1
    empty = group_stats([])
    assert empty.n == 0 and math.isnan(empty.median)
    assert empty.to_json()["median"] is None


def test_a_roster_with_nobody_on_duty_starts_no_reads() -> None:
    roster = [0] * 6 + [2] * 18  # nobody from 00:00 to 06:00
    cfg = small(radiologists_by_hour=roster, seed=6)
    log = simulate(generate_studies(cfg), cfg, "fifo")
    assert all(not (r.start % (24 * 60) < 6 * 60) for r in log.records)
    assert any(r.arrival < 6 * 60 for r in log.records)
