"""Detection metrics as the SID literature reports them: per generator, then the mean over generators.

AUC, AP, accuracy on real and on fake images at a threshold, TPR at 1% and 5% FPR, and the expected
calibration error; plus the thresholds ("operating points") calibrated on validation data. Pure numpy
(no scikit-learn, no torch), so evaluating an exported artifact and evaluating a training checkpoint
run the same code; the tests check every number against scikit-learn, ties included. Labels are
1 = fake (the positive class), 0 = real; scores are "fake" probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from i2p.base.tables import format_table
from i2p.runtime.schema import OperatingPoint  # the checkpoint's and the manifest's type, checked there

MEAN = "mean"
TABLE_COLUMNS = ("n", "acc_real", "acc_fake", "acc", "ap", "auc", "tpr_1pct_fpr", "tpr_5pct_fpr", "ece")


def _check(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D and the same length, got {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got values {np.unique(y)[:10].tolist()}")
    if not np.isfinite(p).all():
        raise ValueError(f"{int((~np.isfinite(p)).sum())} scores are NaN or infinite")
    return y.astype(bool), p


def _counts_by_threshold(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores in descending order, and the true/false positives scoring >= each of them."""
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = last_of_tie + 1 - tp
    return p_sorted[last_of_tie], tp, fp


def average_precision(y: Any, p: Any) -> float:
    """Area under the step precision-recall curve (scikit-learn's definition); NaN without positives.

    Tied scores form one operating point, so the result does not depend on the order of tied items.
    """
    y, p = _check(y, p)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    _, tp, fp = _counts_by_threshold(y, p)
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_gain * tp / (tp + fp)))


def roc_auc(y: Any, p: Any) -> float:
    """Area under the ROC curve: P(score of a fake > score of a real), ties counting one half.

    Computed as the Mann-Whitney U statistic with average ranks, which equals the trapezoidal area
    under the ROC curve. NaN when either class is absent (the area is undefined).
    """
    y, p = _check(y, p)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each distinct score
    rank_sum = average_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def tpr_at_fpr(y: Any, p: Any, max_fpr: float) -> float:
    """The highest true-positive rate of any threshold whose false-positive rate here is <= ``max_fpr``.

    The oracle operating point of this very set (points of the ROC curve, no interpolation), as papers
    report "TPR at 1% FPR"; a threshold fixed on validation data is ``acc_fake`` at that threshold.
    NaN when either class is absent.
    """
    y, p = _check(y, p)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, tp, fp = _counts_by_threshold(y, p)
    tp, fp = np.r_[0, tp], np.r_[0, fp]
    return float(tp[fp <= max_fpr * n_neg + 1e-9].max() / n_pos)


def expected_calibration_error(y: Any, p: Any, bins: int = 15) -> float:
    """Σ_b (n_b / n) · |fraction of fakes in b − mean probability in b| over ``bins`` equal-width bins.

    Calibration of the "fake" probability itself (the reliability diagram of scikit-learn's
    ``calibration_curve``, same bin edges: a score on an inner edge falls in the lower bin). 0 is
    perfectly calibrated; a detector whose threshold is far from 0.5 is usually far from 0.
    """
    y, p = _check(y, p)
    if len(y) == 0:
        return math.nan
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], p)
    n = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, y, bins) - np.bincount(which, p, bins))  # n_b · |frac − conf|
    return float(gap.sum() / n.sum())


