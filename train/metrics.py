"""Detection metrics as the SID literature reports them: per generator, then the mean over generators.

Pure numpy (no scikit-learn at run time); the tests check AP and AUC against scikit-learn, ties
included. Labels are 1 = fake (the positive class), 0 = real; scores are "fake" probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from i2p.base.tables import format_table

MEAN = "mean"


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


def calibrate_threshold(y: Any, p: Any) -> float:
    """The score threshold (predict fake when p >= t) maximizing balanced accuracy on validation data.

    Balanced accuracy, the mean of the accuracy on real and on fake images, is what the SID literature
    reports and does not reward favouring whichever class the validation set happens to hold more of;
    0.5 would assume the head's probabilities are calibrated, which BCE training on a shifted class
    mix does not guarantee. Candidates are the midpoints between consecutive distinct scores; among
    equally good ones the closest to 0.5 wins, so a wide margin yields a threshold in its middle.
    """
    y, p = _check(y, p)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"cannot calibrate a threshold on {n_pos} fake and {n_neg} real images: both classes are needed"
        )
    scores, tp, fp = _counts_by_threshold(y, p)
    # Operating point k predicts fake for the k highest distinct scores (k = 0: none of them).
    tp, fp = np.r_[0, tp], np.r_[0, fp]
    balanced = (tp / n_pos + 1.0 - fp / n_neg) / 2.0
    upper = np.r_[np.nextafter(scores[0], np.inf), scores]  # lowest score predicted fake (or just above all)
    lower = np.r_[scores, -np.inf]  # highest score predicted real (or none)
    middle = (upper + lower) / 2.0
    thresholds = np.where(middle > lower, middle, upper)  # adjacent floats or no lower bound: take upper
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])


@dataclass(frozen=True)
class Metrics:
    """One row of the results table. Accuracies are at the threshold; NaN marks an undefined value."""

    acc_real: float
    acc_fake: float
    acc: float
    ap: float
    auc: float
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
    return format_table(rows, ["generator", "n", "acc_real", "acc_fake", "acc", "ap", "auc"])
