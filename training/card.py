"""Model cards: a Markdown page describing one candidate model version.

:func:`model_card` writes what a reader of the registry needs to judge a version: which
model and version it is and which weights it started from, what it is for (a triage
prioritisation aid, not a diagnosis; not cleared), the data it was trained and measured on
(name, source, studies per split, fingerprints), its metrics with confidence intervals, the
operating threshold and how it was chosen, its limits, and the licences and attributions of
the weights and of the data. When the data are synthetic, a plain statement at the top says
that the numbers say nothing about patients.

Undefined metrics (``nan`` in :attr:`training.metrics.Summary.metrics`) are written as
"not defined (reason)", the reason taken from :attr:`training.metrics.Summary.reasons`. The
card holds no patient data: no UIDs, names or per-study rows, only counts and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from training.evaluate import Evaluation
from training.metrics import ALL_SUBTYPES, DetectionLimitTable
from triage.models.spec import FindingSpec, ModelSpec

__all__ = ["SYNTHETIC_STATEMENT", "model_card"]

#: The statement at the top of the card of a version trained or measured on synthetic data.
SYNTHETIC_STATEMENT: Final = (
    "Demonstration only: trained and measured on synthetic data; not a clinical model; "
    "these numbers say nothing about performance on patients."
)

#: Level of the intervals :func:`training.metrics.summarise` reports (its default alpha).
_LEVEL: Final = "95%"

#: provenance keys shown in "Training" (in this order), with their labels.
_TRAINING_KEYS: Final[tuple[tuple[str, str], ...]] = (
    ("steps", "Optimiser steps"),
    ("batch_size", "Batch size"),
    ("lr", "Learning rate"),
    ("seed", "Seed"),
    ("init", "Initialisation"),
    ("device", "Device"),
)


def _cell(value: object) -> str:
    """A value for one Markdown table cell (no line breaks, pipes escaped)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def _reasons(reasons: Sequence[str]) -> dict[str, str]:
    """Metric name -> why it is undefined, from ``Summary.reasons`` lines
    (``"name1, name2: why"``)."""
    out: dict[str, str] = {}
    for line in reasons:
        names, sep, why = line.partition(": ")
        if not sep:
            continue
        for name in names.split(", "):
            out.setdefault(name.strip(), why.strip())
    return out


class _Metrics:
    """Formatting of an evaluation's metrics, with the reasons for undefined ones."""

    def __init__(self, metrics: Mapping[str, float], reasons: Sequence[str]) -> None:
        self.m = metrics
        self.why = _reasons(reasons)

    def defined(self, name: str) -> bool:
        v = self.m.get(name)
        return v is not None and math.isfinite(v)

    def undefined(self, name: str) -> str:
        if name not in self.m:
            return "not measured"
        return f"not defined ({self.why.get(name, 'no reason recorded')})"

    def value(self, name: str, digits: int = 3, unit: str = "") -> str:
        if not self.defined(name):
            return self.undefined(name)
        return f"{_num(self.m[name], digits)}{unit}"

    def count(self, name: str) -> str:
        return str(int(self.m[name])) if self.defined(name) else self.undefined(name)

    def with_ci(self, name: str, how: str, digits: int = 3) -> str:
        if not self.defined(name):
            return self.undefined(name)
        low, high = self.m.get(f"{name}_ci_low"), self.m.get(f"{name}_ci_high")
        text = _num(self.m[name], digits)
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            return f"{text} ({_LEVEL} CI {_num(low, digits)}–{_num(high, digits)}, {how})"
        return f"{text} (interval not defined: {self.why.get(f'{name}_ci_low', 'no reason')})"

    def at_target(self, name: str, unit: str) -> str:
        """A rate at a target operating point, with the threshold reaching it."""
        text = self.value(name)
        if self.defined(name) and self.defined(f"{name}_threshold"):
            text += f" (threshold {self.m[f'{name}_threshold']:.3g}{unit})"
        return text

    def rate(self, name: str, k: str, total: tuple[str, str]) -> str:
        """A rate with its Wilson interval and counts (``k`` of ``total[0] + total[1]``)."""
        text = self.with_ci(name, "Wilson")
        if self.defined(name) and all(self.defined(n) for n in (k, *total)):
            hits = int(self.m[k])
            n = int(self.m[total[0]] + self.m[total[1]])
            text += f"; {hits} of {n}"
        return text


