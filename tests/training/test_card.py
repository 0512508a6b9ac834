"""training.card: the Markdown model card of a candidate version."""

from __future__ import annotations

import math
import re

import numpy as np

from training.candidate import candidate_spec
from training.card import SYNTHETIC_STATEMENT, model_card
from training.evaluate import Evaluation
from training.format import HAEMORRHAGE
from training.metrics import StudyRow, Summary, summarise
from training.synth.ct import CQ500_ATTRIBUTION
from triage.models.catalog import builtin_spec
from triage.models.spec import ModelSpec

SHA = "ab" * 32

PROVENANCE = {
    "base_version": "1.0.0",
    "started_from": "blast-ct-v1 member 7 (model_7.pt, sha256 0123456789ab)",
    "dataset": "synth-ct",
    "dataset_fingerprint": "f" * 64,
    "steps": 200,
    "seed": 3,
    "synthetic": True,
    "threshold": {"value": 0.8, "how": "sensitivity rule (target 0.9) on 6 validation studies"},
    "splits": {"train": 28, "val": 6, "test": 6},
}

CQ500_META = {
    "format": "triage-dataset/1",
    "name": "synth-ct",
    "task": "haemorrhage",
    "source": "synth",
    "created": "2026-12-01T10:00:00+00:00",
    "generator": {"generator": "training.synth.ct", "n_studies": 40, "seed": 3, "base": "cq500"},
    "base": {"kind": "cq500", **CQ500_ATTRIBUTION},
}


def _spec(threshold: float = 0.8) -> ModelSpec:
    base = builtin_spec("blast-ct-v1")
    return candidate_spec(
        base,
        version="1.0.0-ft.abababab",
        weights=[("blast-ct-v1-ft-abababababab.pt", SHA)],
        thresholds={HAEMORRHAGE: threshold},
        provenance=PROVENANCE,
    )


def _evaluation(summary: Summary, threshold: float = 0.8) -> Evaluation:
    return Evaluation(
        model="blast-ct-v1",
        version="1.0.0-ft.abababab",
        weights_sha256=(SHA,),
        finding=HAEMORRHAGE,
        threshold=threshold,
        summary=summary,
        studies=[],
    )


def _measured() -> Evaluation:
    """A real summary of 12 studies: 6 haemorrhages of 2-25 ml, 6 normal heads."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (subtype, vol) in enumerate(
        [
            ("subdural", 2.0),
            ("subdural", 10.0),
            ("epidural", 5.0),
            ("intraparenchymal", 25.0),
            ("intraventricular", 2.0),
            ("subarachnoid", 10.0),
        ]
    ):
        pred = 0.3 if i == 0 else vol * 0.8
        rows.append(
            StudyRow(1, pred, pred >= 0.8, vol, pred, subtype, dice=0.6, dice_by_class={2: 0.5})
        )
    for _ in range(6):
        pred = float(rng.uniform(0.0, 0.9))
        rows.append(StudyRow(0, pred, pred >= 0.8, 0.0, pred, "normal"))
    summary = summarise(rows, threshold=0.8, n_boot=200, synthetic=True)
    summary.metrics["ece_confidence"] = 0.12
    summary.metrics["failed"] = 0.0
    return _evaluation(summary)


def test_synthetic_card_opens_with_the_statement_and_renders_intervals() -> None:
    ev = _measured()
    card = model_card(
        _spec(), evaluation=ev, dataset_meta=CQ500_META, provenance=PROVENANCE, synthetic=True
    )
    head = card.split("\n## ")[0]
    assert SYNTHETIC_STATEMENT in head  # before any section
    assert card.index(SYNTHETIC_STATEMENT) < card.index("| Name |")
    assert "1.0.0-ft.abababab" in head and "`1.0.0`" in head and "member 7" in head
    m = ev.metrics
    auroc = f"{m['auroc']:.3f} (95% CI {m['auroc_ci_low']:.3f}–{m['auroc_ci_high']:.3f}"
    assert auroc in card
    sens = (
        f"{m['sensitivity']:.3f} (95% CI {m['sensitivity_ci_low']:.3f}–"
        f"{m['sensitivity_ci_high']:.3f}, Wilson); 5 of 6"
    )
    assert sens in card
    assert f"{m['specificity_ci_low']:.3f}–{m['specificity_ci_high']:.3f}, Wilson" in card
    assert f"{m['dice_mean']:.3f}" in card and "Dice EAH, mean" in card
    assert f"{m['volume_abs_error_ml_mean']:.2f} ml" in card
    assert "0.120" in card  # ECE of the confidence
    assert f"(threshold {m['sens_at_spec90_threshold']:.3g} ml)" in card
    # data, threshold and its choice, detection-limit table
    assert "train 28, val 6, test 6" in card and "f" * 64 in card
    assert "**0.8 ml**" in card and "sensitivity rule (target 0.9)" in card
    assert re.search(r"\| subdural \| — \| 0/1 \(0\.00; 0\.00–0\.\d\d\) \| — \| 1/1 ", card)
    assert "**all types**" in card


def test_undefined_metrics_say_why() -> None:
    why = "needs both classes, have 4 positive and 0 negative studies"
    summary = Summary(
        metrics={
            "n": 4.0,
            "n_positive": 4.0,
            "n_negative": 0.0,
            "auroc": math.nan,
            "auroc_ci_low": math.nan,
            "auroc_ci_high": math.nan,
            "sensitivity": 0.75,
            "sensitivity_ci_low": 0.30,
            "sensitivity_ci_high": 0.95,
            "specificity": math.nan,
            "specificity_ci_low": math.nan,
            "specificity_ci_high": math.nan,
            "tp": 3.0,
            "fn": 1.0,
            "tn": 0.0,
            "fp": 0.0,
            "dice_mean": math.nan,
            "dice_n": 0.0,
        },
        reasons=[
            f"auroc, auroc_ci_low, auroc_ci_high: {why}",
            "specificity, specificity_ci_low, specificity_ci_high: no negative studies",
            "dice_mean, dice_median: no study with a defined Dice",
        ],
    )
    card = model_card(
        _spec(),
        evaluation=_evaluation(summary),
        dataset_meta={"name": "rsna", "source": "RSNA 2019", "task": HAEMORRHAGE},
        provenance={"base_version": "1.0.0"},
        synthetic=False,
    )
    assert f"| AUROC | not defined ({why}) |" in card
    assert "not defined (no negative studies)" in card
    assert "not defined (no study with a defined Dice)" in card
    assert "0.750 (95% CI 0.300–0.950, Wilson); 3 of 4" in card
    assert "| Volume error, median absolute | not measured |" in card
    assert not re.search(r"\bnan\b", card, re.IGNORECASE)
    assert SYNTHETIC_STATEMENT not in card
    assert "licence is not recorded" in card


def test_licence_citation_and_data_attribution() -> None:
    spec = _spec()
    card = model_card(
        spec, evaluation=None, dataset_meta=CQ500_META, provenance=PROVENANCE, synthetic=True
    )
    assert f"Weights licence: {spec.licence}." in card and spec.licence == "Apache-2.0"
    assert spec.citation in card and spec.source in card
    assert CQ500_ATTRIBUTION["licence"] in card  # CC BY-NC-SA 4.0 of the base head
    assert CQ500_ATTRIBUTION["citation"] in card
    assert "Not measured: no evaluation was given" in card
    assert "not a diagnosis" in card and "Not cleared" in card
