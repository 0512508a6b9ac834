"""Configuration of the queue simulator (a pydantic model read from TOML or JSON).

Every field has a default. Where a default comes from a published figure the field says so;
where it does not, it says **assumption**. The defaults describe the issue's headline
scenario: one day of 2,000 studies, 5% with a critical finding, an AI with sensitivity 0.9
and specificity 0.95 that sees every study.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from triage.models.catalog import critical_findings
from triage.worklist.priority import PolicyConfig

# z of the 90th percentile of the standard normal distribution.
Z90 = 1.2815515655446004

DEFAULT_RUNS = 50
"""Days ``triage simulate`` simulates by default (seeds ``seed`` .. ``seed + 49``). Chosen by
measurement (docs/simulation.md, "How many days"): over 420 simulated days of the defaults
the others' max ratio is 1.084 with a per-day SD of 0.032, 0.016 under the 1.1 goal; with 50
days its 95% confidence interval (+-0.009) is under the goal for 99.7% of the windows of
consecutive seeds, so the verdict is the same whatever ``--seed``; 40 days leave 8% of them
BORDERLINE, 20 days 42%. 50 days take about 13 s of CPU (0.25 s a day)."""

SWEEP_DEFAULT_RUNS = 10
"""Days per cell of ``triage simulate --sweep`` by default (same seeds in every cell)."""

MAX_SWEEP_PARAMETERS = 2
MAX_SWEEP_CELLS = 36
MAX_SWEEP_DAYS = 400
"""Bounds of a sweep: at most 2 swept parameters, 36 cells and 400 simulated days in all
(cells x days per cell; about 0.3 s of CPU a day for 2,000 studies)."""

SWEEP_PARAMETERS: dict[str, type] = {
    "prevalence": float,
    "sensitivity": float,
    "specificity": float,
    "radiologists": int,
    "studies_per_day": int,
    "ai_latency_minutes": float,
}
"""Settings ``--sweep NAME=v1,v2,...`` may vary (scalar fields of :class:`SimulationConfig`)."""

# Arrivals by hour of day (00:00-01:00 first), relative weights. Shape of an emergency
# department's arrival curve (trough 03:00-07:00 at about a third of the peak, rising through
# the morning, a plateau from late morning to the evening): the well-known diurnal ED arrival
# pattern used for ED staffing (e.g. Green et al., "Using queueing theory to increase the
# effectiveness of emergency department provider staffing", Acad Emerg Med 2006;13:61-68).
# The exact weights are an **assumption**.
ED_DAYTIME_PROFILE: tuple[float, ...] = (
    3.0, 2.5, 2.1, 1.8, 1.6, 1.6, 1.9, 2.6, 3.8, 5.0, 5.6, 5.8,
    5.8, 5.7, 5.6, 5.5, 5.4, 5.3, 5.2, 5.0, 4.6, 4.2, 3.8, 3.3,
)  # fmt: skip


class ModalitySpec(BaseModel):
    """One kind of study: its share of the arrivals and its read time.

    The read time is lognormal, given by its median and 90th percentile, clipped at
    ``max_minutes`` (the longest read counted; longer reads in RIS data are interruptions).
    """

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(ge=0.0, description="share of the arrivals (normalised)")
    median_minutes: float = Field(gt=0.0)
    p90_minutes: float = Field(gt=0.0)
    max_minutes: float | None = Field(default=None, gt=0.0)
    source: str = ""

    @model_validator(mode="after")
    def _p90_not_below_median(self) -> ModalitySpec:
        if self.p90_minutes < self.median_minutes:
            raise ValueError("p90_minutes must be at least median_minutes")
        return self

    @property
    def sigma(self) -> float:
        """The lognormal's sigma (log-space standard deviation)."""
        return math.log(self.p90_minutes / self.median_minutes) / Z90

    @property
    def mean_minutes(self) -> float:
        """The mean read time (of the unclipped lognormal)."""
        return self.median_minutes * math.exp(self.sigma**2 / 2.0)


