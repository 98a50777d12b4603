"""``i2p-train``: stage 1 (pick L*), stage 2 (subspace tuning), calibration, metrics, checkpoints.

Every epoch ends with an atomic checkpoint that holds everything a resumed run needs (optimizer,
schedule, epoch), and augmentation/shuffling depend only on (seed, epoch, index), so ``--resume``
after a kill reaches the same final metrics as an uninterrupted run (a head-only run re-extracts its
cached features on resume). When only the head trains, the frozen tower runs once per image per view
and the head trains on cached features (see ``features``). Runs in one process or under ``torchrun``
(see ``distributed``).
"""

from __future__ import annotations

import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from i2p.base.files import write_json_atomic
from i2p.base.progress import duration
from i2p.evaluation.metrics import Metrics, metrics_table
from i2p.runtime.preprocess import PreprocessSpec

from . import data as data_mod
from . import density as density_mod
from . import features as features_mod
from .augment import parse_align
from .backbone import preprocess_spec
from .checkpoint import BASE, Checkpoint, build_model, read_checkpoint, save_checkpoint
from .checkpoint_scoring import Splits, load_splits, validate
from .config import TrainConfig
from .distributed import Placement, batch_is_empty, progress, say, setup
from .importance import ImportanceProfile, importance_table
from .metadata import BackboneInfo, CheckpointMeta
from .model import I2PModel
from .resume import check_resumable, restore_state, resume_state
from .stages import build

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class Run:
    """One training run as it goes: what it trains, where it writes, what it has measured."""

    cfg: TrainConfig
    rt: Placement
    out: Path
    spec: PreprocessSpec
    splits: Splits
    model: I2PModel
    info: BackboneInfo
    profile: ImportanceProfile | None
    base: dict[str, torch.Tensor]
    previous: Checkpoint | None
    started: float = field(
        default_factory=time.time
    )  # when `i2p-train` began: the run's time covers every stage
    stage_seconds: dict[str, float] = field(default_factory=dict)  # data, stage 1 (stage 2: the rest)
    val_features: features_mod.ValidationFeatures | None = None  # cached validation features (frozen tower)
    last_metrics: dict[str, Metrics] | None = None  # validation, of the last epoch run

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT


