"""Stage 1 (score every block, pick L*) and the model stage 2 trains: truncated tower, subspace deltas, head.

Deltas are attached on the low-sensitivity bases of every adapted map, ranked by singular value or, with
``--sensitivity fisher``, weighted by loss gradients on the training data; the head starts as the
layer-L* linear probe of stage 1.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from i2p.evaluation.perturb import parse_condition
from i2p.runtime.preprocess import PreprocessSpec

from . import adapters, backbones, importance, subspace
from .backbone import load_backbone, preprocess_spec
from .checkpoint_scoring import Splits, calibration_subset, eval_loader, labelled_batches, load_splits
from .config import TrainConfig
from .distributed import Placement, broadcast_json, broadcast_tensors, progress, say, setup
from .metadata import BackboneInfo
from .model import I2PModel


def perceive(
    cfg: TrainConfig, tower, spec: PreprocessSpec, splits: Splits, rt: Placement
) -> tuple[importance.ImportanceProfile, torch.nn.Linear]:
    """Stage 1: per-block layer features on calibration/validation subsets -> (profile, probe at L*)."""
    blocks = list(backbones.for_tower(tower).blocks(tower))
    calib = calibration_subset(splits.train, cfg.calib_size, cfg.seed)
    val = calibration_subset(splits.val, cfg.calib_size, cfg.seed)
    say(
        rt,
        f"stage 1: scoring {len(blocks)} layers on {len(calib)} calibration / {len(val)} validation images",
    )
    feats = []
    for name, samples in (("calibration", calib), ("validation", val)):
        loader = eval_loader(samples, spec, cfg)
        bar = progress(rt, labelled_batches(loader), total=len(loader), desc=f"stage 1: {name} features")
        feats.append(importance.block_cls_features(tower, bar, rt.device))
    xc, xv = feats
    degraded = {}
    if cfg.layer_rule == "robust":  # the same validation images after each deployment degradation
        for cond in map(parse_condition, cfg.layer_degrade):
            loader = eval_loader(val, spec, cfg, condition=cond)
            bar = progress(
                rt, labelled_batches(loader), total=len(loader), desc=f"stage 1: validation, {cond.name}"
            )
            degraded[cond.name] = importance.block_cls_features(tower, bar, rt.device)
    result, probe = importance.profile(xc, xv, cfg.layer, cfg.layer_tolerance, degraded, cfg.layer_rule)
    x, _ = next(iter(labelled_batches(eval_loader(calib[:8], spec, cfg))))
    speed = importance.truncated_speed(blocks, lambda: tower(x.to(rt.device)))
    return dataclasses.replace(result, relative_speed=speed), probe


def perceive_once(
    cfg: TrainConfig, tower, spec: PreprocessSpec, splits: Splits, rt: Placement
) -> tuple[importance.ImportanceProfile, torch.nn.Linear]:
    """Stage 1 under DDP: computed on rank 0 only, its profile and probe broadcast to the other ranks.

    Every rank would compute the same result from the same calibration subset; doing it once saves
    (world - 1) passes of the full tower over it. The other ranks wait in the broadcast meanwhile.
    """
    if rt.world == 1:
        return perceive(cfg, tower, spec, splits, rt)
    profile, probe = perceive(cfg, tower, spec, splits, rt) if rt.main else (None, None)
    profile = importance.ImportanceProfile.from_dict(
        broadcast_json(rt, profile.to_dict() if rt.main else None)
    )
    if probe is None:
        probe = torch.nn.Linear(backbones.for_tower(tower).width(tower), 1).requires_grad_(False)
    probe.to(rt.device)
    broadcast_tensors(rt, [probe.weight.data, probe.bias.data])
    return profile, probe


def profile_layers(cfg: TrainConfig) -> importance.ImportanceProfile:
    """``i2p layers``: stage 1 alone."""
    rt = setup(cfg.device)
    tower, _ = load_backbone(cfg.model, cfg.pretrained, cfg.seed)
    spec = preprocess_spec(cfg.model)
    return perceive(cfg, tower.to(rt.device), spec, load_splits(cfg, spec.max_pixels, rt), rt)[0]


def build(
    cfg: TrainConfig, splits: Splits, rt: Placement
) -> tuple[I2PModel, BackboneInfo, importance.ImportanceProfile | None, dict[str, torch.Tensor]]:
    """Stage 1 and the model: (model with deltas, backbone info, importance profile, embedded base)."""
    tower, info = load_backbone(cfg.model, cfg.pretrained, cfg.seed)
    spec = preprocess_spec(cfg.model)
    tower.to(rt.device)
    profile, probe = None, None
    if cfg.baseline:
        layer = info.num_layers
    else:
        profile, probe = perceive_once(cfg, tower, spec, splits, rt)
        layer = profile.layer
    model = I2PModel(tower, layer, baseline=cfg.baseline).to(rt.device)
    embed = cfg.embed_base or info.pretrained == "none"  # a copy: full fine-tuning changes blocks in place
    base = {k: v.detach().clone() for k, v in model.tower.state_dict().items()} if embed else {}
    if probe is not None:  # warm start: the head begins as the layer-L* linear probe
        with torch.no_grad():
            model.head.fc.weight.copy_(probe.weight)
            model.head.fc.bias.copy_(probe.bias)
    if cfg.adapter == "full" and not cfg.baseline:
        model.tune_blocks()
    elif cfg.adapter == "lora" and cfg.rank:
        model.deltas = adapters.attach_lora(model.blocks, cfg.rank, cfg.seed)
        model.to(rt.device)
    elif cfg.rank:
        grad_sq = fisher_statistics(model, splits, spec, cfg, rt) if cfg.sensitivity == "fisher" else None
        model.add_deltas(subspace.choose_bases(model.blocks, cfg.rank, grad_sq))
        model.to(rt.device)
    return model, info, profile, base


def fisher_statistics(
    model: I2PModel, splits: Splits, spec: PreprocessSpec, cfg: TrainConfig, rt: Placement
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
