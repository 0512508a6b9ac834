"""Discrete-event simulation of a reading service: FIFO against the triage policy.

The model:

* Studies arrive over the configured hours (a Poisson process with an hourly profile,
  conditioned on the day's count). Each study has a modality, an order priority, a patient
  location, a true state (critical or not), an AI result (flag or not, with the configured
  sensitivity and specificity, for modalities a model covers) that becomes available
  ``ai_latency_minutes`` after arrival, and a read time (lognormal per modality).
* Every random quantity is drawn **once per study, before simulating**, so FIFO and triage
  see identical arrivals, AI results and read times (common random numbers).
* Radiologists are identical servers. Whenever one is free and studies wait, the reader takes
  the first study of the queue discipline at that moment: FIFO (arrival order) or the real
  policy, :func:`triage.worklist.priority.rank_studies`, evaluated at ``now`` on the studies
  waiting (without findings until the AI result is available). Reads are not interrupted.
* Wait = start of the read - arrival. Metrics for truly critical studies and for the others.

The triage discipline does not re-sort the whole queue at every pick: it keeps each waiting
study's sort key from :func:`triage.worklist.priority.place` in a heap and recomputes a key
only when it can change (the AI result arrives; the study reaches "due soon" or "overdue").
:class:`ReferenceTriageQueue` calls ``rank_studies`` at every pick; the tests check that both
pick the same study.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import numpy as np

from triage.domain import Finding, ModelRef
from triage.simulate.config import DEFAULT_RUNS, SWEEP_DEFAULT_RUNS, SimulationConfig
from triage.worklist.priority import PolicyConfig, StudyContext, place, rank_studies

T0 = datetime(2026, 1, 5, 0, 0, tzinfo=UTC)
"""Simulated midnight at the start of the day (minute 0)."""

_MINUTE = timedelta(minutes=1)
_AI_MODEL = ModelRef("simulated-ai", "1")
# Re-check a study's key this many minutes before its computed tier change (harmless: a
# study is re-placed at every pick from then on until the policy reports the change).
_MARGIN_MINUTES = 1e-3


def at(minutes: float) -> datetime:
    """The simulated time ``minutes`` after :data:`T0`."""
    return T0 + timedelta(minutes=minutes)


def minutes_of(moment: datetime) -> float:
    """Minutes from :data:`T0` to ``moment``."""
    return (moment - T0) / _MINUTE


@dataclass(frozen=True)
class SimStudy:
    """One simulated study with every random draw already made."""

    index: int
    uid: str
    arrival: float  # minutes after T0
    modality: str
    order_priority: str
    location: str | None
    critical: bool
    ai_covered: bool
    ai_flag: bool
    ai_ready: float  # minutes after T0; inf when no model covers the modality
    read_minutes: float

    def context(self, finding_code: str, *, with_ai: bool) -> StudyContext:
        """What the policy sees: without findings before the AI result, with it after."""
        findings: tuple[Finding, ...] = ()
        if with_ai and self.ai_covered:
            findings = (_finding(finding_code, self.ai_flag),)
        return StudyContext(
            self.uid, at(self.arrival), self.order_priority, findings, self.location
        )

    def ideal_context(self, finding_code: str) -> StudyContext:
        """The study as a perfect AI would present it (flagged exactly when critical)."""
        findings = (_finding(finding_code, True),) if self.critical else ()
        return StudyContext(
            self.uid, at(self.arrival), self.order_priority, findings, self.location
        )


def _finding(code: str, flag: bool) -> Finding:
    return Finding(code, flag, 1.0 if flag else 0.0, {}, _AI_MODEL)


def generate_studies(config: SimulationConfig, seed: int | None = None) -> list[SimStudy]:
    """Draw the day's studies (arrivals, mix, truth, AI results, read times).

    The draws are made in a fixed order with a fixed number of random numbers per study, so
    two configurations that differ only in, e.g., sensitivity share every other draw.
    """
    rng = np.random.default_rng(config.seed if seed is None else seed)
    n = config.n_studies
    # Arrivals: hour of arrival from the profile (the last hour may be partial), then uniform
    # inside the hour.
    hours = math.ceil(config.duration_hours)
    widths = np.ones(hours)
    widths[-1] = config.duration_hours - (hours - 1)
    weights = np.array([config.arrival_profile[h % 24] for h in range(hours)]) * widths
    hour = rng.choice(hours, size=n, p=weights / weights.sum())
    arrivals = np.sort((hour + rng.random(n) * widths[hour]) * 60.0)

    def pick(mix: dict[str, float]) -> list[str]:
        names = list(mix)
        p = np.array([mix[k] for k in names], dtype=float)
        return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]

    modalities = pick({k: m.fraction for k, m in config.modalities.items()})
    priorities = pick(config.order_priority_mix)
    locations = pick(config.location_mix)
    critical = rng.random(n) < config.prevalence
    u_ai = rng.random(n)
    z = rng.standard_normal(n)

    covered = set(config.modalities if config.ai_modalities is None else config.ai_modalities)
    studies: list[SimStudy] = []
    for i in range(n):
        spec = config.modalities[modalities[i]]
        read = spec.median_minutes * math.exp(spec.sigma * float(z[i]))
        if spec.max_minutes is not None:
            read = min(read, spec.max_minutes)
        is_covered = modalities[i] in covered
        is_critical = bool(critical[i])
        p_flag = config.sensitivity if is_critical else 1.0 - config.specificity
        arrival = float(arrivals[i])
        studies.append(
            SimStudy(
                index=i,
                uid=f"sim.{i:06d}",
                arrival=arrival,
                modality=modalities[i],
                order_priority=priorities[i],
                location=None if locations[i] == "outpatient" else locations[i],
                critical=is_critical,
                ai_covered=is_covered,
                ai_flag=is_covered and bool(u_ai[i] < p_flag),
                ai_ready=arrival + config.ai_latency_minutes if is_covered else math.inf,
                read_minutes=read,
            )
        )
    return studies


# -- queue disciplines ---------------------------------------------------------------------


class Queue(Protocol):
    """A queue discipline: holds the waiting studies and says which one is read next."""

    name: str

    def __len__(self) -> int: ...

    def add(self, study: SimStudy, now: float) -> None:
        """A study arrives."""

    def ai_result(self, study: SimStudy, now: float) -> None:
        """The AI result of a waiting study becomes available."""

    def pop(self, now: float) -> SimStudy:
        """Remove and return the study a free reader takes at ``now``."""
        ...


class FifoQueue:
    """First in, first out: by arrival only (the AI result is ignored)."""

    name = "fifo"

    def __init__(self) -> None:
        self._q: deque[SimStudy] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def add(self, study: SimStudy, now: float) -> None:
        self._q.append(study)

    def ai_result(self, study: SimStudy, now: float) -> None:
        return None

    def pop(self, now: float) -> SimStudy:
        return self._q.popleft()


class TriageQueue:
    """The triage policy, with incrementally maintained sort keys.

    A study's key from :func:`~triage.worklist.priority.place` changes only when its
    findings change (the AI result) or its tier moves with time (queued -> due soon ->
    overdue). Keys sit in a heap with lazy deletion; a second heap holds the times at which a
    tier may change, and the study is re-placed with ``place(ctx, now)`` from then on until
    the policy itself reports the new tier. The order is therefore exactly the policy's.
    """

    name = "triage"

    def __init__(self, policy: PolicyConfig, finding_code: str, *, use_ai: bool = True) -> None:
        self.policy = policy
        self.finding_code = finding_code
        self.use_ai = use_ai
        self._heap: list[tuple[tuple[Any, ...], int, int]] = []
        self._checks: list[tuple[float, int, int]] = []
        self._armed: set[int] = set()
        self._ctx: dict[int, StudyContext] = {}
        self._tier: dict[int, str] = {}
        self._version: dict[int, int] = {}
        self._study: dict[int, SimStudy] = {}

    def __len__(self) -> int:
        return len(self._ctx)

    def add(self, study: SimStudy, now: float) -> None:
        i = study.index
        self._study[i] = study
        ai = self.use_ai and now >= study.ai_ready
        self._ctx[i] = study.context(self.finding_code, with_ai=ai)
        self._update(i, now)

    def ai_result(self, study: SimStudy, now: float) -> None:
        i = study.index
        if i not in self._ctx or not self.use_ai:
            return
        self._ctx[i] = study.context(self.finding_code, with_ai=True)
        self._update(i, now)

    def _update(self, i: int, now: float) -> None:
        ctx = self._ctx[i]
        key, _cls, deadline, tier, _reasons = place(ctx, at(now), self.policy)
        version = self._version.get(i, 0) + 1
        self._version[i] = version
        self._tier[i] = tier
        self._armed.discard(i)
        heapq.heappush(self._heap, (key, version, i))
        change: datetime | None = None
        if tier == "queued":
            change = deadline - (deadline - ctx.arrived_at) * self.policy.aging_fraction
        elif tier == "due_soon":
            change = deadline
        if change is not None:
            heapq.heappush(self._checks, (minutes_of(change) - _MARGIN_MINUTES, version, i))

    def _refresh(self, now: float) -> None:
        moment = at(now)
        while True:
            while self._checks and self._checks[0][0] <= now:
                _, version, i = heapq.heappop(self._checks)
                if self._version.get(i) == version:
                    self._armed.add(i)
            changed = False
            for i in sorted(self._armed):
                tier = place(self._ctx[i], moment, self.policy)[3]
                if tier != self._tier[i]:
                    self._update(i, now)
                    changed = True
            if not changed:
                return

    def peek(self, now: float) -> SimStudy:
        """The study the policy puts first at ``now`` (without removing it)."""
        self._refresh(now)
        while True:
            _key, version, i = self._heap[0]
            if self._version.get(i) == version:
                return self._study[i]
            heapq.heappop(self._heap)

    def pop(self, now: float) -> SimStudy:
        study = self.peek(now)
        heapq.heappop(self._heap)
        i = study.index
        del self._ctx[i], self._tier[i], self._version[i], self._study[i]
        self._armed.discard(i)
        return study

    def keys(self, now: float) -> list[tuple[Any, ...]]:
        """Every waiting study's current sort key, in order (for checks)."""
        self._refresh(now)
        return sorted(k for k, v, i in self._heap if self._version.get(i) == v)

    def contexts(self) -> list[StudyContext]:
        """The policy's view of every waiting study (for checks)."""
        return list(self._ctx.values())


