"""``i2p-train``: stage 1 (pick L*), stage 2 (subspace tuning), calibration, metrics, checkpoints.

The same code runs in one process or under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPU). Every epoch
ends with an atomic checkpoint that holds everything a resumed run needs (optimizer, schedule, epoch),
and augmentation/shuffling depend only on (seed, epoch, index), so ``--resume`` after a kill reaches
the same final metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from i2p.base.files import write_json_atomic

from . import data as data_mod
from . import importance, subspace
from .backbone import load_backbone, preprocess_spec
from .checkpoint import (
    CheckpointError,
    backbone_info,
    build_model,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .metrics import Metrics, calibrate_threshold, evaluate, metrics_table
from .model import I2PModel

log = logging.getLogger("i2p")
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class Runtime:
    """Where this process runs: device and DDP rank/world size (world 1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> Runtime:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Runtime(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank(), dist.get_world_size())


def say(rt: Runtime, msg: str) -> None:
    if rt.main:
        tqdm.write(msg)


def progress(rt: Runtime, iterable, **kw):
    return tqdm(iterable, disable=not rt.main or not os.isatty(2), leave=False, dynamic_ncols=True, **kw)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Splits:
    train: list[data_mod.Sample]
    val: list[data_mod.Sample]
    skipped: list[tuple[data_mod.Sample, str]]


def load_splits(cfg: TrainConfig, max_pixels: int, rt: Runtime) -> Splits:
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


def eval_loader(samples: list[data_mod.Sample], spec, cfg: TrainConfig) -> DataLoader:
    ds = data_mod.ImageDataset(samples, spec)
    return DataLoader(
        ds, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=data_mod.collate_skip_bad
    )


def labelled_batches(loader: DataLoader):
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
    spec,
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


# ---------------------------------------------------------------------------------------------- model


def perceive(cfg: TrainConfig, tower, spec, splits: Splits, rt: Runtime):
    """Stage 1: per-block CLS features on calibration/validation subsets -> (profile, probe at L*)."""
    calib = calibration_subset(splits.train, cfg.calib_size, cfg.seed)
    val = calibration_subset(splits.val, cfg.calib_size, cfg.seed)
    say(
        rt,
        f"stage 1: scoring {len(tower.transformer.resblocks)} layers on {len(calib)} calibration / {len(val)} validation images",
    )
    xc = importance.block_cls_features(tower, labelled_batches(eval_loader(calib, spec, cfg)), rt.device)
    xv = importance.block_cls_features(tower, labelled_batches(eval_loader(val, spec, cfg)), rt.device)
    return importance.profile(xc, xv, cfg.layer, cfg.layer_tolerance)


def profile_layers(cfg: TrainConfig) -> importance.ImportanceProfile:
    """``i2p layers``: stage 1 alone."""
    rt = setup(cfg)
    tower, info = load_backbone(cfg.model, cfg.pretrained, cfg.seed)
    return perceive(
        cfg, tower.to(rt.device), info.preprocess, load_splits(cfg, info.preprocess.max_pixels, rt), rt
    )[0]


def build(
    cfg: TrainConfig, splits: Splits, rt: Runtime
) -> tuple[I2PModel, Any, importance.ImportanceProfile | None, dict]:
    """Stage 1 and the model: (model with deltas, backbone info, importance profile, embedded base)."""
    tower, info = load_backbone(cfg.model, cfg.pretrained, cfg.seed)
    tower.to(rt.device)
    profile, probe = None, None
    if cfg.baseline:
        layer = len(tower.transformer.resblocks)
    else:
        profile, probe = perceive(cfg, tower, info.preprocess, splits, rt)
        layer = profile.layer
    model = I2PModel(tower, layer, baseline=cfg.baseline).to(rt.device)
    base = dict(model.tower.state_dict()) if (cfg.embed_base or info.pretrained == "none") else {}
    if probe is not None:  # warm start: the head begins as the layer-L* linear probe
        with torch.no_grad():
            model.head.fc.weight.copy_(probe.weight)
            model.head.fc.bias.copy_(probe.bias)
    if cfg.rank:
        grad_sq = (
            fisher_statistics(model, splits, info.preprocess, cfg, rt)
            if cfg.sensitivity == "fisher"
            else None
        )
        model.add_deltas(subspace.choose_bases(model.blocks, cfg.rank, grad_sq))
        model.to(rt.device)
    return model, info, profile, base


def evaluate_checkpoint(
    ckpt: str, data: str, backbone: str | None, threshold: float | None, options: dict[str, Any]
) -> tuple[dict[str, Metrics], float]:
    """``i2p eval``: metrics at the checkpoint's calibrated threshold (or the one given)."""
    model, meta = load_model(ckpt, backbone)
    cfg = TrainConfig(data=data, **options)
    rt = setup(cfg)
    model.to(rt.device)
    samples = data_mod.discover(data)
    spec = backbone_info(meta).preprocess
    samples, bad = data_mod.scan(samples, spec.max_pixels, progress=True)
    for _s, reason in bad:
        say(rt, f"skipped {reason}")
    return evaluate_samples(
        model, samples, spec, cfg, rt, meta["threshold"] if threshold is None else threshold
    )


def fisher_statistics(
    model: I2PModel, splits: Splits, spec, cfg: TrainConfig, rt: Runtime
) -> dict[str, torch.Tensor]:
    """E[(u_iᵀ G v_i)²] per singular direction of every adapted map, from loss gradients on training data."""
    weights = {name: getattr(m, attr) for name, m, attr in subspace.adapted_weights(model.blocks)}
    for w in weights.values():
        w.requires_grad_(True)
    sums = {name: 0.0 for name in weights}
    batches = 0
    for x, y in labelled_batches(
        eval_loader(calibration_subset(splits.train, cfg.calib_size, cfg.seed), spec, cfg)
    ):
        model.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(x.to(rt.device)), y.to(rt.device)).backward()
        for name, w in weights.items():
            sums[name] = sums[name] + subspace.projected_grad_sq(w, w.grad)
        batches += 1
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    model.head.zero_grad(set_to_none=True)
    return {name: s / max(batches, 1) for name, s in sums.items()}


