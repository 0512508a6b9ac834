"""training.metrics against hand-computed cases, scikit-learn, scipy and MONAI."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from training.metrics import (
    ALL_SUBTYPES,
    StudyRow,
    auroc,
    blood_dice,
    bootstrap,
    bootstrap_ci,
    choose_threshold,
    confusion,
    detection_limit,
    dice,
    expected_calibration_error,
    operating_point,
    reliability,
    roc_points,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
    summarise,
    volume_error_ml,
    wilson_interval,
)

# A hand-made ROC: 5 negatives, 5 positives, all scores distinct.
#   threshold  0.9  0.8  0.7  0.6  0.5  0.4  0.35 0.3  0.2  0.1
#   tp          1    2    3    3    4    4    5    5    5    5
#   fp          0    0    0    1    1    2    2    3    4    5
NEG = [0.1, 0.2, 0.3, 0.4, 0.6]
POS = [0.35, 0.5, 0.7, 0.8, 0.9]
Y = np.array([0] * 5 + [1] * 5)
S = np.array(NEG + POS)


def _separated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    return y, rng.normal(size=y.size) + 1.2 * y


# --------------------------------------------------------------------------- AUROC


def test_auroc_perfect_reversed_and_ties() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # pairs (neg, pos): (.1,.5) 1, (.1,.9) 1, (.5,.5) 1/2, (.5,.9) 1 -> 3.5 / 4
    assert auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert auroc([True, False], [0.3, 0.3]) == 0.5


def test_auroc_matches_sklearn() -> None:
    y, s = _separated(200, 1)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_auroc_single_class_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="single class: 0 positive and 3 negative"):
        auroc([0, 0, 0], [0.1, 0.2, 0.3])


def test_malformed_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        auroc([0, 1], [0.1, np.nan])


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_point_and_is_deterministic() -> None:
    y, s = _separated(100, 2)
    a = bootstrap_ci(auroc, y, s, n_boot=200, seed=7)
    b = bootstrap_ci(auroc, y, s, n_boot=200, seed=7)
    c = bootstrap_ci(auroc, y, s, n_boot=200, seed=8)
    assert a == b
    assert a != c
    point, low, high = a
    assert point == pytest.approx(roc_auc_score(y, s))
    assert low <= point <= high


def test_bootstrap_ci_narrows_with_more_data() -> None:
    y1, s1 = _separated(60, 3)
    y2, s2 = _separated(600, 3)
    _, lo1, hi1 = bootstrap_ci(auroc, y1, s1, n_boot=200)
    _, lo2, hi2 = bootstrap_ci(auroc, y2, s2, n_boot=200)
    assert hi2 - lo2 < hi1 - lo1


def test_bootstrap_skips_and_counts_resamples_lacking_a_class() -> None:
    y = np.array([1] + [0] * 9)
    s = np.linspace(0.9, 0.0, 10)
    plain = bootstrap(auroc, y, s, n_boot=200, stratified=False)
    # P(no positive among 10 draws) = 0.9**10, about 35%
    assert 30 < plain.n_skipped < 110
    assert plain.low <= plain.high
    strat = bootstrap(auroc, y, s, n_boot=200, stratified=True)
    assert strat.n_skipped == 0
    assert strat.interval == (1.0, 1.0, 1.0)


def test_bootstrap_rejects_one_class_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="single class"):
        bootstrap_ci(auroc, [1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(auroc, [0, 1], [0.1, 0.2], alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(auroc, [0, 1], [0.1, 0.2], n_boot=0)


# --------------------------------------------------------------------------- operating points


def test_roc_points_on_the_hand_made_curve() -> None:
    pts = roc_points(Y, S)
    assert pts.tp.tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 5, 5, 5]
    assert pts.fp.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5]
    assert pts.thresholds[1:].tolist() == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2, 0.1]
    # the first point flags nothing and is finite, so it can be stored
    assert math.isfinite(pts.thresholds[0]) and pts.thresholds[0] > S.max()


@pytest.mark.parametrize(
    ("spec", "sens", "thr"),
    [(0.8, 0.8, 0.5), (0.9, 0.6, 0.7), (1.0, 0.6, 0.7), (0.6, 1.0, 0.35), (0.0, 1.0, 0.35)],
)
def test_sensitivity_at_specificity(spec: float, sens: float, thr: float) -> None:
    got_sens, got_thr = sensitivity_at_specificity(Y, S, spec)
    assert (got_sens, got_thr) == pytest.approx((sens, thr))
    # conservative: the requested specificity is reached on the data
    assert confusion(Y, S >= got_thr).specificity >= spec


@pytest.mark.parametrize(
    ("sens", "spec", "thr"),
    [(1.0, 0.6, 0.35), (0.7, 0.8, 0.5), (0.6, 1.0, 0.7), (0.1, 1.0, 0.7)],
)
def test_specificity_at_sensitivity(sens: float, spec: float, thr: float) -> None:
    got_spec, got_thr = specificity_at_sensitivity(Y, S, sens)
    assert (got_spec, got_thr) == pytest.approx((spec, thr))
    assert confusion(Y, S >= got_thr).sensitivity >= sens


def test_specificity_one_can_mean_flagging_nothing() -> None:
    y = [0, 1, 0, 1]
    s = [0.9, 0.8, 0.1, 0.2]  # the highest score is a negative
    sens, thr = sensitivity_at_specificity(y, s, 1.0)
    assert sens == 0.0
    assert thr > 0.9 and not (np.asarray(s) >= thr).any()


def test_choose_threshold_rules() -> None:
    youden = choose_threshold(Y, S, rule="youden")
    # J = 0.6 at 0.7, 0.5 and 0.35: the tie goes to the most sensitive
    assert youden.threshold == 0.35
    assert (youden.sensitivity, youden.specificity) == pytest.approx((1.0, 0.6))
    assert youden.ppv == pytest.approx(5 / 7)
    assert youden.npv == 1.0
    assert (youden.n, youden.n_positive, youden.n_negative) == (10, 5, 5)
    assert youden.rule == "youden" and youden.target is None

    by_spec = choose_threshold(Y, S, rule="specificity", target=0.8)
    assert (by_spec.threshold, by_spec.sensitivity, by_spec.specificity) == pytest.approx(
        (0.5, 0.8, 0.8)
    )
    by_sens = choose_threshold(Y, S, rule="sensitivity", target=0.7)
    assert (by_sens.threshold, by_sens.sensitivity, by_sens.specificity) == pytest.approx(
        (0.5, 0.8, 0.8)
    )
    assert by_sens.to_dict()["rule"] == "sensitivity"


def test_choose_threshold_errors() -> None:
    with pytest.raises(ValueError, match="needs a target"):
        choose_threshold(Y, S, rule="sensitivity")
    with pytest.raises(ValueError, match="takes no target"):
        choose_threshold(Y, S, rule="youden", target=0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        choose_threshold(Y, S, rule="specificity", target=90)
    with pytest.raises(ValueError, match="unknown rule"):
        choose_threshold(Y, S, rule="f1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="single class"):
        choose_threshold([0, 0], [0.1, 0.2], rule="youden")


def test_operating_point_undefined_rates_are_nan_and_none_in_dict() -> None:
    op = operating_point([0, 0, 1], [0.1, 0.2, 0.3], threshold=0.5)
    assert op.sensitivity == 0.0 and op.specificity == 1.0
    assert math.isnan(op.ppv)
    assert op.to_dict()["ppv"] is None


# --------------------------------------------------------------------------- segmentation


def test_dice_of_known_overlaps() -> None:
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 2, 2], dtype=np.uint8)
    pred = np.array([1, 1, 0, 0, 1, 1, 0, 0, 0, 0], dtype=np.uint8)
    got = dice(pred, truth, labels=(1, 2, 4))
    assert got[1] == pytest.approx(2 * 2 / (4 + 4))
    assert got[2] == 0.0  # present in the reference only
    assert math.isnan(got[4])  # absent from both: undefined, not 1.0
    assert dice(truth, truth, labels=(1, 2)) == {1: 1.0, 2: 1.0}


def test_dice_matches_monai_on_random_maps() -> None:
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, (6, 7, 8), dtype=np.uint8)
    truth = rng.integers(0, 5, (6, 7, 8), dtype=np.uint8)
    ours = dice(pred, truth, labels=(1, 2, 3, 4))

    def onehot(a: np.ndarray) -> object:
        return one_hot(torch.from_numpy(a.astype(np.int64))[None, None], num_classes=5)

    theirs = compute_dice(onehot(pred), onehot(truth), include_background=False)[0]
    assert [ours[c] for c in (1, 2, 3, 4)] == pytest.approx(theirs.tolist(), abs=1e-6)


def test_dice_rejects_mismatched_or_float_maps() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="integer label map"):
        dice(np.zeros(3), np.zeros(3, np.uint8))


def test_blood_dice_ignores_the_type_of_blood_and_oedema() -> None:
    truth = np.array([1, 1, 4, 4, 3, 0], dtype=np.uint8)
    pred = np.array([2, 2, 4, 4, 0, 3], dtype=np.uint8)  # right place, wrong type
    assert blood_dice(pred, truth) == 1.0
    assert math.isnan(blood_dice(np.full(3, 3, np.uint8), np.zeros(3, np.uint8)))


def test_volume_error_per_class_and_total_blood() -> None:
    truth = np.array([1, 1, 1, 1, 2, 2, 4, 3, 0, 0], dtype=np.uint8)
    pred = np.array([1, 1, 0, 0, 2, 2, 2, 3, 4, 4], dtype=np.uint8)
    err = volume_error_ml(pred, truth, voxel_ml=0.5)
    assert err.true_ml == {1: 2.0, 2: 1.0, 4: 0.5}
    assert err.pred_ml == {1: 1.0, 2: 1.5, 4: 1.0}
    assert err.signed_ml == {1: -1.0, 2: 0.5, 4: 0.5}
    assert err.absolute_ml == {1: 1.0, 2: 0.5, 4: 0.5}
    # total blood (oedema, class 3, excluded): 7 voxels each -> no total error
    assert (err.total_true_ml, err.total_pred_ml, err.total_signed_ml) == (3.5, 3.5, 0.0)
    assert err.total_absolute_ml == 0.0
    with pytest.raises(ValueError, match="voxel_ml"):
        volume_error_ml(pred, truth, voxel_ml=0.0)


# --------------------------------------------------------------------------- calibration


def test_reliability_matches_sklearn_bins_and_keeps_counts() -> None:
    rng = np.random.default_rng(4)
    p = rng.beta(0.7, 1.5, 500)
    y = (rng.random(500) < p).astype(int)
    for strategy in ("uniform", "quantile"):
        curve = reliability(y, p, n_bins=8, strategy=strategy)
        ok = curve.counts > 0
        prob_true, prob_pred = calibration_curve(y, p, n_bins=8, strategy=strategy)
        assert curve.observed_fraction[ok] == pytest.approx(prob_true)
        assert curve.mean_predicted[ok] == pytest.approx(prob_pred)
        assert curve.counts.sum() == 500 and curve.edges.size == 9


def test_reliability_empty_bins_are_nan() -> None:
    curve = reliability([0, 1, 1], [0.05, 0.95, 1.0], n_bins=4)
    assert curve.counts.tolist() == [1, 0, 0, 2]
    assert math.isnan(curve.mean_predicted[1]) and math.isnan(curve.observed_fraction[2])
    # hand computed: bin 0 |0 - 0.05| * 1, bin 3 |1 - 0.975| * 2, over 3 studies
    assert curve.ece == pytest.approx((0.05 + 2 * 0.025) / 3)


def test_ece_calibrated_is_near_zero_and_overconfident_is_large() -> None:
    rng = np.random.default_rng(5)
    q = rng.random(20_000)
    y = (rng.random(q.size) < q).astype(int)
    assert expected_calibration_error(y, q) < 0.02
    overconfident = np.where(q > 0.5, 0.99, 0.01)
    assert expected_calibration_error(y, overconfident) > 0.1
    assert expected_calibration_error(y, q, strategy="quantile") < 0.02


def test_reliability_rejects_scores_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability([0, 1], [0.2, 1.5])
    with pytest.raises(ValueError, match="strategy"):
        reliability([0, 1], [0.2, 0.5], strategy="kmeans")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- detection limit


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(8, 10), (0, 10), (10, 10), (1, 3), (37, 50)])
def test_wilson_interval_known_values(k: int, n: int) -> None:
    assert wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-9)


def test_wilson_interval_published_value_and_edges() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_detection_limit_table() -> None:
    volumes = [0.5, 1.9, 2.0, 3.0, 4.0, 30.0, 1.0]
    subtypes = ["subdural", "subdural", "subdural", "intraparenchymal", "subdural", "subdural",
                "intraparenchymal"]  # fmt: skip
    detected = [False, True, True, True, False, True, False]
    t = detection_limit(volumes, subtypes, detected, bins=(0, 2, 5, 10, 25, math.inf))
    assert t.subtypes == ("intraparenchymal", "subdural", ALL_SUBTYPES)
    assert t.bin_labels == ["0-2", "2-5", "5-10", "10-25", "25-inf"]
    assert t.n.tolist() == [[1, 1, 0, 0, 0], [2, 2, 0, 0, 1], [3, 3, 0, 0, 1]]
    assert t.detected.tolist() == [[0, 1, 0, 0, 0], [1, 1, 0, 0, 1], [1, 2, 0, 0, 1]]
    assert t.sensitivity[2, 1] == pytest.approx(2 / 3)
    assert math.isnan(t.sensitivity[2, 2]) and math.isnan(t.low[2, 2])
    assert (t.low[2, 1], t.high[2, 1]) == pytest.approx(_wilson_by_hand(2, 3))
    assert len(t.rows()) == 15


def test_detection_limit_rejects_volumes_outside_the_bins() -> None:
    with pytest.raises(ValueError, match="outside"):
        detection_limit([1.0, 50.0], ["a", "a"], [True, True], bins=(0, 2, 25))
    with pytest.raises(ValueError, match="increasing"):
        detection_limit([1.0], ["a"], [True], bins=(0, 5, 2))


# --------------------------------------------------------------------------- summarise

MLFLOW_NAME = re.compile(r"^[A-Za-z0-9_\-. /]+$")


def _rows(n: int, seed: int) -> list[StudyRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % 2
        score = float(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2), 0, 1))
        vol = float(rng.uniform(0.5, 40)) if y else 0.0
        pred = vol * float(rng.uniform(0.7, 1.2))
        rows.append(
            StudyRow(
                y_true=y,
                score=score,
                flagged=score >= 0.5,
                true_volume_ml=vol,
                pred_volume_ml=pred,
                subtype=("subdural", "intraparenchymal")[i % 4 // 2] if y else "normal",
                dice=float(rng.uniform(0.4, 0.9)) if y else math.nan,
                dice_by_class={1: float(rng.uniform(0.4, 0.9)), 3: math.nan},
            )
        )
    return rows


def test_summarise_full_case() -> None:
    rows = _rows(80, 6)
    out = summarise(rows, threshold=0.5, n_boot=100)
    m = out.metrics
    assert all(isinstance(v, float) for v in m.values())
    assert all(MLFLOW_NAME.match(k) for k in m)
    y = np.array([r.y_true for r in rows])
    s = np.array([r.score for r in rows])
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"]
    c = confusion(y, s >= 0.5)
    assert (m["sensitivity"], m["specificity"]) == (c.sensitivity, c.specificity)
    assert m["sensitivity_ci_low"] <= m["sensitivity"] <= m["sensitivity_ci_high"]
    assert m["sens_at_spec90"] == sensitivity_at_specificity(y, s, 0.9)[0]
    assert m["ece"] == pytest.approx(expected_calibration_error(y, s))
    assert m["dice_n"] == 40.0 and 0.4 <= m["dice_mean"] <= 0.9
    assert "dice_iph_mean" in m and math.isnan(m["dice_oedema_mean"])
    assert m["volume_n"] == 80.0 and m["volume_abs_error_ml_mean"] > 0
    assert m["threshold"] == 0.5 and m["n"] == 80.0
    assert out.detection is not None and out.detection.n[-1].sum() == 40
    assert m["detection_sensitivity_0-2ml"] == pytest.approx(out.detection.sensitivity[-1, 0])
    assert out.reliability is not None and out.operating_point is not None
    assert out.auroc_ci == (m["auroc"], m["auroc_ci_low"], m["auroc_ci_high"])


def test_summarise_six_studies_of_one_class_gives_nan_with_reasons() -> None:
    rows = [StudyRow(y_true=0, score=0.1 * i, flagged=i > 4) for i in range(6)]
    out = summarise(rows, n_boot=50)
    m = out.metrics
    for key in ("auroc", "auroc_ci_low", "sensitivity", "sens_at_spec90", "dice_mean",
                "volume_abs_error_ml_mean", "detection_sensitivity_0-2ml"):  # fmt: skip
        assert math.isnan(m[key]), key
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["ppv"] == 0.0
    assert not math.isnan(m["ece"])
    text = "\n".join(out.reasons)
    assert "auroc" in text and "0 positive and 6 negative" in text
    assert "sensitivity" in text and "no positive studies" in text
    assert out.auroc_ci is None and out.detection is None


def test_summarise_has_the_same_keys_whatever_the_data() -> None:
    full = summarise(_rows(40, 7), n_boot=20)
    tiny = summarise([StudyRow(1, 0.9, True), StudyRow(0, 0.2, False)], n_boot=20)
    empty = summarise([], n_boot=20)
    base = set(full.metrics) - {"dice_iph_mean", "dice_oedema_mean"}
    assert set(tiny.metrics) == set(empty.metrics) == base
    assert tiny.metrics["auroc"] == 1.0
    assert any("smaller class" in w for w in tiny.warnings)
    assert "no studies" in empty.reasons
    assert empty.operating_point is None


def test_summarise_scores_outside_unit_interval_skip_calibration() -> None:
    rows = [StudyRow(i % 2, float(i), i > 2) for i in range(6)]
    out = summarise(rows, n_boot=20)
    assert math.isnan(out.metrics["ece"]) and out.reliability is None
    assert any("not in [0, 1]" in r for r in out.reasons)


def test_summarise_rejects_malformed_rows() -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        summarise([StudyRow(2, 0.5, True)])