class ReferenceTriageQueue:
    """The triage policy the slow, obvious way: ``rank_studies(...)[0]`` at every pick."""

    name = "triage"

    def __init__(self, policy: PolicyConfig, finding_code: str, *, use_ai: bool = True) -> None:
        self.policy = policy
        self.finding_code = finding_code
        self.use_ai = use_ai
        self._ctx: dict[int, StudyContext] = {}
        self._study: dict[str, SimStudy] = {}

    def __len__(self) -> int:
        return len(self._ctx)

    def add(self, study: SimStudy, now: float) -> None:
        ai = self.use_ai and now >= study.ai_ready
        self._ctx[study.index] = study.context(self.finding_code, with_ai=ai)
        self._study[study.uid] = study

    def ai_result(self, study: SimStudy, now: float) -> None:
        if study.index in self._ctx and self.use_ai:
            self._ctx[study.index] = study.context(self.finding_code, with_ai=True)

    def pop(self, now: float) -> SimStudy:
        first = rank_studies(list(self._ctx.values()), at(now), self.policy)[0]
        study = self._study.pop(first.StudyInstanceUID)
        del self._ctx[study.index]
        return study


DISCIPLINES: tuple[str, ...] = ("fifo", "policy_no_ai", "triage")
"""``fifo``: arrival order. ``triage``: the policy with the AI results. ``policy_no_ai``: the
same policy never given an AI result (what order priority, location and aging alone do)."""