def cosine_with_warmup(total: int, warmup: int):
    """Learning-rate factor per step: linear warmup, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def train(cfg: TrainConfig, resume: bool = False, started: float | None = None) -> CheckpointMeta:
    """Run (or resume) training; returns the final metadata (also in the checkpoint and metrics.json).

    ``started``: when the command began (``time.time()``, before torch was imported), so that the run's
    reported time is the time a user waited.
    """
    entered = time.time()
    started = entered if started is None else started
    rt = setup(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    previous = read_checkpoint(out / CHECKPOINT) if resume else None
    if previous is not None:
        check_resumable(previous, cfg)
    if previous is not None and previous.meta.complete:
        epochs = previous.meta.resume.epoch + 1 if previous.meta.resume else cfg.epochs
        say(rt, f"{previous.path}: training already complete ({epochs} epochs); nothing to resume")
        return previous.meta
    if previous is None and rt.main and (out / CHECKPOINT).exists():
        raise FileExistsError(
            f"{out / CHECKPOINT} exists: pass --resume to continue that run, or choose another --out"
        )
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    run = _prepare(cfg, rt, out, previous, started, entered)
    meta = _fit(run)
    if rt.main:
        _finish(run, meta)
    if rt.world > 1:
        dist.destroy_process_group()
    return meta


def _prepare(
    cfg: TrainConfig, rt: Placement, out: Path, previous: Checkpoint | None, started: float, entered: float
) -> Run:
    """Data, then the model: built (stage 1 + deltas) for a new run, rebuilt from the checkpoint on resume."""
    spec = preprocess_spec(cfg.model)
    splits = load_splits(cfg, spec.max_pixels, rt)
    stage_seconds = {"start-up": entered - started, "data": time.time() - entered}
    say(
        rt,
        f"data: {len(splits.train)} train / {len(splits.val)} val images, "
        f"{len(data_mod.class_counts(splits.train))} generator(s), {len(splits.skipped)} skipped",
    )
    for line in (
        data_mod.shortcut_warnings(splits.train, cfg.align, cfg.seed, spec.max_pixels) if rt.main else ()
    ):
        say(rt, line)  # the shortcut audit (i2p audit): warns, never stops the run
    if previous is None:
        model, info, profile, base = build(cfg, splits, rt)
        stage_seconds["stage 1"] = time.time() - started - sum(stage_seconds.values())
        if profile is not None and rt.main:
            json_path, png_path = profile.save(out)
            say(rt, importance_table(profile))
            say(rt, f"wrote the layer importance profile: {json_path} and its plot {png_path}")
    else:
        model = build_model(previous)  # the checkpoint is read once
        if not cfg.baseline:  # the baseline's tower stays frozen whatever --adapter says (as in stages.build)
            model.resume_adapter(cfg.adapter)
        model.to(rt.device)
        info, base = previous.meta.backbone, previous.section(BASE)
        profile = ImportanceProfile.from_dict(previous.meta.importance) if previous.meta.importance else None
    trainable, total = model.parameter_counts()
    say(
        rt,
        f"L* = {model.layer}/{model.num_layers}; trainable parameters {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)",
    )
    return Run(cfg, rt, out, spec, splits, model, info, profile, base, previous, started, stage_seconds)


def _fit(run: Run) -> CheckpointMeta:
    """The epochs: train, then (rank 0) validate, calibrate and write the checkpoint."""
    cfg, rt, model = run.cfg, run.rt, run.model
    images = data_mod.ImageDataset(
        run.splits.train, run.spec, cfg.augment, cfg.seed, align=parse_align(cfg.align)
    )
    cached = features_mod.frozen_tower(model)  # only the head trains: it trains on cached features
    train_ds = features_mod.FeatureDataset(model, images, cfg, rt) if cached else images
    if cached:
        say(rt, f"frozen tower: the head trains on cached features ({cfg.feature_views} view(s))")
        val_images = data_mod.ImageDataset(run.splits.val, run.spec)
        run.val_features = features_mod.ValidationFeatures(model, val_images, cfg, rt.device)
    sampler = DistributedSampler(train_ds, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=cfg.seed)
    per_rank = max(1, cfg.batch_size // rt.world)
    loader = DataLoader(
        train_ds,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=0 if cached else cfg.workers,  # cached features are in memory already
        collate_fn=data_mod.collate_skip_bad,
        drop_last=len(sampler) > per_rank,
    )
    steps = len(loader) if not cfg.max_steps_per_epoch else min(len(loader), cfg.max_steps_per_epoch)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        cosine_with_warmup(steps * cfg.epochs, max(1, int(cfg.warmup_fraction * steps * cfg.epochs))),
    )
    start = 0 if run.previous is None else restore_state(optimizer, scheduler, run.previous)
    step = _Stepper(run, optimizer, scheduler, model.head if cached else model)
    meta = run.previous.meta if run.previous is not None else None
    for epoch in range(start, cfg.epochs):
        model.train()
        model.tower.eval()  # frozen tower: keep any dropout/patch-dropout off
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        losses = []
        bar = progress(rt, loader, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for i, batch in enumerate(bar):
            if i >= steps:
                break
            if (loss := step(batch)) is not None:
                losses.append(loss)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if rt.main:
            fitted = train_ds.current if cached else None  # the head-only run's features of this epoch
            meta = _end_epoch(run, epoch, losses, optimizer, scheduler, fitted)
        if rt.world > 1:
            dist.barrier()
    return meta


class _Stepper:
    """One optimization step (mixed precision on CUDA), skipped on every rank when a batch is all bad.

    ``net`` is the model on images, or its head on cached features (``features.FeatureDataset``).
    """

    def __init__(self, run: Run, optimizer: torch.optim.Optimizer, scheduler, net: torch.nn.Module) -> None:
        self.run, self.optimizer, self.scheduler = run, optimizer, scheduler
        rt = run.rt
        self.net = DistributedDataParallel(net) if rt.world > 1 else net
        dtype = features_mod.amp_dtype(run.cfg, rt)
        self.amp, self.dtype = dtype is not None, dtype or torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.dtype == torch.float16)

    def __call__(self, batch: data_mod.Batch) -> float | None:
        rt = self.run.rt
        for bad in batch.bad:
            say(rt, f"skipped {bad.path}: {bad.reason}")
        x, y = batch.images.to(rt.device), batch.labels.to(rt.device)
        if batch_is_empty(len(y), rt):  # every file of this batch (on some rank) was unreadable
            self.scheduler.step()
            return None
        with torch.autocast(rt.device.type, dtype=self.dtype, enabled=self.amp):
            loss = F.binary_cross_entropy_with_logits(self.net(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item()


def _end_epoch(
    run: Run,
    epoch: int,
    losses: list[float],
    optimizer,
    scheduler,
    train_features: features_mod.Features | None = None,
) -> CheckpointMeta:
    """Validate, calibrate the threshold, and write the checkpoint (with resume state) atomically.

    After the last epoch the OOD density is fitted too (``density.fit_run``) and stored with it.
    """
    cfg, model = run.cfg, run.model
    scores = run.val_features.scores() if run.val_features is not None else None
    metrics, points, chosen = validate(model, run.splits.val, run.spec, cfg, run.rt, scores)
    threshold = points[chosen].threshold
    trainable, total = model.parameter_counts()
    tensors, resume = resume_state(optimizer, scheduler, epoch)
    earlier = run.previous.meta.wall_time_s if run.previous is not None else 0.0
    complete = epoch == cfg.epochs - 1
    density, ood = None, None
    if complete:
        val_features = run.val_features.features() if run.val_features is not None else None
        density, ood = density_mod.fit_run(
            model,
            run.splits.train,
            run.splits.val,
            run.spec,
            cfg,
            run.rt.device,
            train_features,
            val_features,
        )
    meta = CheckpointMeta(
        backbone=run.info,
        layer=model.layer,
        num_layers=model.num_layers,
        preprocess=run.spec,
        baseline=cfg.baseline,
        threshold=threshold,
        config=cfg.to_dict(),
        importance=run.profile.to_dict() if run.profile else None,
        metrics={"val": {g: m.to_dict() for g, m in metrics.items()}},
        parameters={"trainable": trainable, "total": total},
        train_loss=float(np.mean(losses)) if losses else None,
        complete=complete,
        wall_time_s=time.time() - run.started + earlier,
        versions={"torch": torch.__version__},
        resume=resume,
        operating_points=points,
        operating_point=chosen,
        ood=ood,
    )
    save_checkpoint(
        run.checkpoint, model, meta, resume=tensors, base=run.base, ood=density.tensors() if density else None
    )
    say(
        run.rt,
        f"epoch {epoch + 1}/{cfg.epochs}: loss {meta.train_loss or float('nan'):.4f}, "
        f"val mean AUC {metrics['mean'].auc:.4f}, acc {metrics['mean'].acc:.4f} at threshold {threshold:.3f} ({chosen})",
    )
    run.last_metrics = metrics
    return meta


def _finish(run: Run, meta: CheckpointMeta) -> None:
    """The validation table, metrics.json, and where the checkpoint went."""
    if run.last_metrics is not None:
        say(
            run.rt,
            "validation metrics (threshold calibrated on validation):\n" + metrics_table(run.last_metrics),
        )
    summary = {
        "threshold": meta.threshold,
        "operating_point": meta.operating_point,
        "operating_points": {name: p.to_dict() for name, p in (meta.operating_points or {}).items()},
        "layer": meta.layer,
        "num_layers": meta.num_layers,
        "parameters": meta.parameters,
        "wall_time_s": meta.wall_time_s,
    }
    write_json_atomic(run.out / "metrics.json", (meta.metrics or {}) | summary)
    size = run.checkpoint.stat().st_size / 1e6
    elapsed = time.time() - run.started
    stages = run.stage_seconds | {"stage 2": elapsed - sum(run.stage_seconds.values())}
    split = ", ".join(f"{name} {duration(seconds)}" for name, seconds in stages.items())
    say(run.rt, f"wrote {run.checkpoint} ({size:.1f} MB); this run took {duration(elapsed)} ({split})")
    say(
        run.rt,
        f"next: i2p-export --ckpt {shlex.quote(str(run.checkpoint))} --fp16 --out {shlex.quote(str(run.out / 'detector.i2p'))}",
    )
