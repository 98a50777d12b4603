"""``checkpoint.safetensors``: the trained deltas and head, resume state, and JSON metadata in one file.

The frozen base is referenced (open_clip name, weights path, sha256), not copied, except when it is
not a file (random init) or the user asks for ``--embed-base``. Loading is safetensors + JSON only:
nothing in a checkpoint can run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from i2p.runtime.preprocess import PreprocessSpec

from .backbone import BackboneError, BackboneInfo, build_tower, read_state_dict
from .model import I2PModel

FORMAT = "i2p-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is unreadable, truncated, from a newer version, or its base weights do not match."""


def save_checkpoint(
    path: str | os.PathLike,
    model: I2PModel,
    meta: dict[str, Any],
    resume: dict[str, torch.Tensor] | None = None,
    base: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write atomically (temp file + rename): a crash leaves the previous checkpoint intact."""
    tensors = dict(model.trainable_state())
    tensors.update({f"resume.{k}": v for k, v in (resume or {}).items()})
    tensors.update({f"base.{k}": v for k, v in (base or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes it private
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"i2p": json.dumps(header, default=_json_default)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in checkpoint metadata")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors); a truncated or foreign file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("i2p")
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint, truncated or corrupt ({e})"
        ) from e
    if raw is None:
        raise CheckpointError(f"{path}: a safetensors file without i2p metadata; not an i2p-train checkpoint")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an i2p checkpoint (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta['format_version']} is newer than this i2p ({FORMAT_VERSION}); upgrade"
        )
    return meta, tensors


def backbone_info(meta: dict[str, Any]) -> BackboneInfo:
    b = dict(meta["backbone"])
    b["preprocess"] = PreprocessSpec.from_dict(b["preprocess"])
    return BackboneInfo(**b)


def base_state(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], backbone: str | None
) -> dict[str, torch.Tensor]:
    """The frozen base's weights: embedded in the checkpoint, or read from disk and checked by sha256."""
    embedded = {k[len("base.") :]: v for k, v in tensors.items() if k.startswith("base.")}
    if embedded and backbone is None:
        return embedded
    info = backbone_info(meta)
    path = Path(backbone or info.pretrained)
    if info.pretrained == "none" and backbone is None:
        raise CheckpointError(
            "the checkpoint was trained from random init but does not embed its base weights"
        )
    from i2p.base.files import sha256_file

    if not path.is_file():
        raise CheckpointError(
            f"{path}: the backbone weights this checkpoint was trained on are not there; "
            "pass --backbone PATH where they moved"
        )
    digest = sha256_file(path)
    if digest != info.sha256:
        raise CheckpointError(
            f"{path}: sha256 {digest[:16]}… differs from the checkpoint's backbone ({info.sha256[:16]}…); "
            "these are not the weights the detector was trained on"
        )
    try:
        return read_state_dict(path)
    except BackboneError as e:
        raise CheckpointError(str(e)) from e


def load_model(path: str | os.PathLike, backbone: str | None = None) -> tuple[I2PModel, dict[str, Any]]:
    """Rebuild the trained detector (unmerged, eval mode) from a checkpoint and its base weights."""
    meta, tensors = read_checkpoint(path)
    return build_model(meta, tensors, backbone, name=str(path)), meta


def build_model(
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    backbone: str | None = None,
    name: str = "checkpoint",
) -> I2PModel:
    """The detector from an already read checkpoint (``read_checkpoint``'s result)."""
    info = backbone_info(meta)
    tower = build_tower(info.model)
    missing, _ = tower.load_state_dict(base_state(meta, tensors, backbone), strict=False)
    dropped = tuple(f"transformer.resblocks.{i}." for i in range(meta["layer"], info.num_layers))
    needed = [k for k in missing if not k.startswith((*dropped, "ln_post", "proj"))]  # blocks after L* unused
    if needed:
        raise CheckpointError(f"{name}: base weights lack {needed[:5]}")
    model = I2PModel(tower, meta["layer"], baseline=meta["baseline"])
    model.load_trainable_state({k: v for k, v in tensors.items() if k.startswith(("head.", "delta."))})
    return model.eval()
