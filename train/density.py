"""The out-of-distribution score: a Gaussian density of the training images' layer-L* features.

Fitted once, at the end of training, on the feature the head's linear layer reads (the pooled layer-L*
token after the head's LayerNorm): one mean per class (real, fake) and one covariance shared by both
(Mahalanobis OOD, Lee et al. 2018), shrunk toward a scaled identity with the Ledoit-Wolf weight so that
a few thousand images pin down a 768-wide covariance. The score of a feature x is

    ood(x) = min_c (x - mu_c)^T S^-1 (x - mu_c) / D

(D the feature width: about 1 for an image like the training ones). With S = L L^T (Cholesky) and
W = L^-1 / sqrt(D), ood(x) = min_c ||W x - W mu_c||^2: one matrix product per image, which is how the
exported graph computes it (``i2p.export.ood_head``). The checkpoint stores W and the projected means
(``ood.whiten``, ``ood.centers``) and, in its metadata, the threshold: the score's 95th percentile on the
validation images (``i2p.runtime.schema.OodSpec``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from i2p.runtime.preprocess import PreprocessSpec
from i2p.runtime.schema import OodSpec, SchemaError

from . import data as data_mod
from . import features as features_mod
from .checkpoint import Checkpoint
from .checkpoint_scoring import calibration_subset
from .config import TrainConfig
from .distributed import Placement, say
from .metadata import CheckpointError
from .model import I2PModel

PREFIX = "ood."  # checkpoint tensors: ood.whiten [D, D] (applied as x @ whiten.T), ood.centers [C, D]
QUANTILE = 0.95
MAX_FIT_IMAGES = 4096  # a full run's extra feature pass over the training images stops here


@dataclass(frozen=True)
class Density:
    """W (whitening, scaled by 1/sqrt(D)) and the whitened class means: all the score needs."""

    whiten: torch.Tensor  # [D, D] float32, lower triangular
    centers: torch.Tensor  # [C, D] float32, W mu_c
    shrinkage: float
    n_fit: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}whiten": self.whiten, f"{PREFIX}centers": self.centers}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], spec: OodSpec) -> Density:
        return cls(tensors[f"{PREFIX}whiten"], tensors[f"{PREFIX}centers"], spec.shrinkage, spec.n_fit)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """ood [N] of head-normalized features [N, D]: the same arithmetic as the exported graph."""
        y = features.float() @ self.whiten.T
        d = y[:, None, :] - self.centers[None]
        return (d * d).sum(-1).amin(-1)


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(covariance, shrinkage) of centred rows ``x`` [N, D]: (1 - a) S + a (tr S / D) I, a by Ledoit-Wolf 2004."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d  # squared distance of S to the target, per dimension
    x2 = x**2
    beta = np.sum(x2.T @ x2 / n - s**2) / (d * n)  # the variance of S's entries, estimated from the rows
    a = 0.0 if delta == 0 else float(min(max(beta / delta, 0.0), 1.0))
    return (1 - a) * s + a * mu * np.eye(d), a


def fit(features: torch.Tensor, labels: torch.Tensor) -> Density:
    """The density of head-normalized training features [N, D] with labels [N] (0 real, 1 fake)."""
    x = features.double().cpu().numpy()
    y = labels.cpu().numpy().astype(np.int64)
    classes = sorted(set(y.tolist()))
    if len(x) < 2 or not classes:
        raise ValueError(f"the OOD density needs at least 2 training features, got {len(x)}")
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    cov, shrinkage = ledoit_wolf(centred)
    d = x.shape[1]
    chol = np.linalg.cholesky(cov + 1e-12 * np.trace(cov) / d * np.eye(d))
    whiten = np.linalg.solve(chol, np.eye(d)) / np.sqrt(d)  # L^-1 / sqrt(D): lower triangular
    return Density(
        torch.from_numpy(whiten).float(),
        torch.from_numpy(means @ whiten.T).float(),
        shrinkage,
        len(x),
    )


def calibrate(density: Density, val_features: torch.Tensor, quantile: float = QUANTILE) -> OodSpec:
    """The spec whose threshold is the ``quantile`` of the score on the validation features."""
    scores = density.score(val_features).double().numpy()
    threshold = float(np.quantile(scores, quantile)) if len(scores) else float("inf")
    if not np.isfinite(threshold):
        raise ValueError("the OOD threshold needs at least one validation image with a finite score")
    return OodSpec(threshold, quantile, density.n_fit, len(scores), density.shrinkage)


def stored(ckpt: Checkpoint) -> Density | None:
    """The checkpoint's density, or None (trained before the OOD score); CheckpointError if it is malformed."""
    tensors, spec = ckpt.section(PREFIX), ckpt.meta.ood
    if not tensors and spec is None:
        return None
    width = ckpt.meta.backbone.width
    whiten, centers = tensors.get("whiten"), tensors.get("centers")
    ok = (
        spec is not None
        and set(tensors) == {"whiten", "centers"}
        and tuple(whiten.shape) == (width, width)
        and centers.dim() == 2
        and 1 <= centers.shape[0] <= 2
        and centers.shape[1] == width
    )
    if not ok:
        held = {k: tuple(v.shape) for k, v in tensors.items()}
        raise CheckpointError(
            f"{ckpt.path}: the OOD density is malformed: metadata 'ood' {'present' if spec else 'absent'}, "
            f"tensors {held}; expected ood.whiten [{width}, {width}] and ood.centers [1 or 2, {width}]"
        )
    return Density.from_tensors({f"{PREFIX}{k}": v.float() for k, v in tensors.items()}, spec)


