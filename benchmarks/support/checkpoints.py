"""Small but real i2p-train checkpoints for tests and the GPU check: the tiny open_clip ViT with random subspace deltas and head.

``make_checkpoint`` goes through the same code as training (``load_backbone``, ``add_deltas`` on the
chosen low-sensitivity bases, ``save_checkpoint``) but fills A and the head with random values instead
of training, so merging and export are exercised with non-zero deltas.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from i2p.train import density, subspace
from i2p.train.backbone import load_backbone, preprocess_spec
from i2p.train.checkpoint import save_checkpoint
from i2p.train.metadata import CheckpointMeta
from i2p.train.model import I2PModel

TINY = "i2p-tiny-vit"  # image 64, patch 16, 4 blocks, width 64


def tiny_model(layer: int = 3, rank: int = 4, seed: int = 0) -> I2PModel:
    """The tiny detector truncated at ``layer``, with rank-``rank`` deltas (none for rank 0), all zero."""
    tower, _ = load_backbone(TINY, "none", seed)
    model = I2PModel(tower, layer)
    if rank:
        model.add_deltas(subspace.choose_bases(model.blocks, rank))
    return model


def make_checkpoint(
    directory: str | Path,
    layer: int = 2,
    rank: int = 4,
    baseline: bool = False,
    seed: int = 0,
    delta_scale: float = 0.5,
    threshold: float = 0.5,
    weights_file: bool = False,
    name: str = "checkpoint.safetensors",
    backbone: str = TINY,
    ood: bool = False,
) -> Path:
    """Write ``directory/name`` and return its path.

    The base weights are embedded (as for random-init training) unless ``weights_file``: then the full
    tower is saved to ``directory/backbone.safetensors`` and the checkpoint references it by path and
    sha256, like a checkpoint trained on a pretrained file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tower, info = load_backbone(backbone, "none", seed=seed)
    if weights_file:
        weights = directory / "backbone.safetensors"
        save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, weights)
        tower, info = load_backbone(backbone, str(weights))
    model = I2PModel(tower, layer, baseline=baseline)
    base = {k: v.clone() for k, v in model.tower.state_dict().items()}
    model.add_deltas(subspace.choose_bases(model.blocks, rank))
    with torch.no_grad():
        for delta in model.deltas.values():
            delta.A.copy_(torch.randn(delta.A.shape, generator=generator) * delta_scale)
        fc = model.head.fc
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) / fc.weight.shape[1] ** 0.5)
        fc.bias.copy_(torch.randn(1, generator=generator) * 0.1)
        if not baseline:  # the baseline's norm is CLIP's frozen ln_post
            model.head.norm.weight.copy_(
                1 + 0.1 * torch.randn(model.head.norm.weight.shape, generator=generator)
            )
            model.head.norm.bias.copy_(0.1 * torch.randn(model.head.norm.bias.shape, generator=generator))
    fitted, spec = _density(model, generator) if ood else (None, None)
    meta = CheckpointMeta(
        backbone=info,
        layer=layer,
        num_layers=model.num_layers,
        preprocess=preprocess_spec(backbone),
        baseline=baseline,
        threshold=threshold,
        config={"rank": rank, "seed": seed},
        metrics={"val": {"mean": {"auc": 0.5}}},
        complete=True,
        ood=spec,
    )
    path = directory / name
    tensors = fitted.tensors() if fitted is not None else None
    save_checkpoint(path, model, meta, base=None if weights_file else base, ood=tensors)
    return path


@torch.no_grad()
def _density(model: I2PModel, generator: torch.Generator) -> tuple[density.Density, object]:
    size = model.family.image_size(model.tower)
    images = torch.rand(96, 3, size, size, generator=generator) * 4 - 2
    feats = density.head_features(model, model.forward_features(images))
    labels = torch.randint(0, 2, (64,), generator=generator)
    fitted = density.fit(feats[:64], labels)
    return fitted, density.calibrate(fitted, feats[64:])
