"""The frozen CLIP image tower: built from an open_clip config, weights from a local file (or a tag on request).

Only the vision tower is built (no text tower), and nothing is downloaded unless the user names an
open_clip pretrained tag. Loading never unpickles code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from i2p.base.files import sha256_file
from i2p.runtime.preprocess import CLIP_MEAN, CLIP_STD, PreprocessSpec

from .metadata import BackboneInfo

CONFIG_DIR = Path(__file__).with_name("model_configs")
open_clip.add_model_config(CONFIG_DIR)  # ships "i2p-tiny-vit" for tests and the demo


class BackboneError(ValueError):
    """The backbone name, its weights file or its architecture cannot be used."""


# The text tower is never used: ``create_model`` builds this stand-in instead of the configured one (a
# large transformer, or a Hugging Face model whose config would be downloaded).
NO_TEXT_TOWER = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


class _NoRandomInitNotice(logging.Filter):
    """open_clip warns that an unloaded model is random; ours gets its weights right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def build_tower(model: str) -> VisionTransformer:
    """An open_clip ViT image tower with random weights, checked to be one this package can adapt."""
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise BackboneError(f"unknown open_clip model {model!r}; see open_clip.list_models()")
    quiet = _NoRandomInitNotice()
    logging.getLogger().addFilter(quiet)
    try:
        tower = open_clip.create_model(model, pretrained=None, text_cfg=NO_TEXT_TOWER).visual
    except Exception as e:  # open_clip raises many types for configs it cannot build
        raise BackboneError(f"{model}: open_clip cannot build this model ({type(e).__name__}: {e})") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    if not isinstance(tower, VisionTransformer) or tower.attn_pool is not None or tower.pool_type != "tok":
        raise BackboneError(f"{model}: only plain open_clip ViT image towers are supported")
    if not all(type(b) is ResidualAttentionBlock for b in tower.transformer.resblocks):
        raise BackboneError(
            f"{model}: custom attention blocks are not supported (need nn.MultiheadAttention)"
        )
    if getattr(tower, "class_embedding", None) is None:
        raise BackboneError(f"{model}: the tower has no class token, which the detector head reads")
    return tower


def preprocess_spec(model: str) -> PreprocessSpec:
    cfg = open_clip.get_model_config(model)
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    pp = cfg.get("preprocess_cfg", {})
    return PreprocessSpec(
        size=size, mean=tuple(pp.get("mean", CLIP_MEAN)), std=tuple(pp.get("std", CLIP_STD))
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """An open_clip full-model or visual-only state dict as the ``visual`` tower's keys, every tensor checked.

    In a full CLIP state dict only the ``visual.`` tensors are read and checked: the text tower (and
    ``logit_scale``) is never loaded, so what it holds cannot change the detector.
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
    if any(k.startswith("visual.") for k in names):
        names = {k[len("visual.") :]: f for k, f in names.items() if k.startswith("visual.")}
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
    """A local path stays as it is; an open_clip tag is downloaded (the user asked for it); "none" -> None."""
    if pretrained == "none":
        return None
    path = Path(pretrained).expanduser()
    if path.exists() or path.suffix in (".pt", ".bin", ".safetensors", ".pth"):
        return path
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise BackboneError(
            f"--pretrained {pretrained!r} is neither a file nor an open_clip tag for {model} (tags: {tags})"
        )
    return Path(open_clip.download_pretrained(cfg))


def load_backbone(model: str, pretrained: str, seed: int = 0) -> tuple[VisionTransformer, BackboneInfo]:
    """The frozen tower in eval mode, and the record a checkpoint keeps of it."""
    torch.manual_seed(seed)  # random init ("none") must be reproducible across resume
    tower = build_tower(model)
    weights = resolve_weights(model, pretrained)
    if weights is not None:
        sd = read_state_dict(weights)
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
        num_layers=len(tower.transformer.resblocks),
        width=tower.transformer.width,
    )
    return tower, info
