"""Head-only training on cached features: the frozen tower runs once per image per view, not every epoch.

When nothing in the tower trains (``--baseline``, or ``--rank 0`` with the subspace/lora adapter), the
tower's output for an image depends only on its pixels, and those depend only on (seed, epoch, index)
(``data.ImageDataset``). So the tower's features are extracted once, under ``torch.inference_mode``, and
the head trains on them with the same sampler, batches, optimizer, schedule and loss as before.

Views: epoch ``e`` trains on view ``e mod --feature-views``, where view ``v`` is exactly the augmentation
``ImageDataset`` draws for epoch ``v``. ``--feature-views`` >= ``--epochs`` reproduces per-epoch
augmentation (and its cost); the default 1 extracts one augmented view and reuses it every epoch.
Validation images are not augmented: their features are extracted once, on the first validation.
A view covers every training image, even when ``--max-steps-per-epoch`` caps the steps.

Under DDP every rank needs every training feature (``DistributedSampler`` reshuffles each epoch): rank r
extracts images r, r + world, ... and the shards are all-gathered. Validation runs on rank 0 alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from . import data as data_mod
from .config import TrainConfig
from .distributed import Placement, progress, say
from .model import I2PModel


def frozen_tower(model: I2PModel) -> bool:
    """True when only the head trains: the tower's features can be cached (not so with --adapter full)."""
    return not any(p.requires_grad for p in model.tower.parameters())


def amp_dtype(cfg: TrainConfig, rt: Placement) -> torch.dtype | None:
    """The autocast dtype of training (mixed precision on CUDA only), None for plain FP32."""
    if not (cfg.amp and rt.device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class Features:
    """One pass of the tower over a dataset: a row per image (zeros where it failed) and the failures."""

    values: torch.Tensor  # float32 [N, D] on the CPU
    bad: dict[int, str]  # dataset index -> why the image could not be decoded


def extract(
    model: I2PModel,
    images: data_mod.ImageDataset,
    cfg: TrainConfig,
    rt: Placement,
    desc: str,
    dtype: torch.dtype | None = None,
) -> Features:
    """The tower's features of every image of ``images`` (at its current epoch), in eval-size batches.

    ``dtype``: autocast, as training runs the tower on CUDA. Under DDP each rank runs its strided share
    and every rank receives all rows.
    """
    started = time.time()
    n, width = len(images), model.head.norm.normalized_shape[0]
    mine = list(range(rt.rank, n, rt.world))
    loader = DataLoader(
        Subset(images, mine),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=data_mod.collate_skip_bad,
    )
    parts, bad = [], {}
    model.tower.eval()
    with torch.inference_mode(), torch.autocast(rt.device.type, dtype=dtype, enabled=dtype is not None):
        for batch in progress(rt, loader, desc=desc, unit="batch"):
            bad.update({b.index: b.reason for b in batch.bad})
            if len(batch.labels):
                feats = model.forward_features(batch.images.to(rt.device)).float().cpu()
                parts.append((batch.indices, feats))
    values = torch.zeros(n, width)  # a normal tensor: the head's backward may save its rows
    for indices, feats in parts:
        values[indices] = feats.clone()
    if rt.world > 1:
        values, bad = _all_gather(values, bad, rt)
    say(rt, f"{desc}: {n} images in {time.time() - started:.1f} s")
    return Features(values, bad)


def _all_gather(
    values: torch.Tensor, bad: dict[int, str], rt: Placement
) -> tuple[torch.Tensor, dict[int, str]]:
    """Every rank's strided rows (``values[r::world]`` from rank r) and failures, on every rank."""
    n, world = len(values), rt.world
    per = -(-n // world)
    local = torch.zeros(per, values.shape[1], device=rt.device)
    mine = values[rt.rank :: world]
    local[: len(mine)] = mine.to(rt.device)
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local)
    full = torch.zeros_like(values)
    for r, shard in enumerate(shards):
        full[r::world] = shard[: len(range(r, n, world))].cpu()
    merged = {int(k): v for part in _all_gather_json(rt, bad) for k, v in part.items()}
    return full, merged


def _all_gather_json(rt: Placement, value: object) -> list:
    """Each rank's JSON-serializable ``value``, in rank order (UTF-8 bytes in tensors: no pickle)."""
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=rt.device)
    size = torch.tensor([len(data)], dtype=torch.int64, device=rt.device)
    sizes = [torch.zeros_like(size) for _ in range(rt.world)]
    dist.all_gather(sizes, size)
    buf = torch.zeros(int(max(s.item() for s in sizes)), dtype=torch.uint8, device=rt.device)
    buf[: len(data)] = data
    bufs = [torch.empty_like(buf) for _ in range(rt.world)]
    dist.all_gather(bufs, buf)
    return [
        json.loads(bytes(b[: int(s.item())].cpu().tolist()).decode())
        for b, s in zip(bufs, sizes, strict=True)
    ]


class FeatureDataset(Dataset):
    """The training set as cached tower features, a drop-in for ``ImageDataset`` in the training loop.

    Items are (feature row, label, index), or the ``BadSample`` the image gave, so batches, skipped-file
    messages and all-bad-batch handling are those of the image path. ``set_epoch`` extracts the epoch's
    view when no earlier epoch did, and forgets a view no later epoch reads.
    """

    def __init__(
        self, model: I2PModel, images: data_mod.ImageDataset, cfg: TrainConfig, rt: Placement
    ) -> None:
        self.model, self.images, self.cfg, self.rt = model, images, cfg, rt
        self.views: dict[int, Features] = {}
        self.current = Features(torch.empty(0), {})

    def set_epoch(self, epoch: int) -> None:
        n_views = self.cfg.feature_views
        view = epoch % n_views
        if view not in self.views:
            self.images.set_epoch(view)  # view v is the augmentation of epoch v
            desc = f"features: view {view + 1}/{n_views}"
            dtype = amp_dtype(self.cfg, self.rt)
            self.views[view] = extract(self.model, self.images, self.cfg, self.rt, desc, dtype)
        self.current = self.views[view]
        if epoch + n_views >= self.cfg.epochs:  # the next epoch reading this view would be epoch + n_views
            del self.views[view]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | data_mod.BadSample:
        sample = self.images.samples[index]
        if index in self.current.bad:
            return data_mod.BadSample(index, sample.path, self.current.bad[index])
        return self.current.values[index], sample.label, index


class ValidationFeatures:
    """The validation images' tower features, extracted once on first use: every epoch's validation and the
    OOD density's threshold read the same ones.

    Used on rank 0 only (validation is rank 0's), so the extraction is not sharded.
    """

    def __init__(
        self, model: I2PModel, images: data_mod.ImageDataset, cfg: TrainConfig, device: torch.device
    ) -> None:
        self.model, self.images, self.cfg, self.device = model, images, cfg, device
        self._features: Features | None = None

    def features(self) -> Features:
        if self._features is None:
            rt = Placement(self.device)
            self._features = extract(self.model, self.images, self.cfg, rt, "features: validation")
        return self._features

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, indices) of the current head on the readable validation images."""
        features = self.features()
        idx = np.array([i for i in range(len(self.images)) if i not in features.bad], dtype=np.int64)
        self.model.head.eval()
        with torch.inference_mode():
            logits = self.model.forward_head(features.values[idx].to(self.device)).float()
        return torch.sigmoid(logits).cpu().numpy(), idx
