"""Evaluation figures written as PNG files (matplotlib's Agg canvas; no display, no pyplot).

Each function draws one figure from :mod:`training.metrics` results, writes it at 150 dpi
to ``out`` (parent folders are created) and returns that path. Titles carry the number of
studies (``n=``) and, when ``synthetic`` is set, the words "demonstration data", so a
figure cut out of a report still says what it shows. Figures whose data are undefined (a
ROC of one class) still write a file that says why, so a report never lacks a figure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from training.metrics import (
    ALL_SUBTYPES,
    DetectionLimitTable,
    OperatingPoint,
    ReliabilityCurve,
    roc_points,
)

DPI: Final = 150
DEMO: Final = "demonstration data"


def _title(text: str, n: int, synthetic: bool) -> str:
    parts = [f"{text} (n={n})"]
    if synthetic:
        parts.append(DEMO)
    return " - ".join(parts)


def _figure(width: float = 6.0, height: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _say(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)


def roc_plot(
    y_true: ArrayLike,
    y_score: ArrayLike,
    out: str | Path,
    *,
    operating_point: OperatingPoint | None = None,
    ci: tuple[float, float, float] | None = None,
    synthetic: bool = False,
    title: str = "ROC",
) -> Path:
    """The ROC curve with the chance diagonal and, optionally, the operating point.

    Args:
        y_true: shape (n,), 0/1 reference labels.
        y_score: shape (n,), finite float scores.
        out: the PNG file to write.
        operating_point: marked on the curve (its sensitivity and specificity).
        ci: ``(auroc, low, high)`` shown in the legend (e.g. ``Summary.auroc_ci``).
        synthetic: add "demonstration data" to the title.
        title: the title's first words.

    Returns:
        ``out`` as a Path.
    """
    y = np.asarray(y_true)
    n_pos = int((y == 1).sum())
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    if n_pos == 0 or n_pos == y.size:
        _say(ax, f"ROC undefined: {n_pos} positive, {y.size - n_pos} negative studies")
    else:
        pts = roc_points(y, y_score)
        label = "ROC"
        if ci is not None:
            point, low, high = ci
            label = f"AUROC {point:.3f} (95% CI {low:.3f}-{high:.3f})"
        ax.plot(1 - pts.specificity, pts.sensitivity, drawstyle="steps-post", lw=2, label=label)
    if operating_point is not None and not (
        math.isnan(operating_point.sensitivity) or math.isnan(operating_point.specificity)
    ):
        thr = operating_point.threshold
        where = "" if math.isnan(thr) else f" @ {thr:.3g}"
        ax.plot(
            1 - operating_point.specificity,
            operating_point.sensitivity,
            "o",
            ms=8,
            color="C3",
            label=f"operating point{where}: sens {operating_point.sensitivity:.2f}, "
            f"spec {operating_point.specificity:.2f}",
        )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="1 - specificity (false-positive rate)",
        ylabel="sensitivity (true-positive rate)",
        aspect="equal",
    )
    ax.set_title(_title(f"{title}, {n_pos} positive", int(y.size), synthetic), fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out)


def reliability_plot(
    curve: ReliabilityCurve,
    out: str | Path,
    *,
    ece: float | None = None,
    synthetic: bool = False,
    title: str = "Reliability",
) -> Path:
    """A reliability diagram (observed fraction against mean score per bin, with the
    diagonal of perfect calibration) over a bar chart of the bin counts.

    Args:
        curve: from :func:`training.metrics.reliability`.
        out: the PNG file to write.
        ece: shown in the title when given (meaningful only for calibrated probabilities).
        synthetic: add "demonstration data" to the title.
        title: the title's first words.
    """
    fig = _figure(6.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfectly calibrated")
    ok = curve.counts > 0
    top.plot(curve.mean_predicted[ok], curve.observed_fraction[ok], "o-", color="C0", label="model")
    top.set(ylim=(-0.02, 1.02), ylabel="observed fraction positive")
    top.legend(loc="upper left", fontsize=8)
    widths = np.diff(curve.edges)
    bottom.bar(
        curve.edges[:-1],
        curve.counts,
        width=widths,
        align="edge",
        color="C0",
        alpha=0.6,
        edgecolor="white",
    )
    bottom.set(xlim=(0, 1), xlabel="mean predicted score (bin)", ylabel="studies")
    text = title if ece is None or math.isnan(ece) else f"{title}, ECE {ece:.3f}"
    top.set_title(_title(text, curve.n, synthetic), fontsize=10)
    return _save(fig, out)


def detection_limit_plot(
    table: DetectionLimitTable,
    out: str | Path,
    *,
    synthetic: bool = False,
    title: str = "Detection limit",
) -> Path:
    """Sensitivity by lesion volume bin, one line per subtype (pooled: dashed, black),
    with Wilson intervals as error bars; empty cells are left out.

    Args:
        table: from :func:`training.metrics.detection_limit`.
        out: the PNG file to write.
        synthetic: add "demonstration data" to the title.
        title: the title's first words.
    """
    fig = _figure(7.0, 5.0)
    ax = fig.add_subplot()
    n_bins = len(table.bins) - 1
    x = np.arange(n_bins, dtype=np.float64)
    k = len(table.subtypes)
    offsets = (np.arange(k) - (k - 1) / 2) * 0.06
    for i, subtype in enumerate(table.subtypes):
        ok = table.n[i] > 0
        if not ok.any():
            continue
        sens = table.sensitivity[i][ok]
        err = np.vstack([sens - table.low[i][ok], table.high[i][ok] - sens])
        pooled = subtype == ALL_SUBTYPES
        ax.errorbar(
            x[ok] + offsets[i],
            sens,
            yerr=err,
            marker="o",
            capsize=3,
            lw=2.5 if pooled else 1.5,
            ls="--" if pooled else "-",
            color="black" if pooled else None,
            label=f"{subtype} (n={int(table.n[i].sum())})",
        )
    ax.set_xticks(x, [f"{label} ml" for label in table.bin_labels])
    ax.set(
        ylim=(-0.02, 1.05),
        xlabel="lesion volume bin",
        ylabel=f"sensitivity ({table.confidence:.0%} Wilson interval)",
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    n = int(table.n[list(table.subtypes).index(ALL_SUBTYPES)].sum())
    ax.set_title(_title(title, n, synthetic), fontsize=10)
    return _save(fig, out)


def volume_scatter(
    true_ml: ArrayLike,
    pred_ml: ArrayLike,
    out: str | Path,
    *,
    synthetic: bool = False,
    title: str = "Lesion volume",
) -> Path:
    """Predicted against reference volume with the identity line (left), and a
    Bland-Altman plot (difference against mean, with the bias and 95% limits of
    agreement, right).

    Args:
        true_ml: shape (k,), reference volumes in ml.
        pred_ml: shape (k,), predicted volumes in ml, same studies.
        out: the PNG file to write.
        synthetic: add "demonstration data" to the title.
        title: the title's first words.
    """
    t = np.asarray(true_ml, dtype=np.float64)
    p = np.asarray(pred_ml, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"true_ml {t.shape} and pred_ml {p.shape} must be 1-D, one length")
    fig = _figure(10.0, 5.0)
    left, right = fig.subplots(1, 2)
    top = float(max(t.max(initial=0.0), p.max(initial=0.0), 1.0)) * 1.05
    left.plot([0, top], [0, top], ls="--", color="0.6", lw=1, label="identity")
    left.scatter(t, p, s=18, alpha=0.7)
    left.set(
        xlim=(0, top),
        ylim=(0, top),
        xlabel="reference volume (ml)",
        ylabel="predicted volume (ml)",
        aspect="equal",
    )
    left.legend(loc="upper left", fontsize=8)
    mean = (t + p) / 2
    diff = p - t
    right.scatter(mean, diff, s=18, alpha=0.7)
    right.axhline(0, color="0.6", lw=1)
    if diff.size:
        bias = float(diff.mean())
        right.axhline(bias, color="C3", lw=1.5, label=f"bias {bias:+.2f} ml")
        if diff.size > 1:
            sd = float(diff.std(ddof=1))
            for sign in (-1, 1):
                right.axhline(bias + sign * 1.96 * sd, color="C3", ls=":", lw=1)
            right.plot([], [], color="C3", ls=":", label=f"95% limits ±{1.96 * sd:.2f} ml")
        right.legend(loc="upper left", fontsize=8)
    else:
        _say(right, "no studies with both volumes")
    right.set(xlabel="mean of reference and predicted (ml)", ylabel="predicted - reference (ml)")
    fig.suptitle(_title(title, int(t.size), synthetic), fontsize=11)
    return _save(fig, out)
