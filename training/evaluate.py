"""Running a model version over a dataset's studies and measuring it.

The model runs exactly as in serving: built by the registry's factory from its spec, each
study's series chosen by the serving router (or named by ``labels.csv``), ``prepare`` ->
``predict`` -> ``interpret`` through :meth:`FindingModel.run`. Its findings become
:class:`training.metrics.StudyRow` rows; :func:`training.metrics.summarise` turns them into
metrics, and :mod:`training.plots` into PNGs.

Scores: for a finding measured in ml (the haemorrhage model flags by blood volume), the
score ranked and thresholded is the predicted volume of the finding's output classes, the
quantity the threshold applies to; the finding's [0, 1] confidence is kept for the
reliability curve. For classifiers the score is the calibrated score.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from training.data.dataset import NoSeriesError, StudyRecord, choose_series
from training.data.samples import read_mask
from training.metrics import StudyRow, Summary, blood_dice, dice, reliability, summarise
from training.plots import detection_limit_plot, reliability_plot, roc_plot, volume_scatter
from triage.domain import Finding
from triage.models.base import FindingModel
from triage.models.registry import ModelRegistry, RuntimeOptions
from triage.models.spec import FindingSpec, ModelSpec
from triage.models.store import ModelStore
from triage.results import Overlay

log = logging.getLogger(__name__)

__all__ = ["Evaluation", "StudyResult", "build_model", "evaluate", "finding_score"]


def build_model(
    spec: ModelSpec,
    store: ModelStore,
    *,
    device: str = "cpu",
    members: int | None = None,
    precision: str = "fp32",
) -> FindingModel[Any, Any]:
    """The model as serving builds it (same factory), its weights from ``store``."""
    options = RuntimeOptions(
        store=store,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        members=members,
    )
    return ModelRegistry([spec], options).model(spec.name)


def finding_score(spec: FindingSpec, finding: Finding) -> float:
    """The score thresholded for ``finding``: the volume (ml) of its output classes when its
    unit is ml, else the finding's score."""
    if spec.unit == "ml":
        return float(sum(finding.volumes_ml.get(o, 0.0) for o in spec.outputs))
    return float(finding.score)


#: Edges (ml) of the detection-limit table: between the synthetic generator's nominal lesion
#: volumes (2, 5, 10, 25 ml), so that a lesion's voxel-counted volume never straddles an edge.
DETECTION_BINS_ML: tuple[float, ...] = (0.0, 1.5, 3.5, 7.5, 17.5, math.inf)


@dataclass
class StudyResult:
    """One study's outcome (a row of ``per_study.csv``)."""

    StudyInstanceUID: str
    label: int
    score: float | None
    confidence: float | None
    flagged: bool | None
    true_volume_ml: float | None
    pred_volume_ml: float | None
    subtype: str
    dice: float | None
    error: str | None = None


@dataclass
class Evaluation:
    """A model version measured on a set of studies.

    Attributes:
        model: the model's name; ``version`` and ``weights_sha256`` what ran.
        finding: the finding measured.
        threshold: the threshold the flags used (the spec's or the one given).
        summary: metrics and the objects the plots need.
        studies: one result per study (those that failed carry the error).
        plots: plot name -> PNG written.
    """

    model: str
    version: str
    weights_sha256: tuple[str, ...]
    finding: str
    threshold: float
    summary: Summary
    studies: list[StudyResult]
    plots: dict[str, Path] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary.metrics

    @property
    def failed(self) -> int:
        return sum(1 for s in self.studies if s.error)


def _overlay_reference(overlay: Overlay) -> sitk.Image:
    if overlay.grid_origin is None or overlay.grid_spacing is None:
        raise ValueError("the overlay has no grid geometry")
    z, y, x = overlay.data.shape
    ref = sitk.Image(int(x), int(y), int(z), sitk.sitkUInt8)
    ref.SetOrigin(tuple(float(v) for v in overlay.grid_origin))
    ref.SetSpacing(tuple(float(v) for v in overlay.grid_spacing))
    if overlay.grid_direction is not None:
        ref.SetDirection(tuple(float(v) for v in overlay.grid_direction))
    return ref