@torch.no_grad()
def head_features(model: I2PModel, values: torch.Tensor) -> torch.Tensor:
    """The head's LayerNorm of tower features [N, D]: what the density models."""
    norm = model.head.norm
    device = next(norm.parameters()).device
    return torch.cat(
        [norm(values[i : i + 4096].to(device)).float().cpu() for i in range(0, len(values), 4096)]
    )


def fit_run(
    model: I2PModel,
    train: list[data_mod.Sample],
    val: list[data_mod.Sample],
    spec: PreprocessSpec,
    cfg: TrainConfig,
    device: torch.device,
    cached: features_mod.Features | None = None,
    cached_val: features_mod.Features | None = None,
) -> tuple[Density, OodSpec]:
    """Fit on the training features (``cached``: a head-only run's last view; else one extra pass over up to
    MAX_FIT_IMAGES training images) and take the threshold on the validation images (``cached_val``: a
    head-only run's validation features; else one pass)."""
    started, rt = time.time(), Placement(device)
    if cached is None:
        train = calibration_subset(train, MAX_FIT_IMAGES, cfg.seed)
        cached = features_mod.extract(
            model, data_mod.ImageDataset(train, spec), cfg, rt, "OOD density: training features"
        )
    keep = [i for i in range(len(train)) if i not in cached.bad]
    labels = torch.tensor([train[i].label for i in keep])
    density = fit(head_features(model, cached.values[keep]), labels)
    found = cached_val or features_mod.extract(
        model, data_mod.ImageDataset(val, spec), cfg, rt, "OOD density: validation"
    )
    val_keep = [i for i in range(len(val)) if i not in found.bad]
    try:
        ood = calibrate(density, head_features(model, found.values[val_keep]))
    except (ValueError, SchemaError) as e:
        raise ValueError(f"OOD density: {e}") from e
    say(
        rt,
        f"OOD density: {density.n_fit} training / {ood.n_val} validation features, Ledoit-Wolf shrinkage "
        f"{density.shrinkage:.3f}, threshold {ood.threshold:.3f} (validation {ood.quantile:.0%}) "
        f"in {time.time() - started:.1f} s",
    )
    return density, ood