def _default_modalities() -> dict[str, ModalitySpec]:
    # Shares: an **assumption** for an ED-driven general service (radiographs most numerous,
    # CT next). Read times (lognormal, median and p90 chosen to match a published mean and SD
    # where there is one):
    # - CT: radiologist reporting times from the RIS of an 850-bed university hospital,
    #   "Development of a local relative value unit to measure radiologists' computed
    #   tomography reporting workload", J Med Imaging Radiat Oncol 2016 (PMID 27397691):
    #   mean +- SD: CNS CT 7.0 +- 6.5 min, thorax CT 14.2 +- 11.1, total abdomen CT 17.1 +- 14.6.
    # - clipping at 10 min (radiographs) and 60 min (CT, MR): the outlier limits of Cowan et
    #   al., J Med Imaging Radiat Oncol 2013;57:558-66 (RIS reporting times).
    # - radiographs: 2-2.5 min per case (Dockray, Proc SPIE 0152, 1978); p90 an assumption.
    # - MR: attendings read a brain MR in 11 min on average (Al Yassin et al., Academic
    #   Radiology); the spread is an assumption.
    return {
        "CR": ModalitySpec(
            fraction=0.45,
            median_minutes=2.0,
            p90_minutes=5.0,
            max_minutes=10.0,
            source="Dockray 1978 (2-2.5 min per radiograph); cap: Cowan 2013; p90 assumption",
        ),
        "CT head": ModalitySpec(
            fraction=0.20,
            median_minutes=5.1,
            p90_minutes=14.1,
            max_minutes=60.0,
            source="PMID 27397691: CNS CT 7.0 +- 6.5 min (mean +- SD); cap: Cowan 2013",
        ),
        "CT chest": ModalitySpec(
            fraction=0.12,
            median_minutes=11.2,
            p90_minutes=27.1,
            max_minutes=60.0,
            source="PMID 27397691: thorax CT 14.2 +- 11.1 min (mean +- SD); cap: Cowan 2013",
        ),
        "CT abdomen": ModalitySpec(
            fraction=0.15,
            median_minutes=13.0,
            p90_minutes=33.5,
            max_minutes=60.0,
            source="PMID 27397691: abdomen CT 17.1 +- 14.6 min (mean +- SD); cap: Cowan 2013",
        ),
        "MR": ModalitySpec(
            fraction=0.08,
            median_minutes=11.0,
            p90_minutes=22.0,
            max_minutes=60.0,
            source="Al Yassin et al. (11 min mean, brain MR, attendings); spread assumption",
        ),
    }


