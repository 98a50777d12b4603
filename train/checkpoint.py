"""``checkpoint.safetensors``: the trained deltas and head, resume state, and typed metadata in one file.

The frozen base is referenced (model name, weights path, sha256), not copied, except when it is
not a file (random init) or the user asks for ``--embed-base``. Loading is safetensors + JSON only:
nothing in a checkpoint can run code. Every way a checkpoint can be wrong (metadata, tensor names or
shapes, base weights) is a ``CheckpointError`` that names the file and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from i2p.base.files import sha256_file, write_bytes_atomic

from . import backbones
from .backbone import BackboneError, check_weights, misfit, read_state_dict
from .metadata import CheckpointError, CheckpointMeta
from .model import I2PModel

BASE, RESUME = "base.", "resume."


@dataclass(frozen=True)
class Checkpoint:
    """A read checkpoint: where it came from, its metadata and all its tensors."""

    path: Path
    meta: CheckpointMeta
    tensors: dict[str, torch.Tensor]

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``prefix`` (``base.``, ``resume.``), with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def trainable(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith(("head.", "delta.", "block."))}


def save_checkpoint(
    path: str | os.PathLike,
    model: I2PModel,
    meta: CheckpointMeta,
    resume: dict[str, torch.Tensor] | None = None,
    base: dict[str, torch.Tensor] | None = None,
    ood: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write atomically (temp file + rename): a crash leaves the previous checkpoint intact.

    ``ood``: the OOD density's tensors (``density.Density.tensors``, named ``ood.*``), with ``meta.ood``.
    """
    if (ood is None) != (meta.ood is None):
        raise ValueError("the OOD density's tensors and its metadata (meta.ood) go together")
    tensors = dict(model.trainable_state())
    tensors.update(ood or {})
    tensors.update({f"{RESUME}{k}": v for k, v in (resume or {}).items()})
    tensors.update({f"{BASE}{k}": v for k, v in (base or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata={"i2p": meta.to_json()}))


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Metadata and tensors; a truncated, foreign or malformed file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("i2p")
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint, truncated or corrupt ({e})"
        ) from e
    if raw is None:
        raise CheckpointError(f"{path}: a safetensors file without i2p metadata; not an i2p-train checkpoint")
    return Checkpoint(path, CheckpointMeta.from_json(raw, path), tensors)


def base_state(
    ckpt: Checkpoint, backbone: str | os.PathLike | None, prefix: str = "visual."
) -> dict[str, torch.Tensor]:
    """The frozen base's weights: embedded in the checkpoint, or read from disk and checked by sha256."""
    embedded = ckpt.section(BASE)
    if embedded and backbone is None:
        return embedded
    info = ckpt.meta.backbone
    if info.pretrained == "none" and backbone is None:
        raise CheckpointError(
            f"{ckpt.path}: the checkpoint was trained from random init but does not embed its base weights"
        )
    path = Path(backbone or info.pretrained)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: the backbone weights {ckpt.path} was trained on are not there; "
            "pass --backbone PATH where they moved"
        )
    digest = sha256_file(path)
    if digest != info.sha256:
        raise CheckpointError(
            f"{path}: sha256 {digest[:16]}… differs from the checkpoint's backbone ({info.sha256[:16]}…); "
            "these are not the weights the detector was trained on"
        )
    try:
        return read_state_dict(path, prefix)
    except BackboneError as e:
        raise CheckpointError(str(e)) from e


def unfinished_run_warning(path: str | os.PathLike, meta: CheckpointMeta) -> str | None:
    """What to say when a checkpoint comes from a training run that did not finish (killed, or still running).

    Such a checkpoint holds the last epoch that finished: it loads and scores, but it is not the model
    the run was set to train. ``i2p eval --ckpt`` and ``i2p-export`` both say so, in these words.
    """
    if meta.complete:
        return None
    epochs = meta.config.get("epochs")
    done = f"epoch {meta.resume.epoch + 1}" if meta.resume is not None else "its last completed epoch"
    of = f" of {epochs}" if isinstance(epochs, int) and not isinstance(epochs, bool) else ""
    return (
        f"warning: {Path(path).name} is from an unfinished training run ({done}{of}); "
        "i2p-train --resume with the same --out finishes it"
    )


def load_model(
    path: str | os.PathLike, backbone: str | os.PathLike | None = None
) -> tuple[I2PModel, CheckpointMeta]:
    """Rebuild the trained detector (unmerged, eval mode) from a checkpoint and its base weights."""
    ckpt = read_checkpoint(path)
    return build_model(ckpt, backbone), ckpt.meta


def build_model(ckpt: Checkpoint, backbone: str | os.PathLike | None = None) -> I2PModel:
    """The detector from an already read checkpoint; tensors that do not fit are a CheckpointError."""
    meta, info = ckpt.meta, ckpt.meta.backbone
    try:
        family = backbones.for_model(info.model)
        if family.name != info.family:
            raise BackboneError(f"{info.model!r} is a {family.name} model, the checkpoint says {info.family}")
        tower = family.build(info.model)
    except BackboneError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from e
    built = (len(family.blocks(tower)), family.width(tower), family.pool(tower))
    if built != (info.num_layers, info.width, info.pool):
        raise CheckpointError(
            f"{ckpt.path}: backbone {info.model!r} has {built[0]} blocks of width {built[1]} pooled by "
            f"{built[2]}, but the checkpoint says {info.num_layers} of width {info.width} pooled by {info.pool}"
        )
    # the model's own tensors (resume state is checked where it is used, by resume.restore_state)
    check_weights(
        ckpt.path, {k: v for k, v in ckpt.tensors.items() if not k.startswith(RESUME)}, CheckpointError
    )
    base = base_state(ckpt, backbone, family.weights_prefix)
    # blocks after L* never run; the head holds what it needs of the final norm and projection
    if problems := misfit(
        base, tower.state_dict(), may_lack=family.dropped_keys(meta.layer, info.num_layers)
    ):
        raise CheckpointError(f"{ckpt.path}: base weights do not fit {info.model}: {'; '.join(problems[:5])}")
    tower.load_state_dict(base, strict=False)
    model = I2PModel(tower, meta.layer, baseline=meta.baseline)
    problems = model.trainable_state_problems(ckpt.trainable())
    if problems:
        raise CheckpointError(f"{ckpt.path}: trained tensors do not fit the model: {'; '.join(problems[:5])}")
    model.load_trainable_state(ckpt.trainable())
    return model.eval()
