"""The report of a replay: the server's ordering next to the simulated ones, on the same day.

Waits are in simulated minutes. The server's waits are what the replay's clients saw (STOW-RS
request sent -> a reader's ``/next`` answer returned the study), the simulated ones come from
:func:`triage.simulate.model.run_day` on the same seed. The table rows and the statistics
(:func:`triage.simulate.model.summarise`) are the simulator's, so a cell means the same in
both reports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.table import Table

from triage.simulate.model import DISCIPLINES, GroupStats, ReadRecord, summarise
from triage.simulate.replay import ReplayResult, StudyTrace
from triage.simulate.replay_setup import scaled_policy
from triage.simulate.report import ROWS
from triage.worklist.priority import POLICY_VERSION

LAG_LIMIT_MINUTES = 1.0
"""A replay keeps up when no study is sent more than this many simulated minutes late..."""
STOW_LIMIT_MINUTES = 0.5
"""...storing a study (STOW-RS, counted in its wait) takes this long at most on average..."""
OVERHEAD_LIMIT_SHARE = 0.05
"""...and the /complete + /next round trips add at most this share to the mean read time."""

SERVER = "server"
"""The replayed ordering's name beside :data:`~triage.simulate.model.DISCIPLINES`."""

COLUMNS: tuple[str, ...] = (
    "measure",
    "FIFO (sim)",
    "policy, no AI (sim)",
    "triage (sim)",
    "server (replay)",
    "server / triage",
)

REPLAY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("critical", "mean", "critical: mean wait"),
    ("critical", "median", "critical: median wait"),
    ("critical", "p95", "critical: p95 wait"),
    ("critical", "max", "critical: max wait"),
    ("others", "mean", "others: mean wait"),
    ("others", "median", "others: median wait"),
    ("others", "p95", "others: p95 wait"),
    ("others", "max", "others: max wait"),
    *(row for row in ROWS if row[0] == "critical_ai_missed" or row[1].startswith("misses")),
)
"""(group, metric, label) rows: the waits of each class, then the simulator's other rows."""


def server_records(result: ReplayResult) -> list[ReadRecord]:
    """The server's reads as the simulator's records: start = arrival + the measured wait
    (simulated minutes); flagged = the server's finding after the day (else at the claim);
    the deadlines are the simulation's (unscaled) for the same study."""
    deadlines = {r.index: (r.sla_order, r.sla_true) for r in result.simulated.logs["fifo"].records}
    records = []
    for study, trace in zip(result.studies, result.traces, strict=True):
        assert trace.claimed is not None and trace.sent is not None
        flagged = trace.final_flag if trace.final_flag is not None else trace.flagged_at_claim
        sla_order, sla_true = deadlines[study.index]
        records.append(
            ReadRecord(
                index=study.index,
                arrival=study.arrival,
                start=study.arrival + result.sim_minutes(trace.claimed - trace.sent),
                read_minutes=study.read_minutes,
                critical=study.critical,
                flagged=bool(flagged),
                sla_order=sla_order,
                sla_true=sla_true,
            )
        )
    return records


def _starts(records: list[ReadRecord]) -> list[float]:
    return [r.start for r in sorted(records, key=lambda r: r.index)]


