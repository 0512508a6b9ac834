"""Summaries of a simulation: the comparison table (rich and markdown), JSON and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from triage.simulate.model import (
    DISCIPLINES,
    GROUPS,
    Experiment,
    RunResult,
    Sweep,
    others_max_bound,
)
from triage.worklist.priority import POLICY_VERSION

CONFIDENCE = 0.95
"""Level of the confidence intervals of the ratios (over the simulated days)."""

# Verdicts of a goal (see verdict()).
MET, NOT_MET, BORDERLINE, NOT_REACHABLE, UNMEASURABLE = (
    "MET",
    "NOT MET",
    "BORDERLINE",
    "NOT REACHABLE",
    "not measurable",
)

METRICS: tuple[str, ...] = ("n", "median", "p95", "max", "mean", "misses_order", "misses_true")

# (group, metric, label) rows of the comparison table.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("critical", "median", "critical: median wait"),
    ("critical", "p95", "critical: p95 wait"),
    ("critical", "max", "critical: max wait"),
    ("others", "median", "others: median wait"),
    ("others", "p95", "others: p95 wait"),
    ("others", "max", "others: max wait"),
    ("critical_ai_missed", "max", "AI-missed critical: max wait"),
    ("critical", "misses_true", "critical: late, critical SLA"),
    ("critical", "misses_order", "critical: late, order SLA"),
    ("others", "misses_order", "others: late, order SLA"),
    ("all", "misses_true", "all: late, deserved SLA"),
)
"""(group, metric, label) rows of the comparison table; waits in minutes, misses counted."""


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean, sample SD, min and max of the finite values (None when there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(finite),
        "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
    }


def _metric(run: RunResult, discipline: str, group: str, metric: str) -> float:
    return float(getattr(run.stats[discipline][group], metric))


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def ratio_ci(
    numerators: list[float], denominators: list[float], level: float = CONFIDENCE
) -> tuple[float, float] | None:
    """Confidence interval of a ratio of means over paired days (delta method).

    The ratio ``R = mean(y) / mean(x)`` has the standard error
    ``sd(y_i - R * x_i) / (mean(x) * sqrt(n))``; the interval is ``R +- t(n - 1) * SE``.

    Args:
        numerators: one value per day (e.g. triage's maximum wait), minutes.
        denominators: the paired values (e.g. FIFO's), minutes; days where either is NaN are
            dropped.
        level: confidence level in (0, 1).

    Returns:
        (low, high), or None with fewer than two usable days or a zero denominator mean.
    """
    from scipy.stats import t as student_t

    pairs = [(y, x) for y, x in zip(numerators, denominators, strict=True) if math.isfinite(y + x)]
    n = len(pairs)
    if n < 2:
        return None
    mean_x = statistics.fmean(x for _, x in pairs)
    if mean_x <= 0:
        return None
    ratio = statistics.fmean(y for y, _ in pairs) / mean_x
    se = statistics.stdev(y - ratio * x for y, x in pairs) / (mean_x * math.sqrt(n))
    half = float(student_t.ppf(0.5 + level / 2.0, n - 1)) * se
    return ratio - half, ratio + half


def verdict(
    ratio: float | None,
    ci: tuple[float, float] | None,
    goal: float,
    floor: float | None = None,
) -> str:
    """The verdict on a goal ``ratio <= goal``.

    * ``MET`` / ``NOT MET``: the whole confidence interval is at or below / above the goal
      (with one day, no interval: the ratio alone decides).
    * ``NOT REACHABLE`` instead of ``NOT MET`` when ``floor``, the least the ratio can be at
      this flagged fraction and load (:func:`~triage.simulate.model.others_max_bound`), is
      above the goal too: no policy setting or number of days meets it.
    * ``BORDERLINE``: the interval contains the goal; more days would tell.
    * ``not measurable``: no ratio (e.g. FIFO's value is 0).
    """
    if ratio is None or not math.isfinite(ratio):
        return UNMEASURABLE
    if ci is None:
        met = ratio <= goal
    elif ci[1] <= goal:
        met = True
    elif ci[0] > goal:
        met = False
    else:
        return BORDERLINE
    if met:
        return MET
    return NOT_REACHABLE if floor is not None and floor > goal else NOT_MET


def reachability(goal: float, floor: float | None, ceiling: float | None) -> str:
    """Whether the others' max goal can be met at this flagged fraction, from the bounds.

    ``by construction`` when the ceiling ``1 / (1 - f)`` is within the goal; ``not
    reachable`` when the floor ``1 / (1 - f * rho)`` is above it; otherwise ``depends on
    load`` (met only because the backlog drains while the worst study waits).
    """
    if ceiling is not None and ceiling <= goal:
        return "by construction"
    if floor is not None and floor > goal:
        return "not reachable"
    return "depends on load"


def _goal_summary(
    runs: list[RunResult], group: str, metric: str, goal: float, floor: float | None = None
) -> dict[str, Any]:
    tri = [_metric(r, "triage", group, metric) for r in runs]
    fifo = [_metric(r, "fifo", group, metric) for r in runs]
    pairs = [(t, f) for t, f in zip(tri, fifo, strict=True) if math.isfinite(t + f)]
    ratio = None
    if pairs and statistics.fmean(f for _, f in pairs) > 0:
        ratio = statistics.fmean(t for t, _ in pairs) / statistics.fmean(f for _, f in pairs)
    ci = ratio_ci(tri, fifo)
    return {
        "ratio": ratio,
        "ci": None if ci is None else list(ci),
        "confidence": CONFIDENCE,
        "verdict": verdict(ratio, ci, goal, floor),
    }


def summary(exp: Experiment) -> dict[str, Any]:
    """Mean, SD, min and max over the simulated days of every metric, ratio and goal."""
    cfg = exp.config
    runs = exp.runs
    per: dict[str, Any] = {
        d: {g: {m: spread([_metric(r, d, g, m) for r in runs]) for m in METRICS} for g in GROUPS}
        for d in DISCIPLINES
    }
    fifo_crit = per["fifo"]["critical"]["median"]["mean"]
    tri_crit = per["triage"]["critical"]["median"]["mean"]
    fifo_max = per["fifo"]["others"]["max"]["mean"]
    tri_max = per["triage"]["others"]["max"]["mean"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def within(a: float | None, b: float | None, factor: float) -> bool | None:
        return None if a is None or b is None else a <= factor * b

    flagged = spread([r.flagged_fraction for r in runs])
    flagged_work = spread([r.flagged_work_fraction for r in runs])
    load = spread([r.worst_wait_load for r in runs])
    f_work = flagged_work["mean"] or 0.0
    ceiling = _finite(others_max_bound(f_work))
    floor = None if load["mean"] is None else _finite(others_max_bound(f_work, load["mean"]))
    if floor is None and load["mean"] is not None:
        floor = math.inf  # f * rho >= 1: no finite floor, nothing is reachable
    crit_goal = _goal_summary(runs, "critical", "median", cfg.critical_median_ratio_goal)
    max_goal = _goal_summary(runs, "others", "max", cfg.others_max_ratio_goal, floor)
    return {
        "disciplines": per,
        "utilisation": spread([r.utilisation for r in runs]),
        "counts": {k: spread([float(r.counts[k]) for r in runs]) for k in runs[0].counts},
        "ratios": {
            "critical_median": ratio(tri_crit, fifo_crit),
            "others_max": ratio(tri_max, fifo_max),
            "critical_median_ci": crit_goal["ci"],
            "others_max_ci": max_goal["ci"],
            "confidence": CONFIDENCE,
            "critical_median_per_day": spread([r.critical_median_ratio for r in runs]),
            "others_max_per_day": spread([r.others_max_ratio for r in runs]),
        },
        "flagged": {
            "fraction": flagged,
            "work_fraction": flagged_work,
            "worst_wait_load": load,
        },
        "others_max_bound": {
            "flagged_work_fraction": f_work,
            "worst_wait_load": load["mean"],
            "floor": _finite(floor),
            "ceiling": ceiling,
            "goal": cfg.others_max_ratio_goal,
            "reachable": reachability(cfg.others_max_ratio_goal, floor, ceiling),
            "max_flagged_fraction_by_construction": 1.0 - 1.0 / cfg.others_max_ratio_goal
            if cfg.others_max_ratio_goal > 0
            else 0.0,
        },
        "goals": {
            "critical_median": {
                "goal": f"triage <= {cfg.critical_median_ratio_goal:g} x FIFO",
                "met_on_means": within(tri_crit, fifo_crit, cfg.critical_median_ratio_goal),
                "days_met": sum(r.goal_critical_median for r in runs),
                "verdict": crit_goal["verdict"],
            },
            "others_max": {
                "goal": f"triage <= {cfg.others_max_ratio_goal:g} x FIFO",
                "met_on_means": within(tri_max, fifo_max, cfg.others_max_ratio_goal),
                "days_met": sum(r.goal_others_max for r in runs),
                "verdict": max_goal["verdict"],
            },
            "both_days_met": sum(r.goals_met for r in runs),
            "days": len(runs),
        },
    }


def _cell(s: dict[str, float | None], integer: bool, with_sd: bool, compact: bool) -> str:
    mean, sd = s["mean"], s["sd"]
    if mean is None:
        return "-"
    text = f"{mean:.0f}" if integer and not with_sd else f"{mean:.1f}"
    if with_sd and sd is not None:
        text += f"±{sd:.0f}" if compact else f" ± {sd:.1f}"
    return text


def table_rows(exp: Experiment, summ: dict[str, Any], *, compact: bool = False) -> list[list[str]]:
    """Rows of the comparison table: label, FIFO, policy without AI, triage, triage / FIFO.

    Cells are the mean (± SD over the days when there are several; ``compact``: SD rounded).
    """
    with_sd = len(exp.runs) > 1
    rows = []
    for group, metric, label in ROWS:
        f = summ["disciplines"]["fifo"][group][metric]
        n = summ["disciplines"]["policy_no_ai"][group][metric]
        t = summ["disciplines"]["triage"][group][metric]
        integer = metric.startswith("misses")
        ratio = "-"
        if f["mean"] and t["mean"] is not None:
            ratio = f"{t['mean'] / f['mean']:.3f}"
        cells = [_cell(x, integer, with_sd, compact) for x in (f, n, t)]
        rows.append([label, *cells, ratio])
    return rows


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _ci_text(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _verdict_text(word: str, goal: float, ci: list[float] | None, bound: dict[str, Any]) -> str:
    """The verdict word with what it rests on (one phrase)."""
    if word == NOT_REACHABLE:
        f = bound["flagged_work_fraction"]
        return (
            f"not reachable at f = {f:.1%} (floor 1/(1-f*rho) = {_fmt(bound['floor'])} > {goal:g})"
        )
    if word == BORDERLINE and ci is not None:
        return f"BORDERLINE (the {CONFIDENCE:.0%} CI {_ci_text(ci)} contains {goal:g})"
    return word


def goal_lines(exp: Experiment, summ: dict[str, Any]) -> list[str]:
    """One line per goal: the ratio, its confidence interval and the verdict; for the
    others' maximum also the flagged fraction and the bounds it implies."""
    goals, ratios, bound = summ["goals"], summ["ratios"], summ["others_max_bound"]
    days = goals["days"]
    cfg = exp.config

    def interval(ci: list[float] | None) -> str:
        if ci is None:
            return " (1 day: no confidence interval)" if days == 1 else ""
        return f" ({CONFIDENCE:.0%} CI {_ci_text(ci)} over {days} days)"

    def tail(g: dict[str, Any]) -> str:
        return f" ({g['days_met']}/{days} days met)" if days > 1 else ""

    crit, others = goals["critical_median"], goals["others_max"]
    f = summ["flagged"]["fraction"]["mean"] or 0.0
    load = bound["worst_wait_load"]
    return [
        f"critical median wait, triage / FIFO = {_fmt(ratios['critical_median'])}"
        + interval(ratios["critical_median_ci"])
        + f" (goal <= {cfg.critical_median_ratio_goal:g}): "
        + _verdict_text(
            crit["verdict"], cfg.critical_median_ratio_goal, ratios["critical_median_ci"], bound
        )
        + tail(crit),
        f"others' max wait, triage / FIFO = {_fmt(ratios['others_max'])}"
        + interval(ratios["others_max_ci"])
        + f" (goal <= {cfg.others_max_ratio_goal:g}): "
        + _verdict_text(
            others["verdict"], cfg.others_max_ratio_goal, ratios["others_max_ci"], bound
        )
        + tail(others),
        f"the AI flags f = {f:.1%} of the studies ({bound['flagged_work_fraction']:.1%} of the"
        f" reading time); load while the worst study waits rho = {_fmt(load, 2)}:"
        f" floor 1/(1-f*rho) = {_fmt(bound['floor'])}, ceiling 1/(1-f) = {_fmt(bound['ceiling'])};"
        f" others' max goal {cfg.others_max_ratio_goal:g} {_reach_text(bound)}",
    ]


def _reach_text(bound: dict[str, Any]) -> str:
    reach = bound["reachable"]
    f_max = bound["max_flagged_fraction_by_construction"]
    if reach == "by construction":
        return f"reachable at any load (f <= {f_max:.1%})"
    if reach == "not reachable":
        return f"not reachable at f = {bound['flagged_work_fraction']:.1%}"
    return f"reachable only while the backlog drains (f > {f_max:.1%})"


def _header(exp: Experiment, summ: dict[str, Any]) -> str:
    c = {k: v["mean"] for k, v in summ["counts"].items()}
    u = summ["utilisation"]["mean"]
    days = len(exp.runs)
    seeds = f"{exp.config.seed}" + (f"..{exp.config.seed + days - 1}" if days > 1 else "")
    return (
        f"{days} simulated day(s) of {exp.config.n_studies} studies (seed {seeds}):"
        f" {c['critical']:.1f} critical, AI true positives {c['true_positive']:.1f},"
        f" false negatives {c['false_negative']:.1f}, false positives {c['false_positive']:.1f}"
        f" (flagged f = {summ['flagged']['fraction']['mean']:.1%} of the studies);"
        f" reader utilisation {u:.1%}; policy {POLICY_VERSION} {exp.config.policy.digest()}"
    )


GOAL_COLUMNS: tuple[str, ...] = (
    "goal",
    "triage / FIFO",
    "95% CI",
    "days met",
    "flagged f",
    "floor 1/(1-f·ρ)",
    "ceiling 1/(1-f)",
    "verdict",
)
"""Columns of the goals table (one row per goal; the bounds apply to the others' maximum)."""


def goal_rows(exp: Experiment, summ: dict[str, Any]) -> list[list[str]]:
    """Rows of the goals table: the measured ratio next to its interval and, for the others'
    maximum, the flagged fraction and the floor and ceiling it implies."""
    cfg, ratios, goals = exp.config, summ["ratios"], summ["goals"]
    bound, days = summ["others_max_bound"], goals["days"]
    f = summ["flagged"]["fraction"]["mean"]
    return [
        [
            f"critical median <= {cfg.critical_median_ratio_goal:g} x FIFO",
            _fmt(ratios["critical_median"]),
            _ci_text(ratios["critical_median_ci"]),
            f"{goals['critical_median']['days_met']}/{days}",
            "-",
            "-",
            "-",
            goals["critical_median"]["verdict"],
        ],
        [
            f"others' max <= {cfg.others_max_ratio_goal:g} x FIFO",
            _fmt(ratios["others_max"]),
            _ci_text(ratios["others_max_ci"]),
            f"{goals['others_max']['days_met']}/{days}",
            "-" if f is None else f"{f:.1%}",
            _fmt(bound["floor"]),
            _fmt(bound["ceiling"]),
            goals["others_max"]["verdict"],
        ],
    ]


def goals_table(exp: Experiment, summ: dict[str, Any]) -> Table:
    """The goals as a rich table (see :func:`goal_rows`)."""
    table = Table(
        title="Goals (ratio of the means over the days; ρ = load while the worst study waits)",
        box=box.SIMPLE_HEAD,
    )
    for k, col in enumerate(GOAL_COLUMNS):
        table.add_column(col, justify="left" if k == 0 else "right", no_wrap=k == 0)
    for row in goal_rows(exp, summ):
        table.add_row(*row)
    return table


def rich_table(exp: Experiment, summ: dict[str, Any]) -> Table:
    """The comparison as a rich table (mean ± SD over the days when there are several).

    "no AI" is the policy never given an AI result; "triage" is the policy with the AI.
    """
    table = Table(
        title="FIFO vs triage policy (waits in minutes; late = read started after a deadline)",
        caption=_header(exp, summ),
        box=box.SIMPLE_HEAD,
    )
    table.add_column("", no_wrap=True)
    for col in ("FIFO", "no AI", "triage", "tri/FIFO"):
        table.add_column(col, justify="right")
    for row in table_rows(exp, summ, compact=True):
        table.add_row(*row)
    return table


def markdown(exp: Experiment, summ: dict[str, Any]) -> str:
    """The comparison as a markdown document."""
    lines = [
        "# Queue simulation: FIFO vs triage policy",
        "",
        _header(exp, summ) + ".",
        "",
        "| measure | FIFO | policy, no AI | triage | triage / FIFO |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in table_rows(exp, summ)]
    lines += ["", "| " + " | ".join(GOAL_COLUMNS) + " |", "|---" + "|---:" * 7 + "|"]
    lines += [f"| {' | '.join(row)} |" for row in goal_rows(exp, summ)]
    lines += ["", *[f"- {line}" for line in goal_lines(exp, summ)], ""]
    lines += [
        "Waits in minutes: start of the read - arrival. Critical = truly critical studies"
        " (whatever the AI said); others = every other study. A miss is a read that starts"
        " after a deadline (arrival + the policy's service-level time; *late* rows count them):"
        " *order SLA* is the"
        " deadline of the study's order priority and location without AI; *critical SLA* /"
        " *deserved SLA* is the deadline a perfect AI would give (critical for every critical"
        " study, the order class for the others). *Policy, no AI*: the same policy never given"
        " an AI result (order priority, location and aging only); triage = the policy with the"
        " AI. Mean ± SD over the days when there are"
        " several; the ratio is of the means, with its 95% confidence interval over the days"
        " (delta method). f = the share of studies the AI flags (true and false positives);"
        " ρ = the work arriving while the other study that waits longest under FIFO waits /"
        " the readers' time then. A study that waits for the backlog also waits, under"
        " triage, for the flagged work arriving meanwhile: triage / FIFO = 1/(1 − f·ρ) for"
        " that study (the floor), and at most 1/(1 − f) while the backlog cannot grow"
        " (the ceiling); the bounds use f's share of the reading time, equal to the share of"
        " studies when flags do not depend on the modality. The goal is reachable by"
        " construction when 1/(1 − f) <= goal and not reachable when the floor is above it;"
        " BORDERLINE: the confidence interval contains the goal (docs/simulation.md).",
        "",
        f"Simulation time: {exp.seconds:.2f} s.",
        "",
    ]
    return "\n".join(lines)


def to_json(exp: Experiment, summ: dict[str, Any]) -> dict[str, Any]:
    """Everything: the configuration, each day's results and the summary."""
    return {
        "config": exp.config.model_dump(mode="json"),
        "policy": {"version": POLICY_VERSION, "config_sha256": exp.config.policy.digest()},
        "runs": [r.to_json() for r in exp.runs],
        "summary": summ,
        "seconds": round(exp.seconds, 3),
    }


def plot(exp: Experiment, out: Path) -> list[Path]:
    """PNG plots of the first day: wait CDFs and the queue over the day."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = exp.runs[0]
    colours = {"fifo": "tab:blue", "policy_no_ai": "tab:grey", "triage": "tab:red"}
    styles = {"fifo": "-", "policy_no_ai": "--", "triage": "-"}
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (group, title) in zip(
        axes, (("critical", "critical studies"), ("others", "other studies")), strict=True
    ):
        for d in DISCIPLINES:
            waits = sorted(
                r.wait for r in run.logs[d].records if r.critical == (group == "critical")
            )
            if not waits:
                continue
            frac = [(k + 1) / len(waits) for k in range(len(waits))]
            ax.step(waits, frac, where="post", color=colours[d], ls=styles[d], label=d)
        ax.set_title(f"Wait before reading: {title}")
        ax.set_xlabel("wait (minutes)")
        ax.set_ylabel("fraction read within")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    paths.append(out / "wait_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for d in DISCIPLINES:
        series = run.logs[d].queue_series
        hours = [t / 60.0 for t, _, _ in series]
        for ax, values in zip(
            axes, ([w for _, w, _ in series], [c for _, _, c in series]), strict=True
        ):
            ax.step(hours, values, where="post", color=colours[d], ls=styles[d], label=d)
    axes[0].set_ylabel("studies waiting")
    axes[1].set_ylabel("critical studies waiting")
    axes[1].set_xlabel("hour of the day")
    axes[0].set_title("Queue over the day (first simulated day)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out / "queue_length.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _bound_curves(ax: Any, f_max: float, load: float | None, goal: float) -> None:
    """Draw the ceiling 1/(1-f), the floor 1/(1-f*rho) and the goal on ``ax`` (f in [0, 1))."""
    import numpy as np
    from matplotlib.ticker import PercentFormatter

    f = np.linspace(0.0, min(f_max, 0.95), 200)
    ax.plot(f, 1.0 / (1.0 - f), color="black", lw=1.2, label="ceiling 1/(1−f)")
    if load is not None and math.isfinite(load):
        ax.plot(
            f, 1.0 / (1.0 - f * load), color="black", ls="--", lw=1.2,
            label=f"floor 1/(1−f·ρ), mean ρ = {load:.2f}",
        )  # fmt: skip
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.axhline(goal, color="tab:green", lw=1.0, label=f"goal {goal:g}")
    ax.axvline(1.0 - 1.0 / goal, color="tab:green", ls=":", lw=1.0)


def plot_bound(exp: Experiment, summ: dict[str, Any], out: Path) -> Path:
    """PNG: each day's others' max ratio against its flagged fraction, with the bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bound = summ["others_max_bound"]
    goal = exp.config.others_max_ratio_goal
    fw = [r.flagged_work_fraction for r in exp.runs]
    ratios = [r.others_max_ratio for r in exp.runs]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    f_max = max(0.2, 1.6 * max(fw), 1.2 * (1.0 - 1.0 / goal)) if goal > 0 else 0.2
    _bound_curves(ax, f_max, bound["worst_wait_load"], goal)
    ax.scatter(fw, ratios, s=14, color="tab:red", alpha=0.6, label="one day", zorder=3)
    ratio, ci = summ["ratios"]["others_max"], summ["ratios"]["others_max_ci"]
    if ratio is not None:
        err = None if ci is None else [[ratio - ci[0]], [ci[1] - ratio]]
        ax.errorbar(
            [bound["flagged_work_fraction"]], [ratio], yerr=err, fmt="D", color="tab:blue",
            capsize=4, label=f"ratio of the means ({CONFIDENCE:.0%} CI)", zorder=4,
        )  # fmt: skip
    ax.set_xlabel("f: share of the reading time flagged by the AI")
    ax.set_ylabel("others' max wait, triage / FIFO")
    ax.set_title(f"Others' maximum wait against the flagged fraction ({len(exp.runs)} days)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "others_max_vs_flagged.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(exp: Experiment, out: Path) -> tuple[dict[str, Any], list[Path]]:
    """Write simulation.json, simulation.md and the PNGs to ``out``; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summ = summary(exp)
    json_path = out / "simulation.json"
    json_path.write_text(
        json.dumps(to_json(exp, summ), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    md_path = out / "simulation.md"
    md_path.write_text(markdown(exp, summ), encoding="utf-8")
    return summ, [json_path, md_path, *plot(exp, out), plot_bound(exp, summ, out)]


# -- sweeps --------------------------------------------------------------------------------


def sweep_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per cell: the swept values, the flagged fraction, both ratios with their
    confidence intervals, the bounds and the verdicts (JSON-ready; None for no value)."""
    rows = []
    for values, exp in sweep.cells:
        summ = summary(exp)
        bound, ratios, goals = summ["others_max_bound"], summ["ratios"], summ["goals"]
        rows.append(
            {
                **values,
                "days": len(exp.runs),
                "flagged_fraction": summ["flagged"]["fraction"]["mean"],
                "flagged_work_fraction": bound["flagged_work_fraction"],
                "worst_wait_load": bound["worst_wait_load"],
                "utilisation": summ["utilisation"]["mean"],
                "critical_median_ratio": ratios["critical_median"],
                "critical_median_ci": ratios["critical_median_ci"],
                "critical_median_verdict": goals["critical_median"]["verdict"],
                "others_max_ratio": ratios["others_max"],
                "others_max_ci": ratios["others_max_ci"],
                "others_max_days_met": goals["others_max"]["days_met"],
                "floor": bound["floor"],
                "ceiling": bound["ceiling"],
                "reachable": bound["reachable"],
                "others_max_verdict": goals["others_max"]["verdict"],
            }
        )
    return rows


def sweep_table_rows(sweep: Sweep, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the sweep table (one row per cell)."""
    names = [name for name, _ in sweep.parameters]
    header = [
        *names,
        "flagged f",
        "critical median tri/FIFO",
        "others' max tri/FIFO",
        "95% CI",
        "floor 1/(1-f·ρ)",
        "ceiling 1/(1-f)",
        "critical goal",
        "others' max goal",
    ]
    body = []
    for row in rows:
        body.append(
            [
                *[f"{row[n]:g}" for n in names],
                "-" if row["flagged_fraction"] is None else f"{row['flagged_fraction']:.1%}",
                _fmt(row["critical_median_ratio"]),
                _fmt(row["others_max_ratio"]),
                _ci_text(row["others_max_ci"]),
                _fmt(row["floor"]),
                _fmt(row["ceiling"]),
                row["critical_median_verdict"],
                row["others_max_verdict"],
            ]
        )
    return header, body


def _sweep_caption(sweep: Sweep) -> str:
    exp = sweep.cells[0][1]
    cfg = exp.config
    days = len(exp.runs)
    return (
        f"{len(sweep.cells)} cells x {days} simulated day(s) of {cfg.n_studies} studies (seeds"
        f" {cfg.seed}..{cfg.seed + days - 1} in every cell); goals: critical median <="
        f" {cfg.critical_median_ratio_goal:g} x FIFO, others' max <="
        f" {cfg.others_max_ratio_goal:g} x FIFO; f = share of studies flagged; ρ = load while"
        f" the worst study waits"
    )


def sweep_table(sweep: Sweep, rows: list[dict[str, Any]]) -> Table:
    """The sweep as a rich table."""
    table = Table(
        title="Trade-off: flagged fraction and the goals per cell (ratios of the means)",
        caption=_sweep_caption(sweep),
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    header, body = sweep_table_rows(sweep, rows)
    for col in header:
        table.add_column(col, justify="right")
    for cells in body:
        table.add_row(*cells)
    return table


def sweep_markdown(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """The sweep as a markdown document."""
    header, body = sweep_table_rows(sweep, rows)
    lines = [
        "# Queue simulation sweep: the flagged fraction against the goals",
        "",
        _sweep_caption(sweep) + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
        *[f"| {' | '.join(cells)} |" for cells in body],
        "",
        "Verdicts: MET / NOT MET when the 95% confidence interval of the ratio over the days"
        " is entirely within / above the goal; BORDERLINE when it contains the goal (more"
        " days would tell); NOT REACHABLE instead of NOT MET when the floor 1/(1 − f·ρ) is"
        " above the goal too: the flagged studies that arrive while the worst study waits"
        " push it past the goal whatever the policy's service levels. f = share of studies"
        " flagged; the floor and ceiling use the flagged share of the reading time"
        " (docs/simulation.md).",
        "",
        f"Simulation time: {sweep.seconds:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def plot_sweep(sweep: Sweep, rows: list[dict[str, Any]], out: Path) -> Path:
    """PNG: a heatmap of the others' max ratio per cell (annotated with the flagged fraction
    and the verdict) and every cell's ratio against its flagged fraction with the bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    cfg = sweep.cells[0][1].config
    goal = cfg.others_max_ratio_goal
    (name_y, ys), (name_x, xs) = (
        sweep.parameters if len(sweep.parameters) == 2 else [("", [0.0]), sweep.parameters[0]]
    )
    grid = np.full((len(ys), len(xs)), np.nan)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.0))
    short = {MET: "MET", NOT_MET: "NOT MET", BORDERLINE: "borderline", NOT_REACHABLE: "unreachable"}
    for row in rows:
        i = ys.index(row[name_y]) if name_y else 0
        j = xs.index(row[name_x])
        value = row["others_max_ratio"]
        grid[i, j] = np.nan if value is None else value
        f = row["flagged_fraction"]
        text = f"{_fmt(value)}\nf={'-' if f is None else f'{f:.1%}'}\n"
        text += short.get(row["others_max_verdict"], row["others_max_verdict"])
        ax.text(j, i, text, ha="center", va="center", fontsize=8)
    finite = grid[np.isfinite(grid)]
    low = min(goal - 0.1, float(finite.min()) if finite.size else goal)
    high = max(goal + 0.3, float(finite.max()) if finite.size else goal)
    norm = TwoSlopeNorm(vmin=low, vcenter=goal, vmax=high)  # green below the goal, red above
    image = ax.imshow(grid, cmap="RdYlGn_r", norm=norm, aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, label="others' max wait, triage / FIFO")
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys] if name_y else [""])
    ax.set_xlabel(name_x)
    ax.set_ylabel(name_y)
    ax.set_title(f"Others' max wait ratio per cell (goal <= {goal:g})")

    fw = [r["flagged_work_fraction"] or 0.0 for r in rows]
    loads = [r["worst_wait_load"] for r in rows if r["worst_wait_load"] is not None]
    mean_load = statistics.fmean(loads) if loads else None
    _bound_curves(ax2, max(0.2, 1.3 * max(fw)), mean_load, goal)
    for row in rows:
        ratio, ci = row["others_max_ratio"], row["others_max_ci"]
        if ratio is None:
            continue
        err = None if ci is None else [[ratio - ci[0]], [ci[1] - ratio]]
        ax2.errorbar([row["flagged_work_fraction"]], [ratio], yerr=err, fmt="o", ms=4,
                     color="tab:red", capsize=3)  # fmt: skip
    ax2.set_xlabel("f: share of the reading time flagged by the AI")
    ax2.set_ylabel("others' max wait, triage / FIFO")
    load_text = f"; ρ per cell {min(loads):.2f}-{max(loads):.2f}" if loads else ""
    ax2.set_title(f"Each cell's ratio against its flagged fraction{load_text}")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep_outputs(sweep: Sweep, out: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Write sweep.json, sweep.md and sweep.png to ``out``; return the rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows(sweep)
    exp = sweep.cells[0][1]
    doc = {
        "config": exp.config.model_dump(mode="json"),
        "policy": {"version": POLICY_VERSION, "config_sha256": exp.config.policy.digest()},
        "parameters": {name: values for name, values in sweep.parameters},
        "days_per_cell": len(exp.runs),
        "confidence": CONFIDENCE,
        "cells": rows,
        "seconds": round(sweep.seconds, 3),
    }
    json_path = out / "sweep.json"
    json_path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path = out / "sweep.md"
    md_path.write_text(sweep_markdown(sweep, rows), encoding="utf-8")
    return rows, [json_path, md_path, plot_sweep(sweep, rows, out)]
