"""Detection metrics against scikit-learn (AP, AUC, TPR at FPR, ECE; ties included), operating points, tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from i2p.evaluation.metrics import (
    Metrics,
    OperatingPoint,
    average_precision,
    calibrate_threshold,
    evaluate,
    expected_calibration_error,
    metrics_table,
    operating_points,
    point_name,
    roc_auc,
    tpr_at_fpr,
)


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores with a varied size, class balance, signal strength and amount of ties."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
    y[:2] = [0, 1]  # both classes present
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + rng.uniform(0, 3) * y)))
    decimals = int(rng.integers(0, 4))  # 0 decimals: massive ties, 3: a few
    return y, np.round(p, decimals) if seed % 4 else p


@pytest.mark.parametrize("seed", range(60))
def test_ap_and_auc_match_sklearn(seed):
    y, p = random_case(seed)
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_ties_do_not_depend_on_order():
    y = np.array([1, 0, 1, 0, 1, 0])
    p = np.array([0.5, 0.5, 0.5, 0.5, 0.9, 0.1])
    perm = np.array([5, 3, 1, 0, 2, 4])
    assert roc_auc(y, p) == roc_auc(y[perm], p[perm]) == pytest.approx(roc_auc_score(y, p))
    assert average_precision(y, p) == average_precision(y[perm], p[perm])
    assert average_precision(y, p) == pytest.approx(average_precision_score(y, p))


def test_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1], [0.3, 0.3]) == 0.5
    assert average_precision([0, 1, 1], [0.9, 0.5, 0.4]) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_undefined_values_are_nan():
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.5]))
    assert math.isnan(average_precision([0, 0], [0.1, 0.5]))


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1], [0.1], "same length"),
        ([0, 2], [0.1, 0.2], "labels must be 0"),
        ([0, 1], [0.1, float("nan")], "NaN or infinite"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_bad_inputs_are_rejected(y, p, message):
    for fn in (roc_auc, average_precision, calibrate_threshold):
        with pytest.raises(ValueError, match=message):
            fn(y, p)


def balanced_accuracy(y: np.ndarray, p: np.ndarray, t: float) -> float:
    fake = p >= t
    return (fake[y == 1].mean() + (~fake[y == 0]).mean()) / 2


@pytest.mark.parametrize("seed", range(30))
def test_calibrated_threshold_maximizes_balanced_accuracy(seed):
    y, p = random_case(seed)
    t = calibrate_threshold(y, p)
    fpr, tpr, _ = roc_curve(y, p)  # every operating point a threshold can reach
    best = ((tpr + 1 - fpr) / 2).max()
    assert balanced_accuracy(y, p, t) == pytest.approx(best, abs=1e-12)


def test_calibrated_threshold_sits_in_the_gap_of_separable_scores():
    # Probabilities squeezed above 0.5 and classes 1:9: a 0.5 cutoff calls every real image fake.
    y = np.array([0] * 9 + [1])
    p = np.array([0.6, 0.61, 0.62, 0.63, 0.64, 0.65, 0.66, 0.67, 0.7, 0.9])
    t = calibrate_threshold(y, p)
    assert t == pytest.approx(0.8)
    assert balanced_accuracy(y, p, t) == 1.0 and balanced_accuracy(y, p, 0.5) == 0.5


def test_calibrated_threshold_prefers_the_candidate_nearest_one_half():
    y = np.array([0, 1])
    assert calibrate_threshold(y, np.array([0.4, 0.4])) == pytest.approx(0.4)  # no split: all fake or none
    y = np.array([0, 1, 0, 1])  # two equally good cuts (balanced accuracy 3/4): 0.15 and 0.35
    p = np.array([0.1, 0.2, 0.3, 0.4])
    t = calibrate_threshold(y, p)
    assert balanced_accuracy(y, p, t) == pytest.approx(3 / 4)
    assert t == pytest.approx(0.35)


def test_calibration_needs_both_classes():
    with pytest.raises(ValueError, match="both classes are needed"):
        calibrate_threshold([1, 1, 1], [0.2, 0.4, 0.9])


def test_evaluate_per_generator_and_mean():
    rng = np.random.default_rng(0)
    gens = np.array(["sd"] * 40 + ["glide"] * 30 + ["dalle"] * 10)
    y = rng.integers(0, 2, size=80)
    y[[0, 1, 40, 41, 70, 71]] = [0, 1, 0, 1, 0, 1]
    p = np.round(1 / (1 + np.exp(-(rng.normal(size=80) + 1.5 * y))), 2)
    results = evaluate(y, p, gens.tolist(), threshold=0.6)
    assert list(results) == ["dalle", "glide", "sd", "mean"]
    for g in ("dalle", "glide", "sd"):
        m, yy, pp = results[g], y[gens == g], p[gens == g]
        assert m.n == len(yy)
        assert m.acc_real == pytest.approx(np.mean(pp[yy == 0] < 0.6))
        assert m.acc_fake == pytest.approx(np.mean(pp[yy == 1] >= 0.6))
        assert m.acc == pytest.approx(np.mean((pp >= 0.6) == yy))
        assert m.ap == pytest.approx(average_precision_score(yy, pp))
        assert m.auc == pytest.approx(roc_auc_score(yy, pp))
        fpr, tpr, _ = roc_curve(yy, pp, drop_intermediate=False)
        assert m.tpr_5pct_fpr == pytest.approx(tpr[fpr <= 0.05].max())
    mean = results["mean"]
    assert mean.n == 80
    for field in ("acc_real", "acc_fake", "acc", "ap", "auc", "tpr_1pct_fpr", "tpr_5pct_fpr", "ece"):
        assert getattr(mean, field) == pytest.approx(
            np.mean([getattr(results[g], field) for g in ("dalle", "glide", "sd")])
        )


def test_single_class_generator_reports_undefined_values_and_the_table_says_so():
    y = np.array([0, 1, 0, 1, 1, 1])
    p = np.array([0.2, 0.8, 0.4, 0.3, 0.9, 0.1])
    gens = ["a", "a", "a", "a", "fake_only", "fake_only"]
    results = evaluate(y, p, gens, threshold=0.5)
    only = results["fake_only"]
    assert math.isnan(only.acc_real) and math.isnan(only.ap) and math.isnan(only.auc)
    assert only.acc_fake == only.acc == 0.5
    assert results["mean"].auc == results["a"].auc == pytest.approx(roc_auc_score(y[:4], p[:4]))
    assert results["mean"].acc_fake == pytest.approx((results["a"].acc_fake + 0.5) / 2)
    table = metrics_table(results).splitlines()
    assert table[0].split() == [
        "generator", "n", "acc_real", "acc_fake", "acc", "ap", "auc", "tpr_1pct_fpr", "tpr_5pct_fpr", "ece",
    ]  # fmt: skip
    assert table[-1].split()[:2] == ["mean", "6"]
    fake_row = next(line.split() for line in table if line.startswith("fake_only"))
    assert fake_row[:8] == ["fake_only", "2", "n/a", "0.5000", "0.5000", "n/a", "n/a", "n/a"]
    json.loads(json.dumps({g: m.to_dict() for g, m in results.items()}, allow_nan=False))


def test_evaluate_rejects_mismatched_or_reserved_generators():
    with pytest.raises(ValueError, match="3 generator names for 2 labels"):
        evaluate([0, 1], [0.1, 0.9], ["a", "a", "a"], 0.5)
    with pytest.raises(ValueError, match="may not be named 'mean'"):
        evaluate([0, 1], [0.1, 0.9], ["mean", "mean"], 0.5)
    with pytest.raises(ValueError, match="no images"):
        evaluate([], [], [], 0.5)


def test_metrics_to_dict_keeps_numbers():
    m = Metrics(
        acc_real=0.5,
        acc_fake=1.0,
        acc=0.75,
        ap=math.nan,
        auc=0.9,
        tpr_1pct_fpr=0.2,
        tpr_5pct_fpr=0.4,
        ece=0.1,
        n=4,
    )
    assert m.to_dict() == {
        "acc_real": 0.5, "acc_fake": 1.0, "acc": 0.75, "ap": None, "auc": 0.9,
        "tpr_1pct_fpr": 0.2, "tpr_5pct_fpr": 0.4, "ece": 0.1, "n": 4,
    }  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("max_fpr", [0.0, 0.01, 0.05, 0.3])
def test_tpr_at_fpr_matches_sklearn_roc_curve(seed, max_fpr):
    y, p = random_case(seed)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    assert tpr_at_fpr(y, p, max_fpr) == pytest.approx(tpr[fpr <= max_fpr + 1e-12].max(), abs=1e-12)


def test_tpr_at_fpr_known_values():
    y = np.array([0] * 100 + [1] * 4)
    p = np.r_[np.linspace(0, 0.5, 99), 0.95, [0.99, 0.9, 0.97, 0.2]]  # one real outscores two fakes
    assert tpr_at_fpr(y, p, 0.0) == 0.5  # only 0.99 and 0.97 beat every real
    assert tpr_at_fpr(y, p, 0.01) == 0.75  # one false positive (0.95) admits 0.9
    assert math.isnan(tpr_at_fpr([1, 1], [0.2, 0.3], 0.05))


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("bins", [5, 15])
def test_ece_matches_sklearn_calibration_curve(seed, bins):
    y, p = random_case(seed)
    if seed % 3 == 0:
        p = np.round(p * bins) / bins  # scores on the bin edges: the edge convention must agree
    prob_true, prob_pred = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    edges = np.linspace(0, 1, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=bins)
    counts = counts[counts > 0]  # calibration_curve drops empty bins
    expected = np.sum(counts * np.abs(prob_true - prob_pred)) / len(y)
    assert expected_calibration_error(y, p, bins) == pytest.approx(expected, abs=1e-12)


def test_ece_known_values():
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert expected_calibration_error([0, 0, 1, 1], [0.9, 0.9, 0.9, 0.9]) == pytest.approx(0.4)
    assert expected_calibration_error([1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.2])
def test_target_fpr_threshold_catches_the_most_fakes_within_the_fpr(seed, target):
    y, p = random_case(seed)
    p = np.minimum(p, 0.99)  # below 1: every operating point is reachable by a probability threshold
    t = calibrate_threshold(y, p, target_fpr=target)
    fake = p >= t
    assert fake[y == 0].mean() <= target + 1e-12
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    assert fake[y == 1].mean() == pytest.approx(tpr[fpr <= target + 1e-12].max(), abs=1e-12)


def test_target_fpr_threshold_sits_between_reals_and_the_next_fake():
    y = np.array([0] * 10 + [1] * 3)
    p = np.r_[np.arange(10) / 20, [0.43, 0.8, 0.9]]  # reals 0 .. 0.45
    assert calibrate_threshold(y, p, target_fpr=0.0) == pytest.approx((0.45 + 0.8) / 2)
    assert calibrate_threshold(y, p, target_fpr=0.1) == pytest.approx((0.4 + 0.43) / 2)  # 1 of 10 reals
    y, p = (
        np.array([0, 0, 1]),
        np.array([0.1, 0.2, 0.9]),
    )  # every fake caught at 0 FPR: 50% allowed adds no real
    assert calibrate_threshold(y, p, target_fpr=0.5) == pytest.approx(0.55)
    saturated = np.array([0.3, 1.0, 1.0, 0.9])  # a real at exactly 1.0: the threshold stays a probability
    assert calibrate_threshold(np.array([0, 0, 1, 1]), saturated, target_fpr=0.0) == 1.0
    with pytest.raises(ValueError, match="target FPR"):
        calibrate_threshold(y, p, target_fpr=1.0)


def test_operating_points_name_rule_and_validation_rates():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(200, int), np.ones(100, int)]
    p = 1 / (1 + np.exp(-(rng.normal(size=300) + 2 * y)))
    points = operating_points(y, p)
    assert list(points) == ["balanced", "fpr_1pct", "fpr_5pct"]
    assert points["balanced"].threshold == calibrate_threshold(y, p)
    assert points["fpr_1pct"].threshold == calibrate_threshold(y, p, 0.01)
    for name, target in (("fpr_1pct", 0.01), ("fpr_5pct", 0.05)):
        pt = points[name]
        assert pt.rule == "max_tpr_at_fpr" and pt.target_fpr == target
        assert pt.val_fpr == np.mean(p[y == 0] >= pt.threshold) <= target
        assert pt.val_tpr == np.mean(p[y == 1] >= pt.threshold)
        assert (pt.n_real, pt.n_fake) == (200, 100)
        assert OperatingPoint.from_dict(json.loads(json.dumps(pt.to_dict()))) == pt
    assert points["fpr_1pct"].threshold >= points["fpr_5pct"].threshold
    assert point_name(0.005) == "fpr_0.5pct" and point_name(None) == "balanced"
