"""Evaluation numerics: discrimination, operating points, segmentation, calibration, limits.

Every function here is pure: numpy arrays in, floats, dataclasses or dicts out; nothing is
read from or written to disk, and nothing is logged that could identify a patient.

Conventions shared by all functions:

- ``y_true``: shape (n,), the reference label per study, 1 present / 0 absent (bool or any
  integer dtype holding only 0 and 1).
- ``y_score``: shape (n,), float, any finite range; higher means "more likely present". For
  the haemorrhage model this is the finding score in [0, 1] (``triage.models.haemorrhage.
  blood_score``), for the chest model a classifier output.
- A study is flagged when ``score >= threshold``, exactly as serving applies a finding's
  threshold (``triage.models.haemorrhage.to_finding``).
- Undefined quantities are ``nan`` (e.g. PPV when nothing is flagged); functions whose
  *main* result is undefined for the input (AUROC of a single class) raise ``ValueError``
  saying why, and :func:`summarise` turns those into ``nan`` plus a reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import binomtest
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

logger = logging.getLogger(__name__)

#: BLAST-CT output classes (the label-map values of its masks, ``training.format``).
BLAST_CT_CLASSES: Final[dict[int, str]] = {1: "iph", 2: "eah", 3: "oedema", 4: "ivh"}
#: The classes that are blood (IPH, EAH, IVH); oedema is not.
BLOOD_CLASSES: Final[tuple[int, ...]] = (1, 2, 4)
#: Inserted-lesion volume bins (ml) of the detection-limit table: [0, 2), [2, 5), ...
DEFAULT_VOLUME_BINS: Final[tuple[float, ...]] = (0.0, 2.0, 5.0, 10.0, 25.0, math.inf)
#: The row of a :class:`DetectionLimitTable` that pools all subtypes.
ALL_SUBTYPES: Final = "all"

Rule = Literal["youden", "sensitivity", "specificity", "fixed"]
Strategy = Literal["uniform", "quantile"]
MetricFn = Callable[[NDArray[np.int8], NDArray[np.float64]], float]


# --------------------------------------------------------------------------- inputs


def _labels(y_true: ArrayLike, name: str = "y_true") -> NDArray[np.int8]:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per study), got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.int8)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"{name} must hold only 0 and 1, found {bad.tolist()}")
    return y.astype(np.int8)


def _binary_inputs(
    y_true: ArrayLike, y_score: ArrayLike, score_name: str = "y_score"
) -> tuple[NDArray[np.int8], NDArray[np.float64]]:
    y = _labels(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"{score_name} has shape {s.shape} but y_true has shape {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{score_name} holds {int((~np.isfinite(s)).sum())} non-finite values")
    return y, s


def _require_both_classes(y: NDArray[np.int8], what: str) -> None:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{what} is undefined with a single class: {n_pos} positive and {n_neg} negative "
            "studies"
        )


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else math.nan


# --------------------------------------------------------------------------- AUROC, bootstrap


def auroc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``; ties count one half).

    Args:
        y_true: shape (n,), 0/1 (or bool) reference labels.
        y_score: shape (n,), float, finite; higher means more likely positive.

    Returns:
        The AUROC in [0, 1].

    Raises:
        ValueError: when only one class is present, or the inputs are malformed.
    """
    y, s = _binary_inputs(y_true, y_score)
    _require_both_classes(y, "AUROC")
    return float(roc_auc_score(y, s))


@dataclass(frozen=True)
class BootstrapResult:
    """A percentile-bootstrap confidence interval.

    Attributes:
        point: the metric on the full sample.
        low, high: the ``alpha/2`` and ``1 - alpha/2`` percentiles of the resampled metric
            (``nan`` when no resample could be scored).
        alpha: 1 - confidence level.
        n_boot: resamples drawn.
        n_skipped: resamples not scored (lacking a class, or the metric was not finite).
    """

    point: float
    low: float
    high: float
    alpha: float
    n_boot: int
    n_skipped: int

    @property
    def interval(self) -> tuple[float, float, float]:
        """``(point, low, high)``."""
        return (self.point, self.low, self.high)