def batch_is_empty(n: int, rt: Runtime) -> bool:
    """Skip a step on every rank together: one rank skipping alone would hang DDP's all-reduce."""
    if rt.world == 1:
        return n == 0
    flag = torch.tensor([float(n == 0)], device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def cosine_with_warmup(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


# ---------------------------------------------------------------------------------------------- state


def resume_state(
    optimizer: torch.optim.Optimizer, scheduler, epoch: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer moments as tensors and the small rest as JSON: everything a resume needs, no pickle."""
    tensors, steps = {}, {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if key == "step":
                steps[str(idx)] = float(value)
            else:
                tensors[f"optim.{idx}.{key}"] = value
    return tensors, {"epoch": epoch, "scheduler": scheduler.state_dict(), "optimizer_steps": steps}


def restore_state(
    optimizer: torch.optim.Optimizer, scheduler, tensors: dict[str, torch.Tensor], meta: dict
) -> int:
    sd = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("resume.optim."):
            idx, name = key[len("resume.optim.") :].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for idx, step in meta["optimizer_steps"].items():
        state.setdefault(int(idx), {})["step"] = torch.tensor(step)
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # the scheduler's state does not carry the optimizer's current rate
    return meta["epoch"] + 1


# ---------------------------------------------------------------------------------------------- run


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns the final metadata (also in checkpoint and metrics.json)."""
    rt = setup(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    previous = None
    if resume:
        previous = read_checkpoint(ckpt_path)
        stored = TrainConfig.from_dict(previous[0]["config"])
        changed = [k for k in TrainConfig.IDENTITY if getattr(stored, k) != getattr(cfg, k)]
        if changed:
            raise CheckpointError(
                f"{ckpt_path}: --resume with different settings {changed}; use the original ones"
            )
        if previous[0].get("complete"):
            say(
                rt,
                f"{ckpt_path}: training already complete ({previous[0]['epoch'] + 1} epochs); nothing to resume",
            )
            return previous[0]
    elif rt.main and ckpt_path.exists():
        raise FileExistsError(
            f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out"
        )
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    spec = preprocess_spec(cfg.model)
    splits = load_splits(cfg, spec.max_pixels, rt)
    counts = data_mod.class_counts(splits.train)
    say(
        rt,
        f"data: {len(splits.train)} train / {len(splits.val)} val images, {len(counts)} generator(s), {len(splits.skipped)} skipped",
    )

    if previous is None:
        model, info, profile, base = build(cfg, splits, rt)
    else:
        model = build_model(*previous, name=str(ckpt_path))  # the checkpoint is read once
        model.to(rt.device)
        info = backbone_info(previous[0])
        profile = (
            importance.ImportanceProfile.from_dict(previous[0]["importance"])
            if previous[0]["importance"]
            else None
        )
        base = {k[len("base.") :]: v for k, v in previous[1].items() if k.startswith("base.")}
    if profile is not None and rt.main and previous is None:
        profile.save(out)
        say(rt, importance_table(profile))
    trainable, total = model.parameter_counts()
    say(
        rt,
        f"L* = {model.layer}/{model.num_layers}; trainable parameters {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)",
    )

    train_ds = data_mod.ImageDataset(splits.train, spec, cfg.augment, cfg.seed)
    sampler = DistributedSampler(train_ds, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=cfg.seed)
    per_rank = max(1, cfg.batch_size // rt.world)
    loader = DataLoader(
        train_ds,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=data_mod.collate_skip_bad,
        drop_last=len(sampler) > per_rank,
    )
    steps_per_epoch = (
        len(loader) if not cfg.max_steps_per_epoch else min(len(loader), cfg.max_steps_per_epoch)
    )
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, max(1, int(cfg.warmup_fraction * total_steps)))
    )
    start_epoch = 0 if previous is None else restore_state(optimizer, scheduler, previous[1], previous[0])
    net = DistributedDataParallel(model) if rt.world > 1 else model
    amp = cfg.amp and rt.device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    meta: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        model.tower.eval()  # frozen tower: keep any dropout/patch-dropout off
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        losses = []
        bar = progress(rt, loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            for bad in batch.bad:
                say(rt, f"skipped {bad.path}: {bad.reason}")
            x, y = batch.images.to(rt.device), batch.labels.to(rt.device)
            if batch_is_empty(len(y), rt):  # every file of this batch (on some rank) was unreadable
                scheduler.step()
                continue
            with torch.autocast(rt.device.type, dtype=amp_dtype, enabled=amp):
                loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")

        if rt.main:
            metrics, threshold = evaluate_samples(model, splits.val, spec, cfg, rt, None)
            meta = {
                "config": cfg.to_dict(),
                "backbone": info,
                "layer": model.layer,
                "num_layers": model.num_layers,
                "baseline": cfg.baseline,
                "importance": profile.to_dict() if profile else None,
                "preprocess": spec.to_dict(),
                "threshold": threshold,
                "metrics": {"val": {g: m.to_dict() for g, m in metrics.items()}},
                "parameters": {"trainable": trainable, "total": total},
                "train_loss": float(np.mean(losses)) if losses else None,
                "complete": epoch == cfg.epochs - 1,
                "wall_time_s": time.time() - t0 + (previous[0].get("wall_time_s", 0.0) if previous else 0.0),
                "versions": {"torch": torch.__version__},
            }
            tensors, rest = resume_state(optimizer, scheduler, epoch)
            save_checkpoint(ckpt_path, model, {**meta, **rest}, resume=tensors, base=base)
            say(
                rt,
                f"epoch {epoch + 1}/{cfg.epochs}: loss {meta['train_loss'] or float('nan'):.4f}, "
                f"val mean AUC {metrics['mean'].auc:.4f}, acc {metrics['mean'].acc:.4f} at threshold {threshold:.3f}",
            )
        if rt.world > 1:
            dist.barrier()

    if rt.main:
        say(rt, "validation metrics (threshold calibrated on validation):\n" + metrics_table(metrics))
        write_json_atomic(
            out / "metrics.json",
            json.dumps(
                meta["metrics"]
                | {
                    "threshold": meta["threshold"],
                    "layer": meta["layer"],
                    "num_layers": meta["num_layers"],
                    "parameters": meta["parameters"],
                    "wall_time_s": meta["wall_time_s"],
                },
                indent=2,
            ),
        )
        say(rt, f"wrote {ckpt_path} ({ckpt_path.stat().st_size / 1e6:.1f} MB) in {meta['wall_time_s']:.0f} s")
    if rt.world > 1:
        dist.destroy_process_group()
    return meta


def importance_table(p: importance.ImportanceProfile) -> str:
    from i2p.base.tables import format_table

    rows = [
        {
            "layer": s.layer,
            "probe_auc": s.probe_auc,
            "probe_loss": s.probe_loss,
            "fisher": s.fisher,
            "importance": s.importance,
            "": "<- L*" if s.layer == p.layer else "",
        }
        for s in p.scores
    ]
    return format_table(rows)