class SimulationConfig(BaseModel):
    """Everything the simulator needs; every field has a default (see the comments)."""

    model_config = ConfigDict(extra="forbid")

    duration_hours: float = Field(default=24.0, gt=0.0)
    """Hours of arrivals (the default day). The run then continues until every study is read,
    so every study has a wait. **Assumption**: one day, as in the issue."""

    studies_per_day: int = Field(default=2000, ge=1)
    """Studies per 24 hours (the issue's headline: 2,000). Exactly
    ``studies_per_day * duration_hours / 24`` studies arrive (a Poisson process conditioned on
    its count, with the hourly profile as its intensity)."""

    arrival_profile: list[float] = Field(default_factory=lambda: list(ED_DAYTIME_PROFILE))
    """24 relative weights, one per hour of the day (00:00 first). Default: an ED daytime peak
    (see ``ED_DAYTIME_PROFILE``); the weights are an **assumption** with a published shape."""

    modalities: dict[str, ModalitySpec] = Field(default_factory=_default_modalities)
    """Modality mix and read times (see ``_default_modalities`` for sources)."""

    order_priority_mix: dict[str, float] = Field(
        default_factory=lambda: {"STAT": 0.15, "URGENT": 0.25, "ROUTINE": 0.60}
    )
    """Order priorities (DICOM RequestedProcedurePriority values) and their shares.
    **Assumption** (no published mix for teleradiology); drawn independently of the rest."""

    location_mix: dict[str, float] = Field(
        default_factory=lambda: {"emergency": 0.40, "inpatient": 0.25, "outpatient": 0.35}
    )
    """Patient locations and their shares (``outpatient`` means no location class).
    **Assumption**; an ED location lifts a study to ``urgent`` in the policy."""

    prevalence: float = Field(default=0.05, ge=0.0, le=1.0)
    """Share of studies with a critical finding (the issue's headline: 5%), drawn
    independently of modality, order priority and location (**assumption**)."""

    sensitivity: float = Field(default=0.9, ge=0.0, le=1.0)
    """P(AI flag | critical) (the issue's headline: 0.9; cleared ICH triage devices report
    0.88-0.95)."""

    specificity: float = Field(default=0.95, ge=0.0, le=1.0)
    """P(no flag | not critical) (the issue's headline: 0.95)."""

    ai_modalities: list[str] | None = None
    """Modalities an AI model covers; ``None`` = all (the headline scenario, so that 5% of all
    2,000 studies are critical and visible to the AI). A real deployment of the haemorrhage
    model covers ``["CT head"]`` only."""

    ai_latency_minutes: float = Field(default=1.0, ge=0.0)
    """Minutes from arrival until the AI result is on the worklist; until then the study is
    ranked without findings. Default 1 min: the time-to-flag target in docs/benchmarks.md
    (measured 24.7 s on a 2-core CPU for a head CT), rounded up for queueing."""

    finding_code: str = Field(default_factory=lambda: critical_findings()[0])
    """The finding the simulated AI raises (it must be one the policy escalates); default: the
    first critical finding of the installed models (intracranial haemorrhage)."""

    radiologists: int = Field(default=12, ge=1)
    """Radiologists reading at every hour. Default 12: the default mix has a mean read time of
    7.9 min, so 2,000 studies are 262 reader-hours a day and 12 readers are ~91% utilised over
    the day (**assumption** chosen for the issue's "realistic load")."""

    radiologists_by_hour: list[int] | None = None
    """Optional roster: readers on duty for each hour of the day (24 values), replacing
    ``radiologists``. A reader going off duty finishes the study in hand."""

    seed: int = 0
    """Seed of the random draws (arrivals, mix, critical findings, AI results, read times)."""

    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """The triage policy's configuration (``triage.worklist.priority.PolicyConfig``)."""

    critical_median_ratio_goal: float = 0.30
    """Goal: median wait of critical studies under triage <= this x FIFO's (the issue)."""

    others_max_ratio_goal: float = 1.10
    """Goal: maximum wait of other studies under triage <= this x FIFO's (the issue)."""

    @field_validator("arrival_profile")
    @classmethod
    def _profile_24(cls, value: list[float]) -> list[float]:
        if len(value) != 24 or any(w < 0 for w in value) or sum(value) <= 0:
            raise ValueError("arrival_profile needs 24 non-negative weights, not all zero")
        return value

    @field_validator("radiologists_by_hour")
    @classmethod
    def _roster_24(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) != 24 or any(n < 0 for n in value)):
            raise ValueError("radiologists_by_hour needs 24 non-negative counts")
        if value is not None and max(value) == 0:
            raise ValueError("radiologists_by_hour has nobody on duty")
        return value

    @field_validator("modalities", "order_priority_mix", "location_mix")
    @classmethod
    def _mix_not_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        weights = [v.fraction if isinstance(v, ModalitySpec) else v for v in value.values()]
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError("a mix needs at least one positive share and none negative")
        return value

    @model_validator(mode="after")
    def _ai_modalities_known(self) -> SimulationConfig:
        unknown = set(self.ai_modalities or ()) - set(self.modalities)
        if unknown:
            raise ValueError(f"ai_modalities names unknown modalities: {sorted(unknown)}")
        if self.finding_code not in self.policy.findings:
            raise ValueError(f"the policy does not escalate the finding {self.finding_code!r}")
        return self

    @property
    def n_studies(self) -> int:
        """How many studies arrive."""
        return max(1, round(self.studies_per_day * self.duration_hours / 24.0))

    def readers_at(self, hour_of_day: int) -> int:
        """Readers on duty in the given hour of the day (0-23)."""
        if self.radiologists_by_hour is None:
            return self.radiologists
        return self.radiologists_by_hour[hour_of_day % 24]

    def mean_read_minutes(self) -> float:
        """Mean read time over the modality mix (unclipped lognormals)."""
        total = sum(m.fraction for m in self.modalities.values())
        return sum(m.fraction * m.mean_minutes for m in self.modalities.values()) / total

    def offered_utilisation(self) -> float:
        """Expected reading work / reader time available while studies arrive."""
        work = self.n_studies * self.mean_read_minutes()
        capacity = sum(
            self.readers_at(h) * 60.0 * min(1.0, self.duration_hours - h)
            for h in range(math.ceil(self.duration_hours))
        )
        return work / capacity