def _operating_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every reachable (threshold, true positives, false positives), from "none fake" to "all fake".

    Each threshold sits midway between the lowest score called fake and the highest called real, so a
    wide margin gets a threshold in its middle.
    """
    scores, tp, fp = _counts_by_threshold(y, p)
    tp, fp = np.r_[0, tp], np.r_[0, fp]  # point k: the k highest distinct scores predicted fake
    upper = np.r_[np.nextafter(scores[0], np.inf), scores]  # lowest score predicted fake (or just above all)
    lower = np.r_[scores, -np.inf]  # highest score predicted real (or none)
    middle = (upper + lower) / 2.0
    return np.where(middle > lower, middle, upper), tp, fp  # adjacent floats or no lower bound: upper


def calibrate_threshold(y: Any, p: Any, target_fpr: float | None = None) -> float:
    """The score threshold (predict fake when p >= t) chosen on validation data.

    Default: maximize balanced accuracy, the mean of the accuracy on real and on fake images, which
    the SID literature reports and which does not reward favouring whichever class validation holds
    more of (0.5 would assume calibrated probabilities, which BCE training on a shifted class mix does
    not give). With ``target_fpr``: the most fakes caught while at most that fraction of the validation
    reals is called fake (with 72 reals, 1% allows none), and of those the fewest reals. Among equally
    good thresholds the one closest to 0.5 wins.
    """
    y, p = _check(y, p)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"cannot calibrate a threshold on {n_pos} fake and {n_neg} real images: both classes are needed"
        )
    if target_fpr is not None and not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    thresholds, tp, fp = _operating_points(y, p)
    if target_fpr is None:
        score = (tp / n_pos + 1.0 - fp / n_neg) / 2.0
    else:  # most fakes within the FPR, then fewest reals; point 0 (nothing fake) is always feasible
        feasible = fp <= target_fpr * n_neg + 1e-9
        score = np.where(feasible, tp - fp / (n_neg + 1.0), -1.0)
    best = np.flatnonzero(score >= score.max() - 1e-12)
    # A probability threshold is at most 1: "nothing is fake" above a real scored exactly 1.0 (a
    # saturated sigmoid) cannot be expressed, so such a real stays a false positive.
    return min(float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]]), 1.0)


BALANCED = "balanced"
DEFAULT_TARGETS = (0.01, 0.05)


def point_name(target_fpr: float | None) -> str:
    """``None`` -> "balanced", 0.01 -> "fpr_1pct", 0.005 -> "fpr_0.5pct"."""
    if target_fpr is None:
        return BALANCED
    return f"fpr_{100 * target_fpr:g}pct"


def operating_points(y: Any, p: Any, targets: Sequence[float] = DEFAULT_TARGETS) -> dict[str, OperatingPoint]:
    """ "balanced" and one "fpr_<x>pct" point per target FPR, all calibrated on (``y``, ``p``)."""
    y, p = _check(y, p)
    points = {}
    for target in (None, *targets):
        t = calibrate_threshold(y, p, target)
        fake = p >= t
        points[point_name(target)] = OperatingPoint(
            threshold=t,
            rule="balanced_accuracy" if target is None else "max_tpr_at_fpr",
            target_fpr=target,
            val_fpr=float(fake[~y].mean()),
            val_tpr=float(fake[y].mean()),
            n_real=int((~y).sum()),
            n_fake=int(y.sum()),
        )
    return points


@dataclass(frozen=True)
class Metrics:
    """One row of the results table. Accuracies are at the threshold; NaN marks an undefined value."""

    acc_real: float
    acc_fake: float
    acc: float
    ap: float
    auc: float
    tpr_1pct_fpr: float  # oracle TPR at 1% FPR on this set (see ``tpr_at_fpr``)
    tpr_5pct_fpr: float
    ece: float  # expected calibration error of the fake probability (15 bins)
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready: NaN becomes None (null), which strict JSON parsers accept."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def _metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> Metrics:
    fake = p >= threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    both = n_pos > 0 and n_neg > 0  # AP without reals is trivially 1: report it undefined, like AUC
    return Metrics(
        acc_real=float((~fake[~y]).mean()) if n_neg else math.nan,
        acc_fake=float(fake[y].mean()) if n_pos else math.nan,
        acc=float((fake == y).mean()),
        ap=average_precision(y, p) if both else math.nan,
        auc=roc_auc(y, p) if both else math.nan,
        tpr_1pct_fpr=tpr_at_fpr(y, p, 0.01),
        tpr_5pct_fpr=tpr_at_fpr(y, p, 0.05),
        ece=expected_calibration_error(y, p),
        n=len(y),
    )


def evaluate(y: Any, p: Any, generators: Sequence[str], threshold: float) -> dict[str, Metrics]:
    """Metrics for each generator (sorted by name), then ``"mean"``: the unweighted mean over generators.

    The mean of each metric skips generators where it is undefined (e.g. AUC of a generator with only
    fake images); its ``n`` is the total number of images.
    """
    y, p = _check(y, p)
    generators = np.asarray(generators, dtype=object)
    if generators.shape != y.shape:
        raise ValueError(f"got {len(generators)} generator names for {len(y)} labels")
    if len(y) == 0:
        raise ValueError("nothing to evaluate: no images")
    names = sorted(set(generators.tolist()))
    if MEAN in names:
        raise ValueError(f"a generator may not be named {MEAN!r}: that row holds the mean over generators")
    results = {g: _metrics(y[generators == g], p[generators == g], threshold) for g in names}
    per_field = {
        f.name: [getattr(m, f.name) for m in results.values()] for f in fields(Metrics) if f.name != "n"
    }
    results[MEAN] = Metrics(
        **{k: _nanmean(v) for k, v in per_field.items()}, n=sum(m.n for m in results.values())
    )
    return results


def _nanmean(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def metrics_table(results: dict[str, Metrics]) -> str:
    """The human-readable results table; undefined values print as ``n/a``."""
    rows = [
        {"generator": g, **{k: "n/a" if v is None else v for k, v in m.to_dict().items()}}
        for g, m in results.items()
    ]
    return format_table(rows, ["generator", *TABLE_COLUMNS])
