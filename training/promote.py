"""Promotion: a candidate version takes the ``champion`` alias only if it is not worse.

Both the candidate and the version serving now (the alias's version, or the built-in
pinned weights when the alias is unset) run on the same frozen evaluation set, each with
its own stored thresholds. The candidate is promoted when, on every declared metric, it
is at least the champion's value minus the tolerance (an undefined metric on both sides is
not compared; undefined on the candidate's side only counts as worse). The decision, the
metrics of both, the frozen set's fingerprint and the version compared against are written
on the candidate's model version (tags and description) whatever the outcome, and the
alias moves only on promotion. ``triage serve`` pointed at the registry serves the new
version within its poll interval.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.data.dataset import StudyRecord
from training.data.splits import fingerprint
from training.evaluate import Evaluation, build_model, evaluate
from training.metrics import Summary
from training.tracking import client, ensure_experiment, log_metrics
from triage.models.mlflow_registry import RegistrySource
from triage.models.spec import ModelSpec
from triage.models.store import ModelStore

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METRICS",
    "Decision",
    "cached_evaluation",
    "compare",
    "promote",
    "record_evaluation",
]

#: Model version tag holding the version's metrics on a frozen set (+ its fingerprint).
EVALUATION_TAG = "evaluation."


def _tag(frozen: str) -> str:
    return f"{EVALUATION_TAG}{frozen[:16]}"


def record_evaluation(c: Any, name: str, version: str, frozen: str, ev: Evaluation) -> None:
    """Keep a version's metrics on the frozen set ``frozen`` on the version (a tag)."""
    doc = {
        "frozen_set": frozen,
        "threshold": ev.threshold,
        "studies": len(ev.studies),
        "metrics": {k: round(v, 6) for k, v in ev.metrics.items() if math.isfinite(v)},
    }
    c.set_model_version_tag(name, version, _tag(frozen), json.dumps(doc, sort_keys=True))


def cached_evaluation(
    c: Any, name: str, version: str, frozen: str, model: Any
) -> Evaluation | None:
    """The version's metrics on ``frozen`` kept by :func:`record_evaluation` (at the
    threshold its spec holds now), or None."""
    raw = c.get_model_version(name, version).tags.get(_tag(frozen))
    if not raw:
        return None
    doc = json.loads(raw)
    finding = model.spec.findings[0]
    if doc.get("frozen_set") != frozen or doc.get("threshold") != finding.threshold:
        return None
    metrics = {k: float(v) for k, v in doc["metrics"].items()}
    for key in ("auroc", "sensitivity", "specificity"):
        metrics.setdefault(key, math.nan)
    return Evaluation(
        model=model.spec.name,
        version=model.spec.version,
        weights_sha256=(),
        finding=finding.code,
        threshold=float(doc["threshold"]),
        summary=Summary(metrics=metrics),
        studies=[],
    )


#: Metrics a candidate must not be worse on, per task (higher is better for all).
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": ("auroc", "sensitivity", "specificity"),
    "classification": ("auroc", "sensitivity", "specificity"),
}


@dataclass
class Decision:
    """The outcome of a promotion.

    Attributes:
        promoted: the alias now points at the candidate.
        name: the registered model.
        candidate: the candidate's registry version.
        champion: what it was compared with (``"v<N>"`` or ``"built-in <version>"``).
        metrics: metric -> (candidate, champion).
        reasons: why it was refused (empty when promoted).
        frozen_set: fingerprint of the evaluation set.
        studies: how many studies it holds.
    """

    promoted: bool
    name: str
    candidate: str
    champion: str
    metrics: dict[str, tuple[float, float]]
    reasons: list[str] = field(default_factory=list)
    frozen_set: str = ""
    studies: int = 0

    def to_json(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 6)

        return {
            "decision": "promoted" if self.promoted else "refused",
            "name": self.name,
            "candidate": self.candidate,
            "compared_with": self.champion,
            "metrics": {k: [clean(a), clean(b)] for k, (a, b) in self.metrics.items()},
            "reasons": self.reasons,
            "frozen_set": self.frozen_set,
            "studies": self.studies,
        }


def compare(
    candidate: dict[str, float],
    champion: dict[str, float],
    metrics: Sequence[str],
    tolerance: float,
) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """The declared metrics side by side, and why the candidate is worse (empty: it is
    not)."""
    table: dict[str, tuple[float, float]] = {}
    reasons: list[str] = []
    for m in metrics:
        a = float(candidate.get(m, math.nan))
        b = float(champion.get(m, math.nan))
        table[m] = (a, b)
        if math.isnan(a) and math.isnan(b):
            continue
        if math.isnan(a):
            reasons.append(f"{m}: undefined for the candidate, {b:.4f} for the champion")
        elif not math.isnan(b) and a < b - tolerance:
            reasons.append(f"{m}: {a:.4f} < {b:.4f} (tolerance {tolerance:g})")
    return table, reasons


