"""The frozen image tower of any supported family: built from its library's config, weights from a local file
(or a library tag on request).

Families (``i2p.train.backbones``): open_clip ViTs, timm ViTs (DINOv2) and timm Evas. Only the image
tower is built (no text tower), and nothing is downloaded unless the user names a library tag. Loading
never unpickles code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from i2p.base.files import sha256_file
from i2p.runtime.preprocess import PreprocessSpec

from . import backbones
from .backbones import BackboneError
from .metadata import BackboneInfo

__all__ = ["BackboneError", "build_tower", "load_backbone", "preprocess_spec", "read_state_dict"]


def build_tower(model: str) -> nn.Module:
    """The image tower of ``model`` with random weights, checked to be one this package can adapt."""
    return backbones.for_model(model).build(model)


def preprocess_spec(model: str) -> PreprocessSpec:
    """The preprocessing ``model`` was trained with, from its library's config."""
    return backbones.for_model(model).preprocess(model)


def read_state_dict(path: Path, prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """A full-model or tower-only state dict as the tower's keys, every tensor checked.

    In a full model's state dict (open_clip CLIP: ``prefix`` "visual.") only the tower's tensors are read
    and checked: the text tower (and ``logit_scale``) is never loaded, so what it holds cannot change the
    detector. ``prefix`` "" reads a tower-only file (timm) as it is.
    """
    if not path.is_file():
        raise BackboneError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files; all mean the same to the user
        raise BackboneError(
            f"{path}: cannot read weights ({type(e).__name__}: {e}). Expected a safetensors file or a "
            "plain torch state dict (TorchScript archives are refused: they contain code)"
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise BackboneError(f"{path}: not a state dict (a mapping of names to tensors)")
    names = {k.removeprefix("module."): k for k in sd}  # tower key -> key in the file
    if prefix and any(k.startswith(prefix) for k in names):
        names = {k[len(prefix) :]: f for k, f in names.items() if k.startswith(prefix)}
    check_weights(path, {names[k]: sd[names[k]] for k in names})
    return {k: sd[f] for k, f in names.items()}


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor_problem(value: object) -> str | None:
    """Why ``value`` cannot be a weight (None if it can): a dense CPU float tensor of finite values."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if value.is_nested or value.layout != torch.strided:
        return f"is a {str(value.layout).removeprefix('torch.')} tensor; weights must be dense"
    if value.is_quantized:
        return f"is a quantized tensor ({value.dtype}); weights must be floating point"
    if value.device.type != "cpu":
        return f"is a tensor on device {value.device.type!r}, which holds no values"
    if value.dtype not in WEIGHT_DTYPES:
        return f"has dtype {str(value.dtype).removeprefix('torch.')}; weights are float16, bfloat16, float32 or float64"
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        kinds = [
            name
            for name, present in (
                ("NaN", torch.isnan(value).any()),
                ("+inf", torch.isposinf(value).any()),
                ("-inf", torch.isneginf(value).any()),
            )
            if present
        ]
        return f"has {int((~finite).sum())} of {value.numel()} values {'/'.join(kinds)}"
    return None


def check_weights(
    path: str | os.PathLike, tensors: dict[str, object], error: type[ValueError] = BackboneError
) -> None:
    """Refuse ``tensors`` unless each is a usable weight; the message names the file and the first offenders."""
    problems = [f"{k} {why}" for k, v in tensors.items() if (why := tensor_problem(v)) is not None]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise error(f"{path}: {len(problems)} tensor(s) cannot be weights: {'; '.join(problems[:5])}{more}")


def misfit(
    tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], may_lack: tuple[str, ...] = ()
) -> list[str]:
    """Why ``tensors`` do not fit a module with state ``expected``: wrong shapes, missing and unexpected keys.

    Names starting with ``may_lack`` may be missing (blocks a truncated model never runs).
    """
    problems = mismatched_shapes(tensors, expected)
    missing = [k for k in expected if k not in tensors and not k.startswith(may_lack)]
    unexpected = [k for k in tensors if k not in expected]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            problems.append(f"{len(keys)} {label} {keys[:5]}{'…' if len(keys) > 5 else ''}")
    return problems


def mismatched_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """ "name (shape) (model: shape)" for every tensor whose shape differs from the model's of that name."""
    return [
        f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k].shape
    ]


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def resolve_weights(model: str, pretrained: str) -> Path | None:
    """A local path stays as it is; a library tag is downloaded (the user asked for it); "none" -> None."""
    if pretrained == "none":
        return None
    path = Path(pretrained).expanduser()
    if path.exists() or path.suffix in (".pt", ".bin", ".safetensors", ".pth"):
        return path
    return backbones.for_model(model).download(model, pretrained)


def load_backbone(model: str, pretrained: str, seed: int = 0) -> tuple[nn.Module, BackboneInfo]:
    """The frozen tower in eval mode, and the record a checkpoint keeps of it."""
    torch.manual_seed(seed)  # random init ("none") must be reproducible across resume
    family = backbones.for_model(model)
    tower = family.build(model)
    weights = resolve_weights(model, pretrained)
    if weights is not None:
        sd = read_state_dict(weights, family.weights_prefix)
        if problems := misfit(sd, tower.state_dict()):
            raise BackboneError(f"{weights}: weights do not fit {model}: {'; '.join(problems[:5])}")
        tower.load_state_dict(sd)
        digest = sha256_file(weights)
    else:
        digest = state_dict_sha256(tower.state_dict())
    tower.eval().requires_grad_(False)
    info = BackboneInfo(
        model=model,
        pretrained=str(weights) if weights else "none",
        sha256=digest,
        num_layers=len(family.blocks(tower)),
        width=family.width(tower),
        family=family.name,
        pool=family.pool(tower),
    )
    return tower, info