def bootstrap(
    metric_fn: MetricFn,
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
) -> BootstrapResult:
    """Percentile bootstrap of ``metric_fn(y_true, y_score)`` over studies.

    Stratified resampling draws the positives and the negatives separately (each with its
    own size), so every resample keeps the sample's class counts and none is skipped.
    Unstratified resampling draws ``n`` studies from all; a resample lacking a class is
    skipped and counted in ``n_skipped`` (as is one whose metric is not finite).

    Args:
        metric_fn: ``f(y_true, y_score) -> float`` for 1-D arrays (e.g. :func:`auroc`).
        y_true: shape (n,), 0/1 reference labels; both classes must be present.
        y_score: shape (n,), float scores (or anything ``metric_fn`` takes as its second
            argument, e.g. 0/1 flags).
        n_boot: number of resamples (>= 1).
        alpha: two-sided level; 0.05 gives a 95% interval.
        seed: seed of numpy's ``default_rng``; the same seed gives the same interval.
        stratified: resample within each class.

    Returns:
        The point estimate, the interval and the skip count.

    Raises:
        ValueError: a single class in ``y_true``, bad ``n_boot``/``alpha``, or malformed
            inputs.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    y, s = _binary_inputs(y_true, y_score)
    _require_both_classes(y, "the bootstrap")
    point = float(metric_fn(y, s))
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    values: list[float] = []
    skipped = 0
    for _ in range(n_boot):
        if stratified:
            idx = np.concatenate(
                [pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)]]
            )
        else:
            idx = rng.integers(0, y.size, y.size)
        yb = y[idx]
        n_pos = int(yb.sum())
        if n_pos == 0 or n_pos == yb.size:
            skipped += 1
            continue
        value = float(metric_fn(yb, s[idx]))
        if not math.isfinite(value):
            skipped += 1
            continue
        values.append(value)
    if values:
        low, high = (float(q) for q in np.quantile(values, [alpha / 2, 1 - alpha / 2]))
    else:
        low = high = math.nan
    if skipped:
        logger.debug("bootstrap: %d of %d resamples skipped", skipped, n_boot)
    return BootstrapResult(point, low, high, alpha, n_boot, skipped)


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
) -> tuple[float, float, float]:
    """``(point, low, high)`` of :func:`bootstrap` (which also reports skipped resamples).

    Args and raises: as :func:`bootstrap`.
    """
    return bootstrap(
        metric_fn,
        y_true,
        y_score,
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
        stratified=stratified,
    ).interval


# --------------------------------------------------------------------------- ROC, thresholds


@dataclass(frozen=True)
class RocPoints:
    """Every distinct operating point of a score (scikit-learn's ``roc_curve``, no points
    dropped), from the highest threshold (flag nothing) to the lowest (flag everything).

    Attributes:
        thresholds: shape (m,), float, decreasing; a study is flagged when score >=
            threshold. The first one is just above the highest score (finite, so it can be
            stored), the rest are the distinct scores.
        tp, fp: shape (m,), int, true and false positives at each threshold.
        n_positive, n_negative: class counts.
    """

    thresholds: NDArray[np.float64]
    tp: NDArray[np.int64]
    fp: NDArray[np.int64]
    n_positive: int
    n_negative: int

    @property
    def sensitivity(self) -> NDArray[np.float64]:
        """True-positive rate at each threshold, shape (m,)."""
        return self.tp / self.n_positive

    @property
    def specificity(self) -> NDArray[np.float64]:
        """True-negative rate at each threshold, shape (m,)."""
        return (self.n_negative - self.fp) / self.n_negative


def roc_points(y_true: ArrayLike, y_score: ArrayLike) -> RocPoints:
    """The ROC curve as counts at every distinct threshold.

    Args:
        y_true: shape (n,), 0/1 labels with both classes present.
        y_score: shape (n,), finite float scores.

    Raises:
        ValueError: a single class, or malformed inputs.
    """
    y, s = _binary_inputs(y_true, y_score)
    _require_both_classes(y, "the ROC curve")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    thr = np.asarray(thr, dtype=np.float64).copy()
    thr[0] = np.nextafter(s.max(), math.inf)  # sklearn puts +inf there: flag nothing
    tp = np.rint(tpr * n_pos).astype(np.int64)
    fp = np.rint(fpr * n_neg).astype(np.int64)
    return RocPoints(thr, tp, fp, n_pos, n_neg)


def _pick(
    points: RocPoints, constraint: NDArray[np.float64], target: float, objective: NDArray
) -> int:
    """Index maximising ``objective`` where ``constraint >= target`` (ties: the better
    constraint). The first point (flag nothing) always has specificity 1 and the last (flag
    everything) sensitivity 1, so a target in [0, 1] is always met somewhere."""
    ok = np.flatnonzero(constraint >= target - 1e-12)
    best = np.lexsort((constraint[ok], objective[ok]))[-1]
    return int(ok[best])


def _check_target(name: str, target: float) -> float:
    target = float(target)
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {target}")
    return target


def sensitivity_at_specificity(
    y_true: ArrayLike, y_score: ArrayLike, specificity: float
) -> tuple[float, float]:
    """The highest sensitivity whose specificity on these data is at least ``specificity``.

    The threshold is chosen conservatively: among the ROC's operating points (the distinct
    scores) only those that reach the requested specificity on the data qualify; of those,
    the most sensitive one is returned (ties: the more specific one). There is no
    interpolation between points.

    Args:
        y_true: shape (n,), 0/1 labels with both classes present.
        y_score: shape (n,), finite float scores.
        specificity: required specificity in [0, 1].

    Returns:
        ``(sensitivity, threshold)``; flag a study when ``score >= threshold``.

    Raises:
        ValueError: a single class, a target outside [0, 1], or malformed inputs.
    """
    target = _check_target("specificity", specificity)
    pts = roc_points(y_true, y_score)
    i = _pick(pts, pts.specificity, target, pts.sensitivity)
    return float(pts.sensitivity[i]), float(pts.thresholds[i])


def specificity_at_sensitivity(
    y_true: ArrayLike, y_score: ArrayLike, sensitivity: float
) -> tuple[float, float]:
    """The highest specificity whose sensitivity on these data is at least ``sensitivity``.

    The mirror of :func:`sensitivity_at_specificity` (ties: the more sensitive point).

    Args:
        y_true: shape (n,), 0/1 labels with both classes present.
        y_score: shape (n,), finite float scores.
        sensitivity: required sensitivity in [0, 1].

    Returns:
        ``(specificity, threshold)``; flag a study when ``score >= threshold``.

    Raises:
        ValueError: a single class, a target outside [0, 1], or malformed inputs.
    """
    target = _check_target("sensitivity", sensitivity)
    pts = roc_points(y_true, y_score)
    i = _pick(pts, pts.sensitivity, target, pts.specificity)
    return float(pts.specificity[i]), float(pts.thresholds[i])


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary decision against the reference, and the rates derived from them
    (``nan`` where a denominator is zero)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def n_positive(self) -> int:
        return self.tp + self.fn

    @property
    def n_negative(self) -> int:
        return self.tn + self.fp

    @property
    def sensitivity(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        return _ratio(self.tn, self.tn + self.fn)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.n)


def confusion(y_true: ArrayLike, flagged: ArrayLike) -> Confusion:
    """Confusion counts of a decision.

    Args:
        y_true: shape (n,), 0/1 reference labels (one class only is allowed).
        flagged: shape (n,), bool or 0/1, the decision per study.
    """
    y = _labels(y_true)
    f = _labels(flagged, "flagged")
    if f.shape != y.shape:
        raise ValueError(f"flagged has shape {f.shape} but y_true has shape {y.shape}")
    yb, fb = y.astype(bool), f.astype(bool)
    return Confusion(
        tp=int((yb & fb).sum()),
        fp=int((~yb & fb).sum()),
        tn=int((~yb & ~fb).sum()),
        fn=int((yb & ~fb).sum()),
    )


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and how it performs on the data it was chosen (or checked) on.

    Stored with the model version (:meth:`to_dict`); serving flags ``score >= threshold``.

    Attributes:
        threshold: the score threshold.
        sensitivity, specificity, ppv, npv: on the data (``nan`` when undefined).
        n: studies; n_positive, n_negative: their classes.
        rule: how it was chosen: ``youden``, ``sensitivity`` (at least ``target``
            sensitivity), ``specificity`` (at least ``target`` specificity) or ``fixed``.
        target: the rule's target, None for ``youden`` and ``fixed``.
    """

    threshold: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    n: int
    rule: Rule
    target: float | None = None
    n_positive: int = 0
    n_negative: int = 0

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Plain fields for JSON/MLflow (``nan`` becomes None, so the JSON stays standard)."""
        out: dict[str, float | int | str | None] = {}
        for key, value in asdict(self).items():
            out[key] = None if isinstance(value, float) and math.isnan(value) else value
        return out


def operating_point(
    y_true: ArrayLike,
    y_score: ArrayLike,
    threshold: float,
    *,
    rule: Rule = "fixed",
    target: float | None = None,
) -> OperatingPoint:
    """How ``score >= threshold`` performs on the data (one class only is allowed).

    Args:
        y_true: shape (n,), 0/1 reference labels.
        y_score: shape (n,), finite float scores.
        threshold: the score threshold.
        rule, target: recorded as given.
    """
    y, s = _binary_inputs(y_true, y_score)
    c = confusion(y, s >= threshold)
    return OperatingPoint(
        threshold=float(threshold),
        sensitivity=c.sensitivity,
        specificity=c.specificity,
        ppv=c.ppv,
        npv=c.npv,
        n=c.n,
        rule=rule,
        target=target,
        n_positive=c.n_positive,
        n_negative=c.n_negative,
    )


def choose_threshold(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    rule: Literal["youden", "sensitivity", "specificity"],
    target: float | None = None,
) -> OperatingPoint:
    """The operating threshold, chosen on validation data, to store with the model version.

    Rules:

    - ``youden``: maximise sensitivity + specificity - 1 (no ``target``); ties go to the
      more sensitive point (a triage tool would rather over-flag).
    - ``sensitivity``: at least ``target`` sensitivity on the data, then the most specific
      (:func:`specificity_at_sensitivity`).
    - ``specificity``: at least ``target`` specificity on the data, then the most sensitive
      (:func:`sensitivity_at_specificity`).

    Args:
        y_true: shape (n,), 0/1 labels with both classes present.
        y_score: shape (n,), finite float scores.
        rule: one of the above.
        target: the required rate in [0, 1] for ``sensitivity`` and ``specificity``.

    Returns:
        The threshold with its sensitivity, specificity, PPV and NPV on these data.

    Raises:
        ValueError: a single class, a missing/unexpected/out-of-range target, an unknown
            rule, or malformed inputs.
    """
    pts = roc_points(y_true, y_score)
    if rule == "youden":
        if target is not None:
            raise ValueError("rule 'youden' takes no target")
        j = pts.sensitivity + pts.specificity - 1.0
        best = np.flatnonzero(j >= j.max() - 1e-12)
        i = int(best[np.argmax(pts.sensitivity[best])])
    elif rule in ("sensitivity", "specificity"):
        if target is None:
            raise ValueError(f"rule {rule!r} needs a target rate in [0, 1]")
        t = _check_target("target", target)
        if rule == "sensitivity":
            i = _pick(pts, pts.sensitivity, t, pts.specificity)
        else:
            i = _pick(pts, pts.specificity, t, pts.sensitivity)
    else:
        raise ValueError(f"unknown rule {rule!r}: use 'youden', 'sensitivity' or 'specificity'")
    return operating_point(
        y_true,
        y_score,
        float(pts.thresholds[i]),
        rule=rule,
        target=None if target is None else float(target),
    )


# --------------------------------------------------------------------------- segmentation


def _label_maps(pred: ArrayLike, truth: ArrayLike) -> tuple[NDArray, NDArray]:
    p = np.asarray(pred)
    t = np.asarray(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred has shape {p.shape} but truth has shape {t.shape}")
    for name, a in (("pred", p), ("truth", t)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ValueError(f"{name} must be an integer label map, got dtype {a.dtype}")
    return p, t


def dice(
    pred: ArrayLike, truth: ArrayLike, labels: Sequence[int] = tuple(BLAST_CT_CLASSES)
) -> dict[int, float]:
    """Dice coefficient per class of two label maps on the same grid.

    A class absent from both maps gets ``nan`` (not 1.0): Dice is undefined there, and a
    ``nanmean`` over studies then averages only studies where the class exists in the
    prediction or the reference, instead of inflating the mean with trivially "perfect"
    empty studies (MONAI's ``DiceMetric(ignore_empty=True)`` does the same). A class present
    in only one map gets 0.0. The caller aggregates (and counts the ``nan`` cases).

    Args:
        pred: the predicted label map, any shape (e.g. (z, y, x)), integer dtype (uint8),
            values are class indices (BLAST-CT: 0 background, 1 IPH, 2 EAH, 3 oedema,
            4 IVH).
        truth: the reference label map, same shape and grid.
        labels: the classes to score.

    Returns:
        ``{class: dice}`` with values in [0, 1] or ``nan``.
    """
    p, t = _label_maps(pred, truth)
    out: dict[int, float] = {}
    for label in labels:
        pm = p == label
        tm = t == label
        total = int(pm.sum()) + int(tm.sum())
        out[int(label)] = 2.0 * int((pm & tm).sum()) / total if total else math.nan
    return out


def blood_dice(pred: ArrayLike, truth: ArrayLike, classes: Sequence[int] = BLOOD_CLASSES) -> float:
    """Dice of the union of ``classes`` (all blood, whatever its type): ``nan`` when both
    maps hold none of it. Arguments as :func:`dice`."""
    p, t = _label_maps(pred, truth)
    return dice(np.isin(p, classes).astype(np.uint8), np.isin(t, classes).astype(np.uint8), (1,))[1]


@dataclass(frozen=True)
class VolumeError:
    """Predicted against reference volumes, in ml.

    Attributes:
        pred_ml, true_ml: ``{class: ml}``.
        signed_ml: ``{class: pred - true}`` (positive: over-segmentation).
        absolute_ml: ``{class: |pred - true|}``.
        total_pred_ml, total_true_ml, total_signed_ml, total_absolute_ml: the same for the
            union of the classes (total blood for :data:`BLOOD_CLASSES`).
    """

    pred_ml: dict[int, float]
    true_ml: dict[int, float]
    signed_ml: dict[int, float]
    absolute_ml: dict[int, float]
    total_pred_ml: float
    total_true_ml: float
    total_signed_ml: float
    total_absolute_ml: float


def volume_error_ml(
    pred: ArrayLike,
    truth: ArrayLike,
    voxel_ml: float,
    classes: Sequence[int] = BLOOD_CLASSES,
) -> VolumeError:
    """Signed and absolute volume error per class and for the classes together.

    Args:
        pred: predicted label map, any shape, integer dtype (uint8), class indices.
        truth: reference label map, same shape and grid.
        voxel_ml: volume of one voxel in ml (product of the spacing in mm / 1000), > 0.
        classes: the classes to measure; the total is their union (BLAST-CT blood: 1 IPH,
            2 EAH, 4 IVH).
    """
    p, t = _label_maps(pred, truth)
    if not (math.isfinite(voxel_ml) and voxel_ml > 0):
        raise ValueError(f"voxel_ml must be a positive volume in ml, got {voxel_ml}")
    pv = {int(c): int((p == c).sum()) * voxel_ml for c in classes}
    tv = {int(c): int((t == c).sum()) * voxel_ml for c in classes}
    signed = {c: pv[c] - tv[c] for c in pv}
    total_p = int(np.isin(p, classes).sum()) * voxel_ml
    total_t = int(np.isin(t, classes).sum()) * voxel_ml
    return VolumeError(
        pred_ml=pv,
        true_ml=tv,
        signed_ml=signed,
        absolute_ml={c: abs(v) for c, v in signed.items()},
        total_pred_ml=total_p,
        total_true_ml=total_t,
        total_signed_ml=total_p - total_t,
        total_absolute_ml=abs(total_p - total_t),
    )


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityCurve:
    """A reliability diagram's data.

    Attributes:
        edges: shape (n_bins + 1,), bin edges in [0, 1]; bin i holds (edges[i],
            edges[i+1]], the first also 0 (scikit-learn's ``calibration_curve`` binning).
        mean_predicted: shape (n_bins,), mean score per bin, ``nan`` for an empty bin.
        observed_fraction: shape (n_bins,), fraction of positives per bin, ``nan`` if empty.
        counts: shape (n_bins,), int, studies per bin.
        strategy: ``uniform`` (equal-width bins) or ``quantile`` (equal-count bins).
    """

    edges: NDArray[np.float64]
    mean_predicted: NDArray[np.float64]
    observed_fraction: NDArray[np.float64]
    counts: NDArray[np.int64]
    strategy: Strategy

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def ece(self) -> float:
        """Expected calibration error: count-weighted mean |observed - predicted|."""
        if self.n == 0:
            return math.nan
        ok = self.counts > 0
        gap = np.abs(self.observed_fraction[ok] - self.mean_predicted[ok])
        return float(np.sum(self.counts[ok] * gap) / self.n)


def reliability(
    y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10, strategy: Strategy = "uniform"
) -> ReliabilityCurve:
    """Observed fraction of positives against the mean predicted probability, per bin.

    Matches scikit-learn's ``calibration_curve`` (same bins) but keeps empty bins and the
    counts. For the haemorrhage model the "probability" is its score in [0, 1], which is a
    ranking score and not a calibrated probability: read the curve as a description of
    that score, not as a calibration claim.

    Args:
        y_true: shape (n,), 0/1 labels (one class only is allowed), n >= 1.
        y_prob: shape (n,), float in [0, 1].
        n_bins: number of bins (>= 1).
        strategy: ``uniform`` (equal-width) or ``quantile`` (equal-count; ties may leave
            empty bins).

    Raises:
        ValueError: no studies, scores outside [0, 1], bad ``n_bins`` or ``strategy``.
    """
    y, p = _binary_inputs(y_true, y_prob, "y_prob")
    if y.size == 0:
        raise ValueError("reliability needs at least one study")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"y_prob must be in [0, 1], found [{p.min():g}, {p.max():g}]")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))
    else:
        raise ValueError(f"unknown strategy {strategy!r}: use 'uniform' or 'quantile'")
    ids = np.searchsorted(edges[1:-1], p)
    counts = np.bincount(ids, minlength=n_bins).astype(np.int64)
    sums = np.bincount(ids, weights=p, minlength=n_bins)
    pos = np.bincount(ids, weights=y.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(counts > 0, sums / counts, np.nan)
        observed = np.where(counts > 0, pos / counts, np.nan)
    return ReliabilityCurve(edges, mean_pred, observed, counts, strategy)


def expected_calibration_error(
    y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10, strategy: Strategy = "uniform"
) -> float:
    """Expected calibration error (ECE) over :func:`reliability` bins, in [0, 1].

    ECE is only meaningful for outputs meant to be calibrated probabilities. The
    haemorrhage model's score in [0, 1] is a ranking score (a quantile of voxel
    probabilities), so its ECE describes the score's scale, not a defect; compare ECE only
    between versions of the same output. Arguments and errors as :func:`reliability`.
    """
    return reliability(y_true, y_prob, n_bins, strategy).ece


# --------------------------------------------------------------------------- detection limit


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (scipy's ``binomtest``), without
    continuity correction; ``(nan, nan)`` when ``n == 0``."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def _fmt_ml(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:g}"


@dataclass(frozen=True)
class DetectionLimitTable:
    """Sensitivity by lesion volume bin and subtype.

    Attributes:
        bins: the bin edges in ml; bin j is [bins[j], bins[j+1]).
        subtypes: row names: the subtypes (sorted) then :data:`ALL_SUBTYPES`.
        n: shape (n_subtypes, n_bins), int, lesions per cell.
        detected: shape (n_subtypes, n_bins), int, lesions detected per cell.
        sensitivity: shape (n_subtypes, n_bins), detected / n (``nan`` when n is 0).
        low, high: shape (n_subtypes, n_bins), Wilson interval bounds (``nan`` when n is 0).
        confidence: the intervals' level.
    """

    bins: tuple[float, ...]
    subtypes: tuple[str, ...]
    n: NDArray[np.int64]
    detected: NDArray[np.int64]
    sensitivity: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    confidence: float = 0.95

    @property
    def bin_labels(self) -> list[str]:
        """``["0-2", "2-5", ..., "25-inf"]`` (ml)."""
        return [
            f"{_fmt_ml(a)}-{_fmt_ml(b)}" for a, b in zip(self.bins[:-1], self.bins[1:], strict=True)
        ]

    def rows(self) -> list[dict[str, str | float | int]]:
        """One dict per (subtype, bin) cell, for a CSV report."""
        out: list[dict[str, str | float | int]] = []
        for i, subtype in enumerate(self.subtypes):
            for j, label in enumerate(self.bin_labels):
                out.append(
                    {
                        "subtype": subtype,
                        "volume_bin_ml": label,
                        "n": int(self.n[i, j]),
                        "detected": int(self.detected[i, j]),
                        "sensitivity": float(self.sensitivity[i, j]),
                        "ci_low": float(self.low[i, j]),
                        "ci_high": float(self.high[i, j]),
                    }
                )
        return out


def detection_limit(
    volumes_ml: ArrayLike,
    subtypes: Sequence[str] | ArrayLike,
    detected: ArrayLike,
    *,
    bins: Sequence[float] = DEFAULT_VOLUME_BINS,
    confidence: float = 0.95,
) -> DetectionLimitTable:
    """Sensitivity by (inserted) lesion volume bin and subtype, with Wilson intervals.

    Pass only studies that hold a lesion (the positives); each is one trial.

    Args:
        volumes_ml: shape (n,), float, true lesion volume in ml, >= bins[0] and < bins[-1].
        subtypes: shape (n,), str, lesion type per study (``training.format.
            HAEMORRHAGE_SUBTYPES`` names...).
        detected: shape (n,), bool or 0/1, whether the study was flagged.
        bins: increasing edges in ml; bin j is [bins[j], bins[j+1]).
        confidence: level of the Wilson intervals.

    Raises:
        ValueError: mismatched lengths, non-increasing bins, or a volume outside the bins.
    """
    v = np.asarray(volumes_ml, dtype=np.float64)
    st = np.asarray(subtypes, dtype=str)
    d = _labels(detected, "detected").astype(bool)
    if not (v.ndim == 1 and v.shape == st.shape == d.shape):
        raise ValueError(
            f"volumes_ml {v.shape}, subtypes {st.shape} and detected {d.shape} must be 1-D "
            "and of one length"
        )
    edges = np.asarray(bins, dtype=np.float64)
    if edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be at least two increasing edges, got {tuple(bins)}")
    outside = np.isnan(v) | (v < edges[0]) | (v >= edges[-1])
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} volumes are missing or outside [{edges[0]:g}, {edges[-1]:g}) ml"
        )
    col = np.searchsorted(edges, v, side="right") - 1
    names = tuple(sorted(set(st.tolist()) - {ALL_SUBTYPES})) + (ALL_SUBTYPES,)
    shape = (len(names), edges.size - 1)
    n = np.zeros(shape, dtype=np.int64)
    hit = np.zeros(shape, dtype=np.int64)
    for i, name in enumerate(names):
        rows = np.ones_like(d) if name == ALL_SUBTYPES else st == name
        n[i] = np.bincount(col[rows], minlength=shape[1])
        hit[i] = np.bincount(col[rows & d], minlength=shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(n > 0, hit / np.maximum(n, 1), np.nan)
    low = np.full(shape, np.nan)
    high = np.full(shape, np.nan)
    for idx in np.ndindex(shape):
        low[idx], high[idx] = wilson_interval(int(hit[idx]), int(n[idx]), confidence)
    return DetectionLimitTable(
        tuple(float(b) for b in edges), names, n, hit, sens, low, high, confidence
    )


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class StudyRow:
    """One evaluated study, as the evaluation loop produces it.

    Attributes:
        y_true: reference label, 1 present / 0 absent.
        score: the model's finding score (finite; [0, 1] for calibration metrics).
        flagged: the decision at the current threshold (``score >= threshold`` in serving).
        true_volume_ml: reference lesion volume (inserted or expert-segmented), ml; 0.0
            for a study without a lesion. None leaves the study out of the volume metrics
            (and, for a positive, out of the detection-limit table).
        pred_volume_ml: the model's volume of the same lesion class(es), ml (a negative's
            false-positive volume counts as error); None: left out of the volume metrics.
        subtype: lesion type (``training.format.HAEMORRHAGE_SUBTYPES`` names, ``normal``).
        dice: the study's Dice for the finding (e.g. :func:`blood_dice`); ``nan`` allowed.
        dice_by_class: the study's :func:`dice` per class.
    """

    y_true: int
    score: float
    flagged: bool
    true_volume_ml: float | None = None
    pred_volume_ml: float | None = None
    subtype: str | None = None
    dice: float | None = None
    dice_by_class: Mapping[int, float] | None = None


@dataclass
class Summary:
    """The outcome of :func:`summarise`.

    Attributes:
        metrics: flat ``{name: float}`` for ``mlflow.log_metrics`` (``nan`` = undefined).
        reasons: why each ``nan`` metric is undefined, one line each (no patient data).
        warnings: caveats on metrics that are defined (tiny samples, uncalibrated scores).
        y_true, y_score: shape (n,), the inputs, for :func:`training.plots.roc_plot`.
        operating_point: the current decision's performance (threshold as given).
        auroc_ci: ``(point, low, high)`` or None.
        reliability: the reliability curve, or None.
        detection: the detection-limit table, or None.
        true_volume_ml, pred_volume_ml: shape (k,), studies with both volumes.
        synthetic: the data are synthetic (plots say "demonstration data").
    """

    metrics: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    y_true: NDArray[np.int8] = field(default_factory=lambda: np.zeros(0, np.int8))
    y_score: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    operating_point: OperatingPoint | None = None
    auroc_ci: tuple[float, float, float] | None = None
    reliability: ReliabilityCurve | None = None
    detection: DetectionLimitTable | None = None
    true_volume_ml: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    pred_volume_ml: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    synthetic: bool = False


def _pct(rate: float) -> str:
    return f"{round(rate * 100):d}"


def _finite(values: Sequence[float | None]) -> NDArray[np.float64]:
    a = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return a[np.isfinite(a)]


def summarise(
    rows: Sequence[StudyRow],
    *,
    threshold: float | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    n_bins: int = 10,
    specificities: Sequence[float] = (0.9, 0.95),
    sensitivities: Sequence[float] = (0.9, 0.95),
    volume_bins: Sequence[float] = DEFAULT_VOLUME_BINS,
    min_per_class: int = 10,
    synthetic: bool = False,
) -> Summary:
    """Everything the evaluation reports, from per-study rows; never fails on small samples.

    Metric names (all floats; the same keys whatever the data, ``nan`` when undefined with
    a line in ``reasons``): ``n``, ``n_positive``, ``n_negative``, ``prevalence``,
    ``auroc``, ``auroc_ci_low``, ``auroc_ci_high``; at the current decision (``flagged``):
    ``sensitivity``, ``specificity`` (each with ``_ci_low``/``_ci_high``, Wilson), ``ppv``,
    ``npv``, ``accuracy``, ``flagged_fraction``, ``tp``, ``fp``, ``tn``, ``fn``;
    ``sens_at_spec90`` / ``..._threshold`` per ``specificities``, ``spec_at_sens90`` /
    ``..._threshold`` per ``sensitivities``; ``ece``, ``brier`` (scores in [0, 1] only);
    ``dice_mean``, ``dice_median``, ``dice_n``, ``dice_<class>_mean``;
    ``volume_abs_error_ml_mean``, ``volume_abs_error_ml_median``,
    ``volume_signed_error_ml_mean``, ``volume_n``; ``detection_sensitivity_<lo>-<hi>ml``
    per volume bin (all subtypes). ``threshold`` is added when given.

    Args:
        rows: one :class:`StudyRow` per study (may be empty).
        threshold: the threshold that produced ``flagged`` (recorded only).
        n_boot, alpha, seed: the stratified percentile bootstrap of the AUROC.
        n_bins: bins of the reliability curve (uniform).
        specificities, sensitivities: targets of the sens-at-spec / spec-at-sens metrics.
        volume_bins: edges (ml) of the detection-limit table.
        min_per_class: below this many studies of a class, a warning says intervals and
            operating points are unreliable.
        synthetic: the data are synthetic (carried to the plots).

    Raises:
        ValueError: only for malformed rows (labels other than 0/1, non-finite scores).
    """
    y = _labels([r.y_true for r in rows])
    s = np.asarray([r.score for r in rows], dtype=np.float64)
    y, s = _binary_inputs(y, s)
    flagged = _labels([bool(r.flagged) for r in rows], "flagged")
    reasons: list[str] = []
    warnings: list[str] = []
    m: dict[str, float] = {}
    nan = math.nan

    def undefined(names: Sequence[str], why: str) -> None:
        for name in names:
            m[name] = nan
        reasons.append(f"{', '.join(names)}: {why}")

    n = int(y.size)
    n_pos = int(y.sum())
    n_neg = n - n_pos
    m |= {"n": float(n), "n_positive": float(n_pos), "n_negative": float(n_neg)}
    m["prevalence"] = _ratio(n_pos, n)
    if threshold is not None:
        m["threshold"] = float(threshold)
    both = n_pos > 0 and n_neg > 0
    single = f"needs both classes, have {n_pos} positive and {n_neg} negative studies"
    if n == 0:
        reasons.append("no studies")
    elif both and min(n_pos, n_neg) < min_per_class:
        warnings.append(
            f"only {min(n_pos, n_neg)} studies in the smaller class (< {min_per_class}): "
            "intervals are wide and operating points unstable"
        )

    # discrimination
    auroc_ci = None
    if both:
        b = bootstrap(auroc, y, s, n_boot=n_boot, alpha=alpha, seed=seed, stratified=True)
        auroc_ci = b.interval
        m |= {"auroc": b.point, "auroc_ci_low": b.low, "auroc_ci_high": b.high}
    else:
        undefined(["auroc", "auroc_ci_low", "auroc_ci_high"], single)

    # the current decision
    c = confusion(y, flagged)
    m |= {"tp": float(c.tp), "fp": float(c.fp), "tn": float(c.tn), "fn": float(c.fn)}
    conf = 1.0 - alpha
    for name, k, total in (
        ("sensitivity", c.tp, c.n_positive),
        ("specificity", c.tn, c.n_negative),
    ):
        names = [name, f"{name}_ci_low", f"{name}_ci_high"]
        if total:
            lo, hi = wilson_interval(k, total, conf)
            m |= dict(zip(names, (k / total, lo, hi), strict=True))
        else:
            undefined(names, f"no {'positive' if name == 'sensitivity' else 'negative'} studies")
    for name, value, why in (
        ("ppv", c.ppv, "no study flagged"),
        ("npv", c.npv, "every study flagged"),
        ("accuracy", c.accuracy, "no studies"),
        ("flagged_fraction", _ratio(c.tp + c.fp, n), "no studies"),
    ):
        if math.isnan(value):
            undefined([name], why if n else "no studies")
        else:
            m[name] = value
    op = None
    if n:
        op = OperatingPoint(
            threshold=nan if threshold is None else float(threshold),
            sensitivity=c.sensitivity,
            specificity=c.specificity,
            ppv=c.ppv,
            npv=c.npv,
            n=n,
            rule="fixed",
            n_positive=n_pos,
            n_negative=n_neg,
        )

    # operating points on the ROC
    for target in specificities:
        key = f"sens_at_spec{_pct(target)}"
        if both:
            m[key], m[f"{key}_threshold"] = sensitivity_at_specificity(y, s, target)
        else:
            undefined([key, f"{key}_threshold"], single)
    for target in sensitivities:
        key = f"spec_at_sens{_pct(target)}"
        if both:
            m[key], m[f"{key}_threshold"] = specificity_at_sensitivity(y, s, target)
        else:
            undefined([key, f"{key}_threshold"], single)

    # calibration (of a score in [0, 1])
    curve = None
    if n == 0:
        undefined(["ece", "brier"], "no studies")
    elif s.min() < 0.0 or s.max() > 1.0:
        undefined(["ece", "brier"], "scores are not in [0, 1]")
    else:
        curve = reliability(y, s, n_bins=n_bins, strategy="uniform")
        m["ece"] = curve.ece
        m["brier"] = float(brier_score_loss(y, s, labels=[0, 1]))
        warnings.append(
            "ece and brier treat the score as a probability; they are meaningful only for "
            "calibrated outputs"
        )

    # segmentation
    d = _finite([r.dice for r in rows])
    if d.size:
        m |= {"dice_mean": float(d.mean()), "dice_median": float(np.median(d))}
    else:
        undefined(["dice_mean", "dice_median"], "no study with a defined Dice")
    m["dice_n"] = float(d.size)
    classes = sorted({int(k) for r in rows if r.dice_by_class for k in r.dice_by_class})
    for cls in classes:
        key = f"dice_{BLAST_CT_CLASSES.get(cls, f'class{cls}')}_mean"
        vals = _finite([(r.dice_by_class or {}).get(cls) for r in rows])
        if vals.size:
            m[key] = float(vals.mean())
        else:
            undefined([key], f"class {cls} is absent from every prediction and reference")

    # volumes
    have = [
        (r.true_volume_ml, r.pred_volume_ml)
        for r in rows
        if r.true_volume_ml is not None
        and r.pred_volume_ml is not None
        and math.isfinite(r.true_volume_ml)
        and math.isfinite(r.pred_volume_ml)
    ]
    tv = np.asarray([a for a, _ in have], dtype=np.float64)
    pv = np.asarray([b for _, b in have], dtype=np.float64)
    vol_names = [
        "volume_abs_error_ml_mean",
        "volume_abs_error_ml_median",
        "volume_signed_error_ml_mean",
    ]
    if tv.size:
        err = pv - tv
        m |= dict(
            zip(
                vol_names,
                (float(np.abs(err).mean()), float(np.median(np.abs(err))), float(err.mean())),
                strict=True,
            )
        )
    else:
        undefined(vol_names, "no study with both a reference and a predicted volume")
    m["volume_n"] = float(tv.size)

    # detection limit (positives with a volume and a subtype)
    lesions = [
        r
        for r in rows
        if r.y_true == 1
        and r.true_volume_ml is not None
        and math.isfinite(r.true_volume_ml)
        and r.subtype
    ]
    edges = tuple(float(e) for e in volume_bins)
    det_keys = [
        f"detection_sensitivity_{_fmt_ml(a)}-{_fmt_ml(b)}ml"
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]
    table = None
    inside = [r for r in lesions if edges[0] <= float(r.true_volume_ml or 0.0) < edges[-1]]
    if len(inside) < len(lesions):
        warnings.append(
            f"{len(lesions) - len(inside)} lesions outside the volume bins were left out of "
            "the detection-limit table"
        )
    if inside:
        table = detection_limit(
            [float(r.true_volume_ml or 0.0) for r in inside],
            [str(r.subtype) for r in inside],
            [bool(r.flagged) for r in inside],
            bins=edges,
            confidence=conf,
        )
        for j, key in enumerate(det_keys):
            m[key] = float(table.sensitivity[-1, j])
        empty = [k for j, k in enumerate(det_keys) if table.n[-1, j] == 0]
        if empty:
            reasons.append(f"{', '.join(empty)}: no lesion in the bin")
    else:
        undefined(det_keys, "no positive study with a lesion volume and subtype")

    return Summary(
        metrics=m,
        reasons=reasons,
        warnings=warnings,
        y_true=y,
        y_score=s,
        operating_point=op,
        auroc_ci=auroc_ci,
        reliability=curve,
        detection=table,
        true_volume_ml=tv,
        pred_volume_ml=pv,
        synthetic=synthetic,
    )