def make_queue(discipline: str, config: SimulationConfig, *, reference: bool = False) -> Queue:
    """A fresh queue of the named discipline (one of :data:`DISCIPLINES`)."""
    if discipline == "fifo":
        return FifoQueue()
    if discipline in ("triage", "policy_no_ai"):
        cls = ReferenceTriageQueue if reference else TriageQueue
        return cls(config.policy, config.finding_code, use_ai=discipline == "triage")
    raise ValueError(f"unknown queue discipline {discipline!r}")


# -- the simulation ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadRecord:
    """One study's outcome: when it arrived and when its read started (minutes)."""

    index: int
    arrival: float
    start: float
    read_minutes: float
    critical: bool
    flagged: bool
    sla_order: float  # minutes: the policy's deadline for the study's order/location class
    sla_true: float  # minutes: the deadline of the class it deserves (critical if critical)

    @property
    def wait(self) -> float:
        return self.start - self.arrival


@dataclass
class RunLog:
    """The outcome of one discipline on one day."""

    discipline: str
    records: list[ReadRecord]
    # (time, studies waiting, truly critical studies waiting) after each batch of events
    queue_series: list[tuple[float, int, int]] = field(default_factory=list)
    busy_minutes: float = 0.0
    end: float = 0.0


_ARRIVAL, _AI, _FINISH, _TICK = 0, 1, 2, 3