def _header(spec: ModelSpec, provenance: Mapping[str, Any]) -> list[str]:
    rows = [
        ("Name", f"`{spec.name}`"),
        ("Version", f"`{spec.version}`"),
        (
            "Base version",
            f"`{provenance['base_version']}`" if "base_version" in provenance else "—",
        ),
        ("Started from", provenance.get("started_from", "not recorded")),
        ("Kind / task", f"`{spec.kind}`, {spec.task}"),
        ("Accepts", spec.accepts.describe()),
        ("Findings", ", ".join(f"`{f.code}` ({f.label})" for f in spec.findings)),
        (
            "Weights",
            "; ".join(
                f"`{w.filename}` (sha256 `{w.sha256 or 'not pinned'}`)" for w in spec.weights
            ),
        ),
        ("Status", "Research use only. **Not cleared for clinical use.**"),
    ]
    lines = ["| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    return lines


def _intended_use(spec: ModelSpec) -> list[str]:
    critical = [f.label for f in spec.findings if f.critical]
    lines = [
        "## Intended use",
        "",
        "A triage prioritisation aid: it reorders a reading worklist so that studies likely "
        "to hold a critical finding are read sooner. It is not a diagnosis and does not "
        "replace a radiologist's read; a study it does not flag may still hold the finding. "
        "It is not cleared as a medical device by any regulator, and its outputs are marked "
        '"not for diagnostic use".',
    ]
    if critical:
        lines += ["", f"Findings that can raise a study to critical: {', '.join(critical)}."]
    return lines


def _splits(provenance: Mapping[str, Any]) -> dict[str, int]:
    given = provenance.get("splits")
    if isinstance(given, Mapping):
        return {str(k): int(v) for k, v in given.items()}
    out = {}
    for split in ("train", "val", "test"):
        v = provenance.get(f"{split}_studies")
        if v is not None:
            out[split] = int(v)
    return out


def _data(
    dataset_meta: Mapping[str, Any],
    provenance: Mapping[str, Any],
    evaluation: Evaluation | None,
) -> list[str]:
    name = provenance.get("dataset") or dataset_meta.get("name", "not recorded")
    rows: list[tuple[str, object]] = [
        ("Dataset", name),
        ("Source", dataset_meta.get("source", "not recorded")),
        ("Task", dataset_meta.get("task", "not recorded")),
        ("Created", dataset_meta.get("created", "not recorded")),
    ]
    splits = _splits(provenance)
    if splits:
        rows.append(("Studies per split", ", ".join(f"{k} {v}" for k, v in splits.items())))
    else:
        rows.append(("Studies per split", "not recorded"))
    if evaluation is not None:
        m = evaluation.metrics
        if "n" in m:
            rows.append(
                (
                    "Measured on",
                    f"{int(m['n'])} studies ({int(m.get('n_positive', 0))} positive, "
                    f"{int(m.get('n_negative', 0))} negative)"
                    + (f"; {int(m['failed'])} could not be read" if m.get("failed") else ""),
                )
            )
    rows.append(("Dataset fingerprint", f"`{provenance.get('dataset_fingerprint', '—')}`"))
    if "test_fingerprint" in provenance:
        rows.append(("Test set fingerprint", f"`{provenance['test_fingerprint']}`"))
    generator = dataset_meta.get("generator")
    if isinstance(generator, Mapping):
        shown = ", ".join(
            f"{k} {v}" for k, v in generator.items() if k != "generator" and v is not None
        )
        rows.append(("Generator", f"`{generator.get('generator', '?')}`: {shown}"))
    lines = ["## Data", "", "| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    lines += [
        "",
        "Splits are by patient (a patient's studies share one split); the fingerprints are "
        "sha256 over the sorted study UIDs and labels (`training.data.splits.fingerprint`).",
    ]
    return lines


def _training(provenance: Mapping[str, Any]) -> list[str]:
    rows = [(label, provenance[key]) for key, label in _TRAINING_KEYS if key in provenance]
    if not rows:
        return []
    lines = ["## Training", "", "| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    return lines


def _finding(spec: ModelSpec, evaluation: Evaluation | None) -> FindingSpec:
    if evaluation is not None:
        try:
            return spec.finding(evaluation.finding)
        except KeyError:
            pass
    return spec.findings[0]


def _threshold(
    spec: ModelSpec, evaluation: Evaluation | None, provenance: Mapping[str, Any]
) -> list[str]:
    f = _finding(spec, evaluation)
    unit = " ml" if f.unit == "ml" else ""
    lines = ["## Operating threshold", ""]
    what = (
        "blood volume (ml) of the outputs " + ", ".join(f.outputs)
        if f.unit == "ml"
        else f"{f.unit} of the outputs " + ", ".join(f.outputs)
    )
    lines.append(
        f"`{f.code}` is flagged when its {what} is at least **{f.threshold:g}{unit}** "
        "(the value in this version's spec)."
    )
    chosen = provenance.get("threshold")
    if isinstance(chosen, Mapping) and chosen.get("how"):
        lines += ["", f"How it was chosen: {chosen['how']}."]
    else:
        lines += ["", "How it was chosen: not recorded (the base version's threshold)."]
    if evaluation is not None and not math.isclose(evaluation.threshold, f.threshold):
        lines += [
            "",
            f"The metrics below were measured at {evaluation.threshold:g}{unit}, not at the "
            "spec's threshold.",
        ]
    return lines


def _detection(table: DetectionLimitTable) -> list[str]:
    labels = table.bin_labels
    lines = [
        "",
        f"Sensitivity by lesion volume (ml) and type, detected of n, with {_LEVEL} Wilson "
        "intervals:",
        "",
        "| type | " + " | ".join(f"{b} ml" for b in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for i, subtype in enumerate(table.subtypes):
        cells = []
        for j in range(len(labels)):
            n = int(table.n[i, j])
            if n == 0:
                cells.append("—")
                continue
            cells.append(
                f"{int(table.detected[i, j])}/{n} ({_num(table.sensitivity[i, j], 2)}; "
                f"{_num(table.low[i, j], 2)}–{_num(table.high[i, j], 2)})"
            )
        name = "**all types**" if subtype == ALL_SUBTYPES else subtype
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    return lines


def _metrics(spec: ModelSpec, evaluation: Evaluation | None, synthetic: bool) -> list[str]:
    lines = ["## Metrics", ""]
    if evaluation is None:
        return lines + ["Not measured: no evaluation was given for this version."]
    s = evaluation.summary
    fm = _Metrics(s.metrics, s.reasons)
    f = _finding(spec, evaluation)
    score = "the predicted blood volume (ml)" if f.unit == "ml" else f"the finding's {f.unit}"
    sha = ", ".join(h[:12] for h in evaluation.weights_sha256) or "not recorded"
    unit = " ml" if f.unit == "ml" else ""
    lines += [
        f"`{evaluation.finding}` measured on {fm.count('n')} studies "
        f"({fm.count('n_positive')} positive, {fm.count('n_negative')} negative) with "
        f"version `{evaluation.version}` (weights sha256 {sha}); "
        f"{'synthetic' if synthetic else 'the data described above'}. "
        f"Ranking score: {score}.",
        "",
        "| Metric | Value |",
        "|---|---|",
    ]
    rows = [
        (
            "AUROC",
            fm.with_ci("auroc", "percentile bootstrap over studies, stratified by class"),
        ),
        (
            f"Sensitivity at {evaluation.threshold:g}{unit}",
            fm.rate("sensitivity", "tp", ("tp", "fn")),
        ),
        (
            f"Specificity at {evaluation.threshold:g}{unit}",
            fm.rate("specificity", "tn", ("tn", "fp")),
        ),
        ("PPV", fm.value("ppv")),
        ("NPV", fm.value("npv")),
        ("Sensitivity at specificity ≥ 0.90", fm.at_target("sens_at_spec90", unit)),
        ("Specificity at sensitivity ≥ 0.90", fm.at_target("spec_at_sens90", unit)),
    ]
    dice_n = f" (n {fm.count('dice_n')})" if fm.defined("dice_n") else ""
    rows.append(("Dice of the finding's classes, mean" + dice_n, fm.value("dice_mean")))
    rows.append(("Dice, median", fm.value("dice_median")))
    for key in sorted(k for k in s.metrics if k.startswith("dice_") and k.endswith("_mean")):
        if key != "dice_mean":
            cls = key.removeprefix("dice_").removesuffix("_mean")
            rows.append((f"Dice {cls.upper() if len(cls) <= 3 else cls}, mean", fm.value(key)))
    vol_n = f" (n {fm.count('volume_n')})" if fm.defined("volume_n") else ""
    rows += [
        (
            "Volume error, mean absolute" + vol_n,
            fm.value("volume_abs_error_ml_mean", 2, " ml"),
        ),
        ("Volume error, median absolute", fm.value("volume_abs_error_ml_median", 2, " ml")),
        (
            "Volume error, mean signed (predicted − true)",
            fm.value("volume_signed_error_ml_mean", 2, " ml"),
        ),
    ]
    if "ece_confidence" in s.metrics:
        rows.append(("ECE of the finding's [0, 1] confidence (5 bins)", fm.value("ece_confidence")))
    else:
        rows.append(("ECE (10 uniform bins)", fm.value("ece")))
        rows.append(("Brier score", fm.value("brier")))
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    if s.detection is not None:
        lines += _detection(s.detection)
    if s.warnings:
        lines += ["", "Caveats:", ""] + [f"- {w}" for w in s.warnings]
    return lines


def _limits(spec: ModelSpec, synthetic: bool) -> list[str]:
    lines = ["## Limits", ""]
    if synthetic:
        lines.append(
            "- The data are synthetic: lesions inserted into normal heads or radiographs by "
            "`training.synth` (no mass effect; few distinct base images). Performance on "
            "them says nothing about performance on patients."
        )
    lines += [
        "- Measured on one dataset; a site should measure it on its own labelled studies "
        "before relying on it, and re-derive the threshold there.",
        "- Small test sets give wide intervals; read the intervals, not the point values.",
        "- Not cleared as a medical device; for worklist prioritisation research only. A "
        "negative result does not exclude the finding.",
    ]
    if spec.card:
        lines.append(f"- The published base model's own limits apply (see `{spec.card}`).")
    return lines


def _attribution(spec: ModelSpec, dataset_meta: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Licence and attribution",
        "",
        f"- Weights licence: {spec.licence or 'not recorded'}.",
        f"- Please cite: {spec.citation or 'not recorded'}",
        f"- Source of the base weights: {spec.source or 'not recorded'}",
    ]
    base = dataset_meta.get("base")
    if isinstance(base, Mapping):
        lines += ["", "Data:", ""]
        if "dataset" in base:
            lines.append(f"- Base images: {base['dataset']}")
        for key, label in (
            ("licence", "Licence"),
            ("citation", "Citation"),
            ("reads", "Reads"),
            ("note", "Note"),
        ):
            if key in base:
                lines.append(f"- {label}: {base[key]}")
        images = base.get("images")
        if isinstance(images, Mapping):
            for name, info in sorted(images.items()):
                if isinstance(info, Mapping):
                    parts = "; ".join(f"{k}: {v}" for k, v in info.items())
                    lines.append(f"- `{name}`: {parts}")
    for key in ("licence", "citation", "attribution"):
        if key in dataset_meta:
            lines.append(f"- Dataset {key}: {dataset_meta[key]}")
    deid = dataset_meta.get("deidentification")
    if isinstance(deid, Mapping) and deid.get("method"):
        lines.append(f"- De-identification: {deid['method']}")
    if not isinstance(base, Mapping) and not any(
        k in dataset_meta for k in ("licence", "citation", "attribution")
    ):
        lines.append(
            "- The dataset's licence is not recorded in its `dataset.json`; follow the "
            "terms of its source."
        )
    return lines


def model_card(
    spec: ModelSpec,
    *,
    evaluation: Evaluation | None,
    dataset_meta: Mapping[str, Any],
    provenance: Mapping[str, Any],
    synthetic: bool,
) -> str:
    """A Markdown model card for a candidate model version.

    Args:
        spec: the version's spec (name, version, findings with the operating threshold,
            weights with their sha256, licence, citation, source, card of the base model).
        evaluation: the version measured on the test split (:func:`training.evaluate.
            evaluate`), or None (the card then says the metrics were not measured).
        dataset_meta: the dataset's ``dataset.json`` (name, source, task, created; for
            synthetic data ``generator`` and ``base`` with the base images' licence and
            attribution; for feedback exports ``deidentification``).
        provenance: what the version came from, as :func:`training.workflows.fit` records
            it: ``base_version``, ``started_from``, ``dataset``, ``dataset_fingerprint``,
            ``steps``, ``seed``, ``threshold`` (``{"value", "how"}``); optionally
            ``splits`` (``{"train": n, "val": n, "test": n}``, or ``train_studies``,
            ``val_studies``, ``test_studies``), ``test_fingerprint``, ``batch_size``,
            ``lr``, ``init``, ``device``.
        synthetic: the version was trained or measured on synthetic data (the card opens
            with :data:`SYNTHETIC_STATEMENT`).

    Returns:
        The card, Markdown, ending with a newline; no patient data (counts and metrics only).
    """
    lines = [f"# Model card: {spec.name} {spec.version}", ""]
    if synthetic:
        lines += [f"> **{SYNTHETIC_STATEMENT}**", ""]
    lines += _header(spec, provenance)
    sections = [
        _intended_use(spec),
        _data(dataset_meta, provenance, evaluation),
        _training(provenance),
        _threshold(spec, evaluation, provenance),
        _metrics(spec, evaluation, synthetic),
        _limits(spec, synthetic),
        _attribution(spec, dataset_meta),
    ]
    for section in sections:
        if section:
            lines += ["", *section]
    return "\n".join(lines) + "\n"
