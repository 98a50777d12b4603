"""Data splits, evaluation loaders and metrics of a model on labelled images (validation and ``i2p eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from i2p.runtime.preprocess import PreprocessSpec

from . import data as data_mod
from .checkpoint import load_model
from .config import TrainConfig
from .distributed import Runtime, progress, say, setup
from .metrics import Metrics, calibrate_threshold, evaluate
from .model import I2PModel


@dataclass
class Splits:
    train: list[data_mod.Sample]
    val: list[data_mod.Sample]
    skipped: list[tuple[data_mod.Sample, str]]


def load_splits(cfg: TrainConfig, max_pixels: int, rt: Runtime) -> Splits:
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


def eval_loader(samples: list[data_mod.Sample], spec: PreprocessSpec, cfg: TrainConfig) -> DataLoader:
    ds = data_mod.ImageDataset(samples, spec)
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
    model: I2PModel, loader: DataLoader, rt: Runtime, desc: str = "evaluating"
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, dataset indices) for every decodable image of ``loader``."""
    model.eval()
    probs, indices = [], []
    for batch in progress(rt, loader, desc=desc, unit="batch"):
        if len(batch.labels):
            probs.append(torch.sigmoid(model(batch.images.to(rt.device)).float()).cpu())
            indices.append(batch.indices)
    return torch.cat(probs).numpy(), torch.cat(indices).numpy()


def evaluate_samples(
    model: I2PModel,
    samples: list[data_mod.Sample],
    spec: PreprocessSpec,
    cfg: TrainConfig,
    rt: Runtime,
    threshold: float | None,
) -> tuple[dict[str, Metrics], float]:
    """Metrics per generator and mean; the threshold is calibrated on these samples when None."""
    probs, idx = predict(model, eval_loader(samples, spec, cfg), rt)
    y = np.array([samples[i].label for i in idx])
    if threshold is None:
        threshold = calibrate_threshold(y, probs)
    return evaluate(y, probs, [samples[i].generator for i in idx], threshold), threshold


def evaluate_checkpoint(
    ckpt: str, data: str, backbone: str | None, threshold: float | None, options: dict[str, Any]
) -> tuple[dict[str, Metrics], float]:
    """``i2p eval``: metrics at the checkpoint's calibrated threshold (or the one given)."""
    model, meta = load_model(ckpt, backbone)
    cfg = TrainConfig(data=data, **options)
    rt = setup(cfg.device)
    model.to(rt.device)
    samples, bad = data_mod.scan(data_mod.discover(data), meta.preprocess.max_pixels, progress=True)
    for _s, reason in bad:
        say(rt, f"skipped {reason}")
    if threshold is None:
        threshold = meta.threshold
    return evaluate_samples(model, samples, meta.preprocess, cfg, rt, threshold)