def promote(
    *,
    uri: str,
    name: str,
    candidate: str,
    records: Sequence[StudyRecord],
    finding: str,
    builtin: ModelSpec,
    builtin_store: ModelStore,
    cache_dir: Path,
    alias: str = "champion",
    metrics: Sequence[str] | None = None,
    tolerance: float = 0.0,
    synthetic: bool = False,
    plots_dir: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Decision, Evaluation, Evaluation]:
    """Compare registry version ``candidate`` of ``name`` with the alias's version (or the
    built-in model) on ``records`` and move the alias only if it is not worse.

    Returns:
        The decision and both evaluations (candidate, champion).

    Raises:
        RegistryError: the registry cannot be read or the candidate is not a usable model.
    """
    source = RegistrySource(uri, alias=alias, cache_dir=cache_dir)
    cand = source.fetch(name, candidate)
    current = source.alias_version(name)
    if current is not None:
        champ = source.fetch(name, current)
        champion_label = f"v{current}"
        champion_model = build_model(champ.spec, champ.store)
    else:
        champion_label = f"built-in {builtin.version}"
        champion_model = build_model(builtin, builtin_store)
    candidate_model = build_model(cand.spec, cand.store)
    declared = tuple(metrics or DEFAULT_METRICS[cand.spec.task])
    frozen = fingerprint(records)
    c = client(uri)

    def report(which: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(which, done, total)

    def measured(which: str, model: Any, version: str | None) -> Evaluation:
        # A registry version measured on this frozen set before (by fit or an earlier
        # promotion) is not run again: its metrics are kept on the version.
        if version is not None:
            cached = cached_evaluation(c, name, version, frozen, model)
            if cached is not None:
                return cached
        ev = evaluate(
            model,
            records,
            finding=finding,
            synthetic=synthetic,
            plots_dir=None if plots_dir is None else plots_dir / which,
            progress=report(which),
        )
        if version is not None:
            record_evaluation(c, name, version, frozen, ev)
        return ev

    ev_cand = measured("candidate", candidate_model, candidate)
    ev_champ = measured("champion", champion_model, current)
    table, reasons = compare(ev_cand.metrics, ev_champ.metrics, declared, tolerance)
    if current == candidate:
        reasons = [f"version {candidate} already holds the alias {alias}"]
    decision = Decision(
        promoted=not reasons,
        name=name,
        candidate=candidate,
        champion=champion_label,
        metrics=table,
        reasons=reasons,
        frozen_set=frozen,
        studies=len(records),
    )
    _record(uri, decision, alias, ev_cand, ev_champ, tolerance)
    return decision, ev_cand, ev_champ


def _record(
    uri: str,
    decision: Decision,
    alias: str,
    ev_cand: Evaluation,
    ev_champ: Evaluation,
    tolerance: float,
) -> None:
    """Write the decision on the model version, log a promotion run, move the alias."""
    c = client(uri)
    name, version = decision.name, decision.candidate
    doc = decision.to_json()
    doc["alias"] = alias
    doc["tolerance"] = tolerance
    doc["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    tags = {
        "promotion.decision": doc["decision"],
        "promotion.compared_with": decision.champion,
        "promotion.frozen_set": decision.frozen_set,
        "promotion.metrics": json.dumps(doc["metrics"], sort_keys=True),
        "promotion.at": doc["at"],
    }
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    verdict = (
        f"Promoted to @{alias} on {doc['at']}"
        if decision.promoted
        else f"Refused for @{alias} on {doc['at']}: " + "; ".join(decision.reasons)
    )
    c.update_model_version(
        name,
        version,
        description=f"{verdict}. Compared with {decision.champion} on the frozen set "
        f"{decision.frozen_set[:12]} ({decision.studies} studies).",
    )
    experiment = ensure_experiment(uri)
    run = c.create_run(experiment, run_name=f"promote {name} v{version}")
    run_id = run.info.run_id
    c.log_dict(run_id, doc, "decision.json")
    c.set_tag(run_id, "promotion.decision", doc["decision"])
    log_metrics(c, run_id, ev_cand.metrics, prefix="candidate_")
    log_metrics(c, run_id, ev_champ.metrics, prefix="champion_")
    for label, ev in (("candidate", ev_cand), ("champion", ev_champ)):
        for path in ev.plots.values():
            c.log_artifact(run_id, str(path), artifact_path=f"plots/{label}")
    c.set_terminated(run_id)
    if decision.promoted:
        c.set_registered_model_alias(name, alias, version)
        log.info("model %s version %s promoted to @%s", name, version, alias)
    else:
        log.info("model %s version %s refused for @%s", name, version, alias)
