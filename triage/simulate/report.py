"""Summaries of a simulation: the comparison table (rich and markdown), JSON and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from triage.simulate.model import DISCIPLINES, GROUPS, Experiment, RunResult
from triage.worklist.priority import POLICY_VERSION

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

    return {
        "disciplines": per,
        "utilisation": spread([r.utilisation for r in runs]),
        "counts": {k: spread([float(r.counts[k]) for r in runs]) for k in runs[0].counts},
        "ratios": {
            "critical_median": ratio(tri_crit, fifo_crit),
            "others_max": ratio(tri_max, fifo_max),
            "critical_median_per_day": spread([r.critical_median_ratio for r in runs]),
            "others_max_per_day": spread([r.others_max_ratio for r in runs]),
        },
        "goals": {
            "critical_median": {
                "goal": f"triage <= {cfg.critical_median_ratio_goal:g} x FIFO",
                "met_on_means": within(tri_crit, fifo_crit, cfg.critical_median_ratio_goal),
                "days_met": sum(r.goal_critical_median for r in runs),
            },
            "others_max": {
                "goal": f"triage <= {cfg.others_max_ratio_goal:g} x FIFO",
                "met_on_means": within(tri_max, fifo_max, cfg.others_max_ratio_goal),
                "days_met": sum(r.goal_others_max for r in runs),
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


def goal_lines(exp: Experiment, summ: dict[str, Any]) -> list[str]:
    """One line per goal: the ratio and whether it is met."""
    goals, ratios = summ["goals"], summ["ratios"]
    days = goals["days"]

    def verdict(g: dict[str, Any]) -> str:
        met = g["met_on_means"]
        word = "not measurable" if met is None else ("MET" if met else "NOT MET")
        return word + (f" ({g['days_met']}/{days} days)" if days > 1 else "")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    return [
        f"critical median wait, triage / FIFO = {fmt(ratios['critical_median'])}"
        f" (goal <= {exp.config.critical_median_ratio_goal:g}): "
        + verdict(goals["critical_median"]),
        f"others' max wait, triage / FIFO = {fmt(ratios['others_max'])}"
        f" (goal <= {exp.config.others_max_ratio_goal:g}): " + verdict(goals["others_max"]),
    ]


def _header(exp: Experiment, summ: dict[str, Any]) -> str:
    c = {k: v["mean"] for k, v in summ["counts"].items()}
    u = summ["utilisation"]["mean"]
    days = len(exp.runs)
    seeds = f"{exp.config.seed}" + (f"..{exp.config.seed + days - 1}" if days > 1 else "")
    return (
        f"{days} simulated day(s) of {exp.config.n_studies} studies (seed {seeds}):"
        f" {c['critical']:.1f} critical, AI true positives {c['true_positive']:.1f},"
        f" false negatives {c['false_negative']:.1f}, false positives {c['false_positive']:.1f};"
        f" reader utilisation {u:.1%}; policy {POLICY_VERSION} {exp.config.policy.digest()}"
    )


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
        " several; the ratio is of the means.",
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
    return summ, [json_path, md_path, *plot(exp, out)]