def load_config(path: Path | None) -> SimulationConfig:
    """Read a configuration from a ``.toml`` or ``.json`` file (defaults when ``path`` is None)."""
    if path is None:
        return SimulationConfig()
    text = path.read_text(encoding="utf-8")
    data: dict[str, Any]
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        data = tomllib.loads(text)
    return SimulationConfig.model_validate(data)


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    """Parse one ``--sweep`` argument, ``NAME=v1,v2,...``.

    Raises:
        ValueError: with a one-line message naming what is wrong (no ``=``, a parameter
            that cannot be swept, a value that is not a number, a repeated value).
    """
    name, sep, text = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--sweep {spec!r}: expected NAME=v1,v2,... (e.g. prevalence=0.05,0.1)")
    if name not in SWEEP_PARAMETERS:
        known = ", ".join(SWEEP_PARAMETERS)
        raise ValueError(f"--sweep: cannot sweep {name!r} (parameters: {known})")
    values: list[float] = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--sweep {name}: {item.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"--sweep {name}: {item.strip()!r} is not a finite number")
        if SWEEP_PARAMETERS[name] is int and not value.is_integer():
            raise ValueError(f"--sweep {name}: {item.strip()!r} is not a whole number")
        values.append(value)
    if len(set(values)) != len(values):
        raise ValueError(f"--sweep {name}: a value is given twice")
    return name, values


def sweep_grid(
    base: SimulationConfig, parameters: list[tuple[str, list[float]]], runs: int
) -> list[tuple[dict[str, float], SimulationConfig]]:
    """Every cell of the grid (the first parameter varies slowest), each validated.

    Args:
        base: the settings every cell starts from.
        parameters: (name, values) from :func:`parse_sweep`, at most
            :data:`MAX_SWEEP_PARAMETERS`, each name once.
        runs: days per cell (for the bound on the total).

    Raises:
        ValueError: one line: too many parameters, cells or days, a parameter given twice,
            or a value the settings refuse (e.g. ``prevalence=1.5``).
    """
    names = [name for name, _ in parameters]
    if not names:
        raise ValueError("--sweep: nothing to sweep")
    if len(names) > MAX_SWEEP_PARAMETERS:
        raise ValueError(f"--sweep: at most {MAX_SWEEP_PARAMETERS} parameters, got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError("--sweep: a parameter is given twice")
    grid: list[dict[str, float]] = [{}]
    for name, values in parameters:
        grid = [{**cell, name: v} for cell in grid for v in values]
    if len(grid) > MAX_SWEEP_CELLS:
        raise ValueError(f"--sweep: {len(grid)} cells, at most {MAX_SWEEP_CELLS}")
    if len(grid) * runs > MAX_SWEEP_DAYS:
        raise ValueError(
            f"--sweep: {len(grid)} cells x {runs} days = {len(grid) * runs} simulated days,"
            f" at most {MAX_SWEEP_DAYS} (use fewer --runs or values)"
        )
    data = base.model_dump()
    cells = []
    for cell in grid:
        typed = {k: SWEEP_PARAMETERS[k](v) for k, v in cell.items()}
        try:
            cfg = SimulationConfig.model_validate({**data, **typed})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            cell_text = f"{where}={cell[where]:g}" if where in cell else where or str(cell)
            raise ValueError(f"--sweep {cell_text}: {err['msg']}") from None
        cells.append((cell, cfg))
    return cells
