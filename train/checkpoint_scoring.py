"""Data splits, evaluation loaders and metrics of a model on labelled images (validation and ``i2p eval``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from i2p.evaluation.metrics import (
    DEFAULT_TARGETS,
    Metrics,
    OperatingPoint,
    evaluate,
    operating_points,
    point_name,
)
from i2p.evaluation.perturb import CLEAN, Condition
from i2p.evaluation.robustness import Scorer, SweepResult, sweep
from i2p.runtime.preprocess import PreprocessSpec, preprocess

from . import data as data_mod
from .checkpoint import load_model, unfinished_run_warning
from .config import TrainConfig
from .distributed import Placement, progress, say, setup
from .metadata import CheckpointMeta
from .model import I2PModel


@dataclass
class Splits:
    train: list[data_mod.Sample]
    val: list[data_mod.Sample]
    skipped: list[tuple[data_mod.Sample, str]]


def load_splits(cfg: TrainConfig, max_pixels: int, rt: Placement) -> Splits:
    """Training and validation samples (a stratified split of ``--data`` without ``--val``), unreadable ones skipped."""
    samples = data_mod.discover(cfg.data)
    if cfg.val:
        train, val = samples, data_mod.discover(cfg.val)
    else:
        train, val = data_mod.split(samples, cfg.val_fraction, cfg.seed)
    train, bad_train = data_mod.scan(train, max_pixels, progress=rt.main)
    val, bad_val = data_mod.scan(val, max_pixels, progress=rt.main)
    skipped = bad_train + bad_val
    for _s, reason in skipped:
        say(rt, f"skipped {reason}")
    if not train or not val:
        raise ValueError(f"{cfg.data}: no readable images left for training or validation")
    return Splits(train, val, skipped)


def calibration_subset(samples: list[data_mod.Sample], n: int, seed: int) -> list[data_mod.Sample]:
    """Up to ``n`` samples drawn at random (by seed), kept in their original order."""
    if len(samples) <= n:
        return samples
    keep = np.sort(np.random.default_rng(seed).permutation(len(samples))[:n])
    return [samples[i] for i in keep]


def eval_loader(
    samples: list[data_mod.Sample], spec: PreprocessSpec, cfg: TrainConfig, condition: Condition | None = None
) -> DataLoader:
    """Evaluation batches as deployed, after ``condition`` (a robustness degradation) when given."""
    ds = data_mod.ImageDataset(samples, spec, condition=condition)
    return DataLoader(
        ds, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=data_mod.collate_skip_bad
    )


def labelled_batches(loader: DataLoader):
    """(images, labels) of every batch that kept at least one readable image."""
    for batch in loader:
        if len(batch.labels):
            yield batch.images, batch.labels


@torch.no_grad()
def predict(
    model: I2PModel, loader: DataLoader, rt: Placement, desc: str = "evaluating"
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, dataset indices) for every decodable image of ``loader``."""
    model.eval()
    probs, indices = [], []
    for batch in progress(rt, loader, desc=desc, unit="batch"):
        if len(batch.labels):
            probs.append(torch.sigmoid(model(batch.images.to(rt.device)).float()).cpu())
            indices.append(batch.indices)
    if not probs:  # say so, rather than torch's "expected a non-empty list of Tensors"
        n = len(loader.dataset)
        raise data_mod.DataError(f"{desc}: no image could be read ({n} listed, every one failed to decode)")
    return torch.cat(probs).numpy(), torch.cat(indices).numpy()


def validate(
    model: I2PModel,
    samples: list[data_mod.Sample],
    spec: PreprocessSpec,
    cfg: TrainConfig,
    rt: Placement,
    scores: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, Metrics], dict[str, OperatingPoint], str]:
    """Validation metrics at the chosen operating point, every named point, and the chosen name.

    Points: "balanced" (max balanced accuracy), "fpr_1pct", "fpr_5pct" (most fakes caught with at
    most 1% / 5% of validation reals called fake) and the ``--target-fpr`` one; the threshold in use
    is ``--target-fpr``'s when given, else "balanced". ``scores``: (probabilities, indices) already
    computed (a head-only run's cached validation features); else the model runs on the images.
    """
    probs, idx = (
        scores
        if scores is not None
        else predict(model, eval_loader(samples, spec, cfg), rt, desc="validation split")
    )
    y = np.array([samples[i].label for i in idx])
    targets = sorted({*DEFAULT_TARGETS, *([cfg.target_fpr] if cfg.target_fpr is not None else [])})
    points = operating_points(y, probs, targets)
    chosen = point_name(cfg.target_fpr)
    metrics = evaluate(y, probs, [samples[i].generator for i in idx], points[chosen].threshold)
    return metrics, points, chosen


def checkpoint_scorer(model: I2PModel, spec: PreprocessSpec, device: torch.device) -> Scorer:
    """A robustness-sweep Scorer running the PyTorch detector on decoded images (runtime preprocessing)."""

    @torch.no_grad()
    def score(images: list[Image.Image]) -> np.ndarray:
        x = torch.from_numpy(np.stack([preprocess(img, spec) for img in images])).to(device)
        return torch.sigmoid(model(x).float()).cpu().numpy()

    return score


def checkpoint_threshold(meta: CheckpointMeta, operating_point: str | None, path: str) -> float:
    """The checkpoint's threshold, or the one of a named operating point it stores."""
    if operating_point is None:
        if meta.threshold is None:
            raise ValueError(f"{path}: no calibrated threshold yet (training did not finish an epoch)")
        return meta.threshold
    points = meta.operating_points or {}
    if operating_point not in points:
        known = ", ".join(sorted(points)) or "none (trained before operating points)"
        raise ValueError(f"{path}: no operating point {operating_point!r}; the checkpoint has: {known}")
    return points[operating_point].threshold


def evaluate_checkpoint(
    ckpt: str,
    data: str,
    backbone: str | None,
    threshold: float | None,
    options: dict[str, Any],
    conditions: Sequence[Condition] = (CLEAN,),
    operating_point: str | None = None,
) -> SweepResult:
    """``i2p eval --ckpt``: metrics under each condition at the checkpoint's threshold (or the one given)."""
    model, meta = load_model(ckpt, backbone)
    if warning := unfinished_run_warning(ckpt, meta):
        print(warning, file=sys.stderr, flush=True)  # stderr: --json keeps stdout for the JSON
    cfg = TrainConfig(data=data, **options)
    rt = setup(cfg.device)
    model.to(rt.device).eval()
    samples, bad = data_mod.scan(data_mod.discover(data), meta.preprocess.max_pixels, progress=True)
    for _s, reason in bad:
        say(rt, f"skipped {reason}")
    if threshold is None:
        threshold = checkpoint_threshold(meta, operating_point, ckpt)
    scorer = checkpoint_scorer(model, meta.preprocess, rt.device)
    with progress(rt, None, total=len(samples) * len(conditions), desc="evaluating", unit="img") as bar:
        return sweep(samples, conditions, scorer, threshold, cfg.batch_size, bar.update, cfg.workers)