def _kendall(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import kendalltau

    if len(a) < 2:
        return None
    tau = float(kendalltau(a, b).statistic)
    return None if math.isnan(tau) else round(tau, 4)


def _stat(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p95": None, "max": None}
    arr = np.array(values)
    return {
        "mean": round(float(arr.mean()), 4),
        "p95": round(float(np.percentile(arr, 95)), 4),
        "max": round(float(arr.max()), 4),
    }


def summary(result: ReplayResult) -> dict[str, Any]:
    """The comparison: statistics per ordering, order agreement, timing and checks."""
    records = server_records(result)
    logs = result.simulated.logs
    stats: dict[str, dict[str, GroupStats]] = {d: summarise(logs[d].records) for d in DISCIPLINES}
    stats[SERVER] = summarise(records)
    server_starts = _starts(records)
    agreement = {d: _kendall(server_starts, _starts(logs[d].records)) for d in DISCIPLINES}
    traces = result.traces
    studies = result.studies
    lag = [
        result.sim_minutes(t.sent) - s.arrival
        for s, t in zip(studies, traces, strict=True)
        if t.sent is not None
    ]
    stow = [t.stored - t.sent for t in traces if t.stored is not None and t.sent is not None]
    triage_start = {r.index: r.start for r in logs["triage"].records}
    covered = [s for s in studies if s.ai_covered]
    before_ai_sim = sum(triage_start[s.index] < s.ai_ready for s in covered)
    before_ai_server = sum(traces[s.index].ai_status_at_claim == "pending" for s in covered)
    drawn = [s for s in studies if s.ai_flag]
    server_flags = sum(bool(traces[s.index].final_flag) for s in drawn)
    unexpected = sum(bool(traces[s.index].final_flag) for s in studies if not s.ai_flag)
    critical = [s for s in studies if s.critical]
    checks = {
        "studies": len(studies),
        "read_exactly_once": all(t.claims == 1 and t.completions == 1 for t in traces),
        "claims": sum(t.claims for t in traces),
        "completions": sum(t.completions for t in traces),
        "server_completed": sum(t.final_read_state == "completed" for t in traces),
        "completed_by_claimant": sum(
            t.completed_by is not None and t.completed_by == t.reader for t in traces
        ),
        "simulated_flags": len(drawn),
        "server_flags_of_simulated": server_flags,
        "server_flags_not_simulated": unexpected,
        "critical": len(critical),
        "critical_flagged_by_server": sum(bool(traces[s.index].final_flag) for s in critical),
        "final_ai_status": _counts(t.final_ai_status for t in traces),
    }
    quiet, poll = result.server_timing
    overhead = [
        t.next_seconds + t.complete_seconds
        for t in traces
        if t.next_seconds is not None and t.complete_seconds is not None
    ]
    sent = [(s.arrival, t.sent) for s, t in zip(studies, traces, strict=True) if t.sent is not None]
    return {
        "fidelity": fidelity(result, lag, stow, overhead, sent),
        "disciplines": {
            d: {g: s.to_json() for g, s in groups.items()} for d, groups in stats.items()
        },
        "order_agreement_kendall_tau": agreement,
        "timing": {
            "replay_seconds": round(result.seconds, 3),
            "send_lag_minutes": _stat(lag),
            "stow_seconds": _stat(stow),
            "stow_minutes": _stat([result.sim_minutes(x) for x in stow]),
            # The reader's time between two reads (complete, then next): not in the simulation.
            "next_seconds": _stat([t.next_seconds for t in traces if t.next_seconds is not None]),
            "complete_seconds": _stat(
                [t.complete_seconds for t in traces if t.complete_seconds is not None]
            ),
            "overhead_per_read_minutes": _stat(
                [
                    result.sim_minutes(t.next_seconds + t.complete_seconds)
                    for t in traces
                    if t.next_seconds is not None and t.complete_seconds is not None
                ]
            ),
            "ai_covered": len(covered),
            "claimed_before_ai_server": before_ai_server,
            "claimed_before_ai_simulated": before_ai_sim,
            "ai_latency_minutes_simulated": result.config.ai_latency_minutes,
            "server_series_quiet_seconds": quiet,
            "server_worker_poll_seconds": poll,
            "lease_seconds": result.lease_seconds,
        },
        "checks": checks,
    }


def fidelity(
    result: ReplayResult,
    lag: list[float],
    stow: list[float],
    overhead: list[float],
    sent: list[tuple[float, float]],
) -> dict[str, Any]:
    """Whether the server (and this machine) kept up with the speed, and a speed that would.

    Args:
        lag: each study's send delay after its arrival, simulated minutes.
        stow: each STOW-RS request's duration, real seconds.
        overhead: each read's /complete + /next round trips, real seconds.
        sent: (simulated arrival minute, real second sent) of each study.

    Returns:
        The three measures against their limits (:data:`LAG_LIMIT_MINUTES`,
        :data:`STOW_LIMIT_MINUTES`, :data:`OVERHEAD_LIMIT_SHARE`), ``kept_up``, and
        ``suggested_speed``: the highest speed at which the same round-trip times and send
        rate would stay within them (None when kept up; a lighter load usually answers
        faster, so it is a conservative guess).
    """
    speed = result.speed
    mean_read = float(np.mean([s.read_minutes for s in result.studies]))
    lag_max = max(lag, default=0.0)
    stow_mean = float(np.mean(stow)) if stow else 0.0
    overhead_mean = float(np.mean(overhead)) if overhead else 0.0
    overhead_share = result.sim_minutes(overhead_mean) / mean_read if mean_read > 0 else 0.0
    kept_up = (
        lag_max <= LAG_LIMIT_MINUTES
        and result.sim_minutes(stow_mean) <= STOW_LIMIT_MINUTES
        and overhead_share <= OVERHEAD_LIMIT_SHARE
    )
    suggested = None
    if not kept_up:
        bounds = [speed]
        if stow_mean > 0:
            bounds.append(STOW_LIMIT_MINUTES * 60.0 / stow_mean)
        if overhead_mean > 0:
            bounds.append(OVERHEAD_LIMIT_SHARE * mean_read * 60.0 / overhead_mean)
        if lag_max > LAG_LIMIT_MINUTES and len(sent) > 1:
            ideal = (sent[-1][0] - sent[0][0]) * 60.0 / speed
            actual = max(t for _, t in sent) - min(t for _, t in sent)
            if actual > 0 and ideal > 0:
                bounds.append(speed * ideal / actual)
        best = min(bounds)
        digits = 10 ** max(0, math.floor(math.log10(best)) - 1) if best >= 1 else 1
        suggested = max(1.0, math.floor(best / digits) * digits)
    return {
        "kept_up": kept_up,
        "send_lag_max_minutes": round(lag_max, 4),
        "stow_mean_minutes": round(result.sim_minutes(stow_mean), 4),
        "overhead_share_of_mean_read": round(overhead_share, 4),
        "limits": {
            "send_lag_max_minutes": LAG_LIMIT_MINUTES,
            "stow_mean_minutes": STOW_LIMIT_MINUTES,
            "overhead_share_of_mean_read": OVERHEAD_LIMIT_SHARE,
        },
        "suggested_speed": suggested,
    }


def _counts(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def _cell(value: float | int | None, integer: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0f}" if integer else f"{value:.1f}"


def table_rows(summ: dict[str, Any]) -> list[list[str]]:
    """Rows of the comparison: label, FIFO, policy without AI, triage (simulated), the
    server (replayed), server / simulated triage."""
    per = summ["disciplines"]
    rows = []
    for group, metric, label in REPLAY_ROWS:
        integer = metric.startswith("misses")
        values = [per[d][group][metric] for d in (*DISCIPLINES, SERVER)]
        sim, server = values[2], values[3]
        ratio = f"{server / sim:.3f}" if sim and server is not None else "-"
        rows.append([label, *(_cell(v, integer) for v in values), ratio])
    return rows


def header(result: ReplayResult, summ: dict[str, Any]) -> str:
    """One line: the day, the speed, the server and its policy."""
    c = summ["checks"]
    policy = scaled_policy(result.config.policy, result.speed)
    return (
        f"replay of seed {result.seed}: {c['studies']} studies ({c['critical']} critical,"
        f" {c['simulated_flags']} flagged by the simulated AI), {len(result.facts.readers)}"
        f" readers, at {result.speed:g}x through {result.url} in {result.seconds:.1f} s;"
        f" policy {POLICY_VERSION} {result.config.policy.digest()} (server: scaled"
        f" {policy.digest()})"
    )


def lines(result: ReplayResult, summ: dict[str, Any]) -> list[str]:
    """Whether the replay kept up, the order agreement, the checks, the timing and the AI
    latency, one line each."""
    c, t, tau = summ["checks"], summ["timing"], summ["order_agreement_kendall_tau"]
    f = summ["fidelity"]

    def num(x: float | None, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    once = (
        "every study read exactly once" if c["read_exactly_once"] else "NOT every study read once"
    )
    measures = (
        f"arrivals up to {f['send_lag_max_minutes']:.2f} min late, storing"
        f" {f['stow_mean_minutes']:.2f} min, round trips {f['overhead_share_of_mean_read']:.1%}"
        " of the mean read"
    )
    if f["kept_up"]:
        verdict = f"fidelity: the replay kept up at {result.speed:g}x ({measures})"
    else:
        verdict = (
            f"WARNING: the replay did not keep up at {result.speed:g}x ({measures}; limits"
            f" {LAG_LIMIT_MINUTES:g} min, {STOW_LIMIT_MINUTES:g} min,"
            f" {OVERHEAD_LIMIT_SHARE:.0%}): the server's waits include these delays; replay at"
            f" --speed {f['suggested_speed']:g} or less"
        )
    return [
        verdict,
        "order agreement with the server's reads (Kendall tau of the read starts):"
        f" FIFO {num(tau['fifo'])}, policy no AI {num(tau['policy_no_ai'])},"
        f" triage {num(tau['triage'])}",
        f"checks: {once} ({c['claims']} claims, {c['completions']} completions; the server"
        f" lists {c['server_completed']}/{c['studies']} completed, by the claiming reader"
        f" {c['completed_by_claimant']}); the server flagged {c['server_flags_of_simulated']}"
        f" of the {c['simulated_flags']} simulated flags ({c['critical_flagged_by_server']}"
        f" of {c['critical']} critical studies), and {c['server_flags_not_simulated']} others",
        f"timing: arrivals sent up to {num(t['send_lag_minutes']['max'], 2)} simulated min late"
        f" (p95 {num(t['send_lag_minutes']['p95'], 2)}); STOW-RS took"
        f" {num(t['stow_seconds']['mean'])} s on average ({num(t['stow_minutes']['mean'], 2)}"
        " simulated min, counted in the server's waits); each read cost its reader"
        f" {num(t['overhead_per_read_minutes']['mean'], 2)} simulated min more (the /complete"
        " and /next round trips; none in the simulation)",
        f"AI: claimed before their AI result: server {t['claimed_before_ai_server']},"
        f" simulation {t['claimed_before_ai_simulated']} of {t['ai_covered']} covered studies"
        f" (simulated AI latency {t['ai_latency_minutes_simulated']:g} min; a server started"
        f" with --replay-setup's settings: quiet {t['server_series_quiet_seconds']:g} s + poll"
        f" {t['server_worker_poll_seconds']:g} s + the analysis)",
    ]


def rich_table(result: ReplayResult, summ: dict[str, Any]) -> Table:
    """The comparison as a rich table (the simulator's table style)."""
    table = Table(
        title="Replay: the server's ordering vs the simulated ones (waits in simulated minutes)",
        caption=header(result, summ),
        box=box.SIMPLE_HEAD,
    )
    table.add_column("", no_wrap=True)
    for col in ("FIFO", "no AI", "triage", "server", "srv/tri"):
        table.add_column(col, justify="right")
    for row in table_rows(summ):
        table.add_row(*row)
    return table


def markdown(result: ReplayResult, summ: dict[str, Any]) -> str:
    """The comparison as a markdown document."""
    out = [
        "# Queue simulation replayed through a server",
        "",
        header(result, summ) + ".",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---" + "|---:" * (len(COLUMNS) - 1) + "|",
        *[f"| {' | '.join(row)} |" for row in table_rows(summ)],
        "",
        *[f"- {line}" for line in lines(result, summ)],
        "",
        "Waits in simulated minutes (real seconds x speed / 60). *Server*: measured by the"
        " replay's clients, from the STOW-RS request that sent the study to the `/next` answer"
        " that gave it to a reader; the server ranked it with its real policy code, its"
        " service-level times divided by the speed, and the findings its worker recorded. The"
        " simulated columns are `triage simulate` on the same seed (one day). Critical = truly"
        " critical studies; late = read started after a deadline (the simulation's deadlines,"
        ' for every column). See docs/simulation.md, "Replay through a server".',
        "",
    ]
    return "\n".join(out)


def _study_rows(result: ReplayResult) -> list[dict[str, Any]]:
    starts = {d: {r.index: r.start for r in result.simulated.logs[d].records} for d in DISCIPLINES}
    server = {r.index: r.start for r in server_records(result)}
    rows = []
    for study, trace in zip(result.studies, result.traces, strict=True):
        rows.append(
            {
                "index": study.index,
                "modality": study.modality,
                "order_priority": study.order_priority,
                "location": study.location,
                "critical": study.critical,
                "ai_covered": study.ai_covered,
                "ai_flag": study.ai_flag,
                "arrival": round(study.arrival, 4),
                "read_minutes": round(study.read_minutes, 4),
                "start": {
                    **{d: round(starts[d][study.index], 4) for d in DISCIPLINES},
                    SERVER: round(server[study.index], 4),
                },
                "server": _trace_json(trace, result),
            }
        )
    return rows


def _trace_json(trace: StudyTrace, result: ReplayResult) -> dict[str, Any]:
    stow = None
    if trace.stored is not None and trace.sent is not None:
        stow = round(trace.stored - trace.sent, 4)
    return {
        "reader": trace.reader,
        "claims": trace.claims,
        "completions": trace.completions,
        "stow_seconds": stow,
        "next_seconds": None if trace.next_seconds is None else round(trace.next_seconds, 4),
        "complete_seconds": (
            None if trace.complete_seconds is None else round(trace.complete_seconds, 4)
        ),
        "ai_status_at_claim": trace.ai_status_at_claim,
        "class_at_claim": trace.class_at_claim,
        "tier_at_claim": trace.tier_at_claim,
        "flagged_at_claim": trace.flagged_at_claim,
        "final_ai_status": trace.final_ai_status,
        "final_flag": trace.final_flag,
        "read_state": trace.final_read_state,
        "completed_by": trace.completed_by,
    }


def to_json(result: ReplayResult, summ: dict[str, Any]) -> dict[str, Any]:
    """Everything: settings, the server, both orderings' statistics, checks, each study."""
    policy = scaled_policy(result.config.policy, result.speed)
    return {
        "config": result.config.model_dump(mode="json"),
        "seed": result.seed,
        "speed": result.speed,
        "policy": {"version": POLICY_VERSION, "config_sha256": result.config.policy.digest()},
        "server": {
            "url": result.url,
            "policy_config": result.facts.policy_digest,
            "scaled_sla_minutes": dict(policy.sla_minutes),
            "readers": list(result.facts.readers),
            "ingest_account": result.facts.ingest_account,
            "models": result.facts.models,
        },
        **summ,
        "studies": _study_rows(result),
    }


def write_outputs(result: ReplayResult, out: Path) -> tuple[dict[str, Any], list[Path]]:
    """Write replay.json and replay.md to ``out``; return the summary and the paths."""
    out.mkdir(parents=True, exist_ok=True)
    summ = summary(result)
    json_path = out / "replay.json"
    json_path.write_text(
        json.dumps(to_json(result, summ), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    md_path = out / "replay.md"
    md_path.write_text(markdown(result, summ), encoding="utf-8")
    return summ, [json_path, md_path]
