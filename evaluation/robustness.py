"""Robustness sweeps: score a labelled set under each degradation, then tabulate and plot the metrics.

One implementation for both evaluation paths: ``i2p eval --ckpt`` (a PyTorch checkpoint) and
``i2p eval --model`` (an exported artifact through the torch-free ``Detector``) pass a scoring
function; decoding, the degradation (the same for real and generated images: the labels are not
even given to it) and the metrics are here. Unreadable files are reported and skipped, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from i2p.base.progress import Progress
from i2p.base.tables import format_table
from i2p.runtime.preprocess import ImageError

from .metrics import MEAN, Metrics, evaluate
from .perturb import Condition
from .verdicts import uncertain_shares

log = logging.getLogger("i2p")


@dataclass(frozen=True)
class Scored:
    """A scorer's answer for a batch: "fake" probabilities (NaN: no score) and, from an artifact with the OOD
    output, whether each verdict is uncertain (``Prediction.uncertain``; None without it)."""

    probabilities: np.ndarray
    uncertain: np.ndarray | None = None


# decoded RGB images -> "fake" probabilities (NaN: none), or Scored with the uncertain flags
Scorer = Callable[[list[Image.Image]], "np.ndarray | Scored"]


@dataclass(frozen=True)
class ImageScores:
    """Each scored image of one condition, in ``discover`` order: what the HTML report's curves,
    histograms and galleries are drawn from (the metrics alone cannot show which images failed)."""

    paths: tuple[str, ...]
    labels: np.ndarray  # 0 real, 1 fake
    generators: tuple[str, ...]
    probabilities: np.ndarray
    uncertain: np.ndarray | None = None  # bool per image, when the scorer flags uncertain verdicts


@dataclass
class SweepResult:
    """Metrics per condition (clean first), per generator and mean, at one threshold."""

    threshold: float
    metrics: dict[str, dict[str, Metrics]]
    strengths: dict[str, float | None]
    skipped: list[tuple[str, str]]  # (path, reason), once per file
    scorer: dict[str, str] | None = None  # an artifact's: the backend and precision that scored it
    scores: dict[str, ImageScores] = field(default_factory=dict)  # per condition; not in to_dict (size)

    def to_dict(self) -> dict[str, Any]:
        shares = {s.condition: s.to_dict() for s in uncertain_shares(self)}
        return {
            **(self.scorer or {}),
            "threshold": self.threshold,
            "conditions": {
                c: {
                    "strength": self.strengths[c],
                    "metrics": {g: m.to_dict() for g, m in ms.items()},
                    **({"uncertain": shares[c]} if c in shares else {}),
                }
                for c, ms in self.metrics.items()
            },
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def _batches(samples: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _load(sample: Any, condition: Condition) -> Image.Image | str:
    """The degraded image, or why it could not be read (decoding runs on worker threads)."""
    try:
        return condition.load(sample.path)
    except (ImageError, OSError) as e:
        return str(e)


def score_condition(
    samples: Sequence[Any],
    condition: Condition,
    scorer: Scorer,
    batch_size: int = 32,
    progress=None,
    workers: int = 2,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[tuple[str, str]]]:
    """(probabilities, uncertain flags or None, indices of the scored samples, skipped (path, reason)) under
    one condition."""
    probs, flags, kept, skipped = [], [], [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # closed even if the scorer raises
        for offset, batch in enumerate(_batches(samples, batch_size)):
            images, idx = [], []
            for j, (s, img) in enumerate(
                zip(batch, pool.map(_load, batch, [condition] * len(batch)), strict=True)
            ):
                if isinstance(img, str):
                    skipped.append((str(s.path), img))
                else:
                    images.append(img)
                    idx.append(offset * batch_size + j)
            if images:
                answer = scorer(images)
                answer = answer if isinstance(answer, Scored) else Scored(answer)
                scores = np.asarray(answer.probabilities, dtype=np.float64)
                for i in np.flatnonzero(~np.isfinite(scores)):  # the scorer's way of saying "could not score"
                    skipped.append((str(samples[idx[i]].path), "the model returned no score"))
                probs.append(scores[np.isfinite(scores)])
                if answer.uncertain is not None:
                    flags.append(np.asarray(answer.uncertain, dtype=bool)[np.isfinite(scores)])
                kept += [j for j, ok in zip(idx, np.isfinite(scores), strict=True) if ok]
            if progress is not None:
                progress(len(batch))
    uncertain = np.concatenate(flags) if flags and len(flags) == len(probs) else None
    return (
        (np.concatenate(probs) if probs else np.empty(0)),
        uncertain,
        np.asarray(kept, dtype=np.int64),
        skipped,
    )


def sweep(
    samples: Sequence[Any],
    conditions: Sequence[Condition],
    scorer: Scorer,
    threshold: float,
    batch_size: int = 32,
    progress=None,
    workers: int = 2,
) -> SweepResult:
    """Metrics of ``scorer`` on ``samples`` under every condition, at ``threshold``."""
    metrics, strengths, skipped, scores = {}, {}, {}, {}
    for cond in conditions:
        p, uncertain, idx, bad = score_condition(samples, cond, scorer, batch_size, progress, workers)
        skipped.update(dict(bad))
        if not len(idx):
            raise ValueError(f"no readable images to evaluate under {cond.name}")
        y = np.array([samples[i].label for i in idx])
        generators = tuple(samples[i].generator for i in idx)
        metrics[cond.name] = evaluate(y, p, generators, threshold)
        strengths[cond.name] = cond.strength
        scores[cond.name] = ImageScores(tuple(str(samples[i].path) for i in idx), y, generators, p, uncertain)
    return SweepResult(threshold, metrics, strengths, sorted(skipped.items()), scores=scores)


def sweep_table(result: SweepResult, metric: str = "auc") -> str:
    """One row per condition: ``metric`` per generator, the mean, and the mean's change from clean."""
    clean = next(iter(result.metrics.values()))[MEAN]
    rows = []
    for cond, ms in result.metrics.items():
        row: dict[str, Any] = {"condition": cond}
        row.update({g: getattr(m, metric) for g, m in ms.items()})
        delta = getattr(ms[MEAN], metric) - getattr(clean, metric)
        row[f"Δ{metric} vs clean"] = delta
        rows.append(row)
    return format_table(rows)