def deadlines(study: SimStudy, policy: PolicyConfig, finding_code: str) -> tuple[float, float]:
    """Minutes from arrival to the policy's deadline: (order class, deserved class).

    The first ignores the AI (the study's order priority and location only), the second
    assumes a perfect AI (critical exactly when the study is critical). Both come from
    :func:`~triage.worklist.priority.place`.
    """
    arrived = at(study.arrival)
    plain = study.context(finding_code, with_ai=False)
    ideal = study.ideal_context(finding_code)
    d_order = place(plain, arrived, policy)[2]
    d_true = place(ideal, arrived, policy)[2]
    return (d_order - arrived) / _MINUTE, (d_true - arrived) / _MINUTE


def day_deadlines(
    studies: Sequence[SimStudy], config: SimulationConfig
) -> dict[int, tuple[float, float]]:
    """:func:`deadlines` of every study, by index."""
    return {s.index: deadlines(s, config.policy, config.finding_code) for s in studies}


def simulate(
    studies: Sequence[SimStudy],
    config: SimulationConfig,
    discipline: str,
    *,
    reference: bool = False,
    deadline_minutes: dict[int, tuple[float, float]] | None = None,
) -> RunLog:
    """Run one discipline over the given studies; every study is read before it returns.

    ``deadline_minutes``: each study's :func:`deadlines` by index, when already computed
    (they do not depend on the discipline).
    """
    queue = make_queue(discipline, config, reference=reference)
    events: list[tuple[float, int, int, int]] = []
    seq = 0
    for s in studies:
        heapq.heappush(events, (s.arrival, seq, _ARRIVAL, s.index))
        seq += 1
        if s.ai_covered:
            heapq.heappush(events, (s.ai_ready, seq, _AI, s.index))
            seq += 1
    roster = config.radiologists_by_hour is not None
    if roster:
        heapq.heappush(events, (60.0, seq, _TICK, -1))
        seq += 1
    by_index = {s.index: s for s in studies}
    starts: dict[int, float] = {}
    busy = 0
    busy_minutes = 0.0
    waiting_critical = 0
    series: list[tuple[float, int, int]] = [(0.0, 0, 0)]
    now = 0.0
    pending_arrivals = len(studies)
    while events:
        now = events[0][0]
        while events and events[0][0] == now:
            _, _, kind, i = heapq.heappop(events)
            if kind == _ARRIVAL:
                queue.add(by_index[i], now)
                pending_arrivals -= 1
                waiting_critical += by_index[i].critical
            elif kind == _AI:
                if i not in starts:
                    queue.ai_result(by_index[i], now)
            elif kind == _FINISH:
                busy -= 1
            elif pending_arrivals or len(queue) or busy:  # roster tick: keep ticking
                heapq.heappush(events, (now + 60.0, seq, _TICK, -1))
                seq += 1
        on_duty = config.readers_at(int(now // 60.0) % 24)
        while busy < on_duty and len(queue):
            s = queue.pop(now)
            starts[s.index] = now
            busy += 1
            busy_minutes += s.read_minutes
            waiting_critical -= s.critical
            heapq.heappush(events, (now + s.read_minutes, seq, _FINISH, s.index))
            seq += 1
        series.append((now, len(queue), waiting_critical))
    if deadline_minutes is None:
        deadline_minutes = day_deadlines(studies, config)
    records = []
    for s in studies:
        sla_order, sla_true = deadline_minutes[s.index]
        records.append(
            ReadRecord(
                index=s.index,
                arrival=s.arrival,
                start=starts[s.index],
                read_minutes=s.read_minutes,
                critical=s.critical,
                flagged=s.ai_flag,
                sla_order=sla_order,
                sla_true=sla_true,
            )
        )
    return RunLog(discipline, records, series, busy_minutes, now)


# -- metrics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupStats:
    """Wait statistics (minutes) of a group of studies; NaN when the group is empty."""

    n: int
    median: float
    p95: float
    max: float
    mean: float
    misses_order: int  # read started after the order-class deadline
    misses_true: int  # read started after the deserved-class deadline

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 3)

        return {
            "n": self.n,
            "median": num(self.median),
            "p95": num(self.p95),
            "max": num(self.max),
            "mean": num(self.mean),
            "misses_order": self.misses_order,
            "misses_true": self.misses_true,
        }


GROUPS: tuple[str, ...] = ("critical", "others", "all", "critical_ai_missed", "others_ai_flagged")
"""Groups: truly critical, the rest, all; critical studies the AI missed (false negatives)
and other studies the AI flagged (false positives)."""


def group_stats(records: Sequence[ReadRecord]) -> GroupStats:
    """Median, 95th percentile (linear interpolation), maximum and mean wait; misses."""
    if not records:
        nan = float("nan")
        return GroupStats(0, nan, nan, nan, nan, 0, 0)
    waits = np.array([r.wait for r in records])
    return GroupStats(
        n=len(records),
        median=float(np.median(waits)),
        p95=float(np.percentile(waits, 95)),
        max=float(waits.max()),
        mean=float(waits.mean()),
        misses_order=sum(r.wait > r.sla_order for r in records),
        misses_true=sum(r.wait > r.sla_true for r in records),
    )


def summarise(records: Sequence[ReadRecord]) -> dict[str, GroupStats]:
    """Statistics of each of :data:`GROUPS`."""
    return {
        "critical": group_stats([r for r in records if r.critical]),
        "others": group_stats([r for r in records if not r.critical]),
        "all": group_stats(records),
        "critical_ai_missed": group_stats([r for r in records if r.critical and not r.flagged]),
        "others_ai_flagged": group_stats([r for r in records if r.flagged and not r.critical]),
    }


def others_max_bound(flagged_work_fraction: float, load: float = 1.0) -> float:
    """The others' maximum wait under triage relative to FIFO's that flagged work forces.

    The study that waits longest under FIFO arrives at the peak of the backlog and waits
    ``W_fifo`` = the work ahead of it / the readers. Under triage the same work is ahead of it
    (every earlier study is due before it, and every reader is busy), plus every flagged study
    that arrives while it waits. If arrivals bring work at ``load`` x the readers' capacity
    during its wait ``W_triage`` and a share ``f`` of that work is flagged, then
    ``W_triage = W_fifo + f * load * W_triage``, so the ratio is ``1 / (1 - f * load)``.

    * With ``load`` measured while the worst study waits (:func:`worst_wait_load`) this is a
      **floor**: triage's maximum is at least that study's wait.
    * With ``load = 1`` it is ``1 / (1 - f)``, the **ceiling** of the fluid approximation: at
      the backlog's peak the backlog can only shrink, so ``load <= 1`` while the worst study
      waits, and no study waits longer than ``W_fifo / (1 - f)``. Random bursts of flagged
      studies take single days above it.

    Args:
        flagged_work_fraction: share ``f`` of the reading work (or of the studies, when flags
            do not depend on the read time) that the AI flags, in [0, 1].
        load: offered load ``rho`` (arriving work / reader time) while the worst study waits,
            >= 0.

    Returns:
        ``1 / (1 - f * load)``; ``inf`` when ``f * load >= 1``.
    """
    x = flagged_work_fraction * load
    return math.inf if x >= 1.0 else 1.0 / (1.0 - x)


def reader_minutes(config: SimulationConfig, start: float, end: float) -> float:
    """Reader-minutes on duty between ``start`` and ``end`` (minutes after :data:`T0`)."""
    total, t = 0.0, start
    while t < end:
        step = min(end, (math.floor(t / 60.0) + 1) * 60.0) - t
        total += config.readers_at(int(t // 60.0) % 24) * step
        t += step
    return total


def worst_wait_load(
    studies: Sequence[SimStudy], fifo: RunLog, triage: RunLog, config: SimulationConfig
) -> float:
    """Offered load while the other study that waits longest under FIFO waits under triage.

    The study is the non-critical, unflagged study with the longest FIFO wait; its window is
    from its arrival to the start of its read under triage. The load is the reading work of
    the studies arriving in that window / the reader-minutes on duty in it (``rho`` of
    :func:`others_max_bound`). NaN when no such study waited.
    """
    candidates = [r for r in fifo.records if not r.critical and not r.flagged]
    if not candidates:
        return float("nan")
    worst = max(candidates, key=lambda r: (r.wait, -r.index))
    start = next(r.start for r in triage.records if r.index == worst.index)
    if start <= worst.arrival:
        return float("nan")
    work = sum(s.read_minutes for s in studies if worst.arrival < s.arrival <= start)
    capacity = reader_minutes(config, worst.arrival, start)
    return work / capacity if capacity > 0 else float("nan")


@dataclass
class RunResult:
    """One simulated day under every discipline."""

    seed: int
    stats: dict[str, dict[str, GroupStats]]  # discipline -> group -> stats
    counts: dict[str, int]
    utilisation: float
    critical_median_ratio: float  # triage / FIFO (NaN when FIFO's is 0)
    others_max_ratio: float
    goal_critical_median: bool
    goal_others_max: bool
    flagged_fraction: float = 0.0  # share of the studies the AI flags (TP + FP)
    flagged_work_fraction: float = 0.0  # share of the reading time the AI flags
    worst_wait_load: float = float("nan")  # see worst_wait_load()
    logs: dict[str, RunLog] = field(default_factory=dict, repr=False)

    @property
    def goals_met(self) -> bool:
        return self.goal_critical_median and self.goal_others_max

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 4)

        return {
            "seed": self.seed,
            "counts": dict(self.counts),
            "utilisation": round(self.utilisation, 4),
            "disciplines": {
                d: {g: s.to_json() for g, s in groups.items()} for d, groups in self.stats.items()
            },
            "critical_median_ratio": num(self.critical_median_ratio),
            "others_max_ratio": num(self.others_max_ratio),
            "goal_critical_median": self.goal_critical_median,
            "goal_others_max": self.goal_others_max,
            "flagged_fraction": num(self.flagged_fraction),
            "flagged_work_fraction": num(self.flagged_work_fraction),
            "worst_wait_load": num(self.worst_wait_load),
        }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def run_day(config: SimulationConfig, seed: int, *, keep_logs: bool = False) -> RunResult:
    """Simulate one day (``seed``) under each of :data:`DISCIPLINES`."""
    studies = generate_studies(config, seed)
    due = day_deadlines(studies, config)
    logs = {d: simulate(studies, config, d, deadline_minutes=due) for d in DISCIPLINES}
    stats = {d: summarise(log.records) for d, log in logs.items()}
    fifo, tri = stats["fifo"], stats["triage"]
    capacity = sum(
        config.readers_at(h) * 60.0 * min(1.0, config.duration_hours - h)
        for h in range(math.ceil(config.duration_hours))
    )
    counts = {
        "studies": len(studies),
        "critical": sum(s.critical for s in studies),
        "ai_covered": sum(s.ai_covered for s in studies),
        "true_positive": sum(s.critical and s.ai_flag for s in studies),
        "false_negative": sum(s.critical and not s.ai_flag for s in studies),
        "false_positive": sum(s.ai_flag and not s.critical for s in studies),
        "flagged": sum(s.ai_flag for s in studies),
    }
    work = sum(s.read_minutes for s in studies)
    return RunResult(
        seed=seed,
        stats=stats,
        counts=counts,
        utilisation=sum(s.read_minutes for s in studies) / capacity,
        critical_median_ratio=_ratio(tri["critical"].median, fifo["critical"].median),
        others_max_ratio=_ratio(tri["others"].max, fifo["others"].max),
        goal_critical_median=tri["critical"].median
        <= config.critical_median_ratio_goal * fifo["critical"].median,
        goal_others_max=tri["others"].max <= config.others_max_ratio_goal * fifo["others"].max,
        flagged_fraction=counts["flagged"] / len(studies),
        flagged_work_fraction=sum(s.read_minutes for s in studies if s.ai_flag) / work,
        worst_wait_load=worst_wait_load(studies, logs["fifo"], logs["triage"], config),
        logs=logs if keep_logs else {},
    )


@dataclass
class Experiment:
    """Several simulated days (seeds ``seed``, ``seed + 1``, ...)."""

    config: SimulationConfig
    runs: list[RunResult]
    seconds: float


def run_experiment(
    config: SimulationConfig, runs: int = DEFAULT_RUNS, *, keep_logs: bool = True
) -> Experiment:
    """Simulate ``runs`` days; the first keeps its event logs (for the plots) if ``keep_logs``."""
    started = time.perf_counter()
    results = [
        run_day(config, config.seed + k, keep_logs=keep_logs and k == 0)
        for k in range(max(1, runs))
    ]
    return Experiment(config, results, time.perf_counter() - started)


@dataclass
class Sweep:
    """A grid of configurations, each simulated on the same days (common random numbers)."""

    parameters: list[tuple[str, list[float]]]  # (name, values), the first varies slowest
    cells: list[tuple[dict[str, float], Experiment]]  # (parameter values, its days)
    seconds: float


def run_sweep(
    cells: Sequence[tuple[dict[str, float], SimulationConfig]],
    parameters: list[tuple[str, list[float]]],
    runs: int = SWEEP_DEFAULT_RUNS,
) -> Sweep:
    """Simulate ``runs`` days of every cell (from :func:`~triage.simulate.config.sweep_grid`).

    Every cell uses the same seeds, so cells differ only in the swept parameters.
    """
    started = time.perf_counter()
    done = [(values, run_experiment(cfg, runs, keep_logs=False)) for values, cfg in cells]
    return Sweep(parameters, done, time.perf_counter() - started)