def truth_on_overlay(mask_path: Path, overlay: Overlay, classes: Sequence[str]) -> np.ndarray:
    """The reference mask resampled (nearest neighbour) onto a label overlay's grid:
    uint8 (z, y, x), the overlay's shape."""
    mask = read_mask(mask_path, classes)
    on_grid = sitk.Resample(
        mask, _overlay_reference(overlay), sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    return sitk.GetArrayFromImage(on_grid).astype(np.uint8)


def evaluate(
    model: FindingModel[Any, Any],
    records: Sequence[StudyRecord],
    *,
    finding: str,
    threshold: float | None = None,
    synthetic: bool = False,
    plots_dir: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Run ``model`` on every labelled study of ``records`` and measure ``finding``.

    Args:
        model: the model (see :func:`build_model`).
        records: the studies (e.g. the frozen test split).
        finding: the finding code measured.
        threshold: flag at this score instead of the spec's threshold (ml for volumes).
        synthetic: the data are synthetic (the plots say "demonstration data").
        plots_dir: where to write the PNGs (none when None).
        n_boot: bootstrap resamples of the AUROC interval.
        seed: the bootstrap's seed.
        progress: called with (done, total) after each study.

    Studies the model cannot read (no series it accepts, a preprocessing error) are kept
    in :attr:`Evaluation.studies` with the error and left out of the metrics.
    """
    spec = model.spec
    fspec = spec.finding(finding)
    cut = fspec.threshold if threshold is None else float(threshold)
    labelled = [r for r in records if r.label(finding) is not None]
    results: list[StudyResult] = []
    rows: list[StudyRow] = []
    confidences: list[float] = []
    blood = tuple(spec.outputs.index(o) for o in fspec.outputs)
    for done, record in enumerate(labelled, start=1):
        label = int(record.label(finding) or 0)
        result = StudyResult(
            record.study_uid, label, None, None, None, record.volume_ml, None, record.subtype, None
        )
        try:
            series = choose_series(record, spec)
            output = model.run(series.paths, series.SeriesInstanceUID)
        except (NoSeriesError, ValueError, OSError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:300]
            results.append(result)
            log.warning("study %d of %d not evaluated: %s", done, len(labelled), type(exc).__name__)
            if progress:
                progress(done, len(labelled))
            continue
        found = next(f for f in output.findings if f.finding == finding)
        score = finding_score(fspec, found)
        result.score = score
        result.confidence = float(found.score)
        result.flagged = score >= cut
        if fspec.unit == "ml":
            result.pred_volume_ml = score
            if result.true_volume_ml is None and label == 0:
                result.true_volume_ml = 0.0
        overlay = output.overlays.get(finding)
        if record.mask is not None and overlay is not None and overlay.kind == "labels":
            truth = truth_on_overlay(record.mask, overlay, spec.outputs)
            result.dice = blood_dice(overlay.data, truth, blood)
            by_class = dice(overlay.data, truth, blood)
        else:
            by_class = None
        results.append(result)
        confidences.append(result.confidence)
        rows.append(
            StudyRow(
                y_true=label,
                score=score,
                flagged=bool(result.flagged),
                true_volume_ml=result.true_volume_ml,
                pred_volume_ml=result.pred_volume_ml,
                subtype=record.subtype or ("normal" if label == 0 else None),
                dice=result.dice,
                dice_by_class=by_class,
            )
        )
        if progress:
            progress(done, len(labelled))
    summary = summarise(
        rows,
        threshold=cut,
        n_boot=n_boot,
        seed=seed,
        synthetic=synthetic,
        volume_bins=DETECTION_BINS_ML,
    )
    summary.metrics["failed"] = float(sum(1 for r in results if r.error))
    evaluation = Evaluation(
        model=spec.name,
        version=spec.version,
        weights_sha256=model.weights_sha256(),
        finding=finding,
        threshold=cut,
        summary=summary,
        studies=results,
    )
    if fspec.unit == "ml" and rows:
        # The [0, 1] confidence's calibration (the volume score is not a probability).
        y = np.asarray([r.y_true for r in rows])
        curve = reliability(y, np.asarray(confidences), n_bins=5)
        summary.reliability = curve
        summary.metrics["ece_confidence"] = float(curve.ece)
    if plots_dir is not None:
        evaluation.plots = write_plots(evaluation, plots_dir)
    return evaluation


def write_plots(evaluation: Evaluation, out: Path) -> dict[str, Path]:
    """The evaluation's PNGs (ROC, reliability, detection limit, volumes) under ``out``."""
    s = evaluation.summary
    plots: dict[str, Path] = {}
    name = f"{evaluation.model} {evaluation.version}"
    plots["roc"] = roc_plot(
        s.y_true,
        s.y_score,
        out / "roc.png",
        operating_point=s.operating_point,
        ci=s.auroc_ci,
        synthetic=s.synthetic,
        title=f"ROC: {name}",
    )
    if s.reliability is not None:
        ece = s.metrics.get("ece_confidence", s.metrics.get("ece"))
        plots["reliability"] = reliability_plot(
            s.reliability,
            out / "reliability.png",
            ece=None if ece is None or math.isnan(ece) else ece,
            synthetic=s.synthetic,
            title=f"Reliability: {name}",
        )
    if s.detection is not None:
        plots["detection_limit"] = detection_limit_plot(
            s.detection, out / "detection_limit.png", synthetic=s.synthetic
        )
    if s.true_volume_ml.size:
        plots["volumes"] = volume_scatter(
            s.true_volume_ml, s.pred_volume_ml, out / "volumes.png", synthetic=s.synthetic
        )
    return plots


def write_per_study(evaluation: Evaluation, path: Path) -> Path:
    """``per_study.csv``: one row per study (the dataset's own UIDs; for a de-identified or
    synthetic dataset these identify no patient)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(StudyResult.__dataclass_fields__)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for s in evaluation.studies:
            writer.writerow({k: getattr(s, k) for k in names})
    return path