def plot_sweep(result: SweepResult, path: Path, metric: str = "auc", title: str = "") -> Path:
    """Metric vs strength, one panel per degradation kind, one line per generator (and the mean).

    Needs matplotlib (installed with the [train] extra); the clean value is drawn at the no-op
    strength of each kind (quality 100, factor 1, sigma 0). Chains appear as single points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: dict[str, list[tuple[float, str]]] = {}
    chains = []
    for cond, strength in result.strengths.items():
        if cond == "clean":
            continue
        if strength is None:
            chains.append(cond)
        else:
            kinds.setdefault(cond.split(":")[0], []).append((strength, cond))
    panels = list(kinds) + (["chains"] if chains else [])
    noop = {"jpeg": 100.0, "resize": 1.0, "blur": 0.0, "scale": 1.0}
    fig, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(3.2 * max(1, len(panels)), 3.2), dpi=110, squeeze=False
    )
    generators = list(next(iter(result.metrics.values())))
    for ax, panel in zip(axes[0], panels, strict=False):
        if panel == "chains":
            xs = ["clean", *chains]
            for g in generators:
                ax.plot(range(len(xs)), [getattr(result.metrics[c][g], metric) for c in xs], "o-", label=g,
                        lw=2.5 if g == MEAN else 1)  # fmt: skip
            ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right", fontsize=7)
        else:
            points = sorted([(noop[panel], "clean"), *kinds[panel]], reverse=panel != "blur")
            for g in generators:
                ax.plot([s for s, _ in points], [getattr(result.metrics[c][g], metric) for _, c in points], "o-",
                        label=g, lw=2.5 if g == MEAN else 1)  # fmt: skip
            ax.set_xlabel(
                {
                    "jpeg": "JPEG quality",
                    "resize": "downscale factor",
                    "blur": "blur sigma (px)",
                    "scale": "scale factor",
                }[panel]
            )
            if panel != "blur":
                ax.invert_xaxis()  # stronger degradation to the right in every panel
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def detector_scorer(detector: Any) -> Scorer:
    """A Scorer running an ``i2p.runtime.Detector`` (its own preprocessing: what deployment runs); with the
    artifact's OOD output it also returns the uncertain flags."""

    def score(images: list[Image.Image]) -> Scored:
        rows = detector.predict(images)
        p = np.array([np.nan if r.probability is None else r.probability for r in rows])
        if detector.ood_threshold is None:
            return Scored(p)
        return Scored(p, np.array([bool(r.uncertain) for r in rows], dtype=bool))

    return score


def evaluate_artifact(
    model: str | Path,
    data: str | Path,
    conditions: Sequence[Condition],
    threshold: float | None = None,
    batch_size: int = 32,
    progress=None,
    workers: int = 2,
    **detector_options: Any,
) -> SweepResult:
    """Metrics of an exported artifact on a labelled folder/CSV under each condition, without torch.

    ``threshold`` defaults to the detector's (the manifest's, or the operating point passed in
    ``detector_options``); the deployed model file is the one ``Detector`` picks (FP16, INT8, ...).
    """
    from i2p.runtime.detector import Detector

    from .labels import discover

    samples = discover(data)
    total = len(samples) * len(conditions)
    with (
        Detector(model, batch_size=batch_size, threshold=threshold, **detector_options) as det,
        Progress(desc="evaluating", total=total, unit="img") as bar,
    ):
        result = sweep(
            samples,
            conditions,
            detector_scorer(det),
            det.threshold,
            batch_size,
            progress or bar.update,
            workers,
        )
        result.scorer = {"backend": det.backend.name, "precision": det.backend.precision}
        return result
