"""timm's ``VisionTransformer`` (DINOv2 with and without registers, SigLIP trunks) and ``Eva`` (DINOv3,
EVA-02, PE-Core: RoPE, registers, SwiGLU), through timm's public API only.

A model is a timm architecture name (``vit_small_patch14_dinov2``) built with timm's own defaults, or an
i2p config in ``model_configs/`` (``{"family": "timm", "timm_model_name": ..., "timm_kwargs": {...}}``):
the same architecture with ``timm.create_model``'s own keyword arguments (depth, embed_dim, num_heads,
img_size), which is how the tests shrink real architectures without a look-alike.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from i2p.runtime.preprocess import PreprocessSpec

from .family import BackboneError, Family, spec_from_config

CONFIG_DIR = Path(__file__).parent.parent / "model_configs"
TOWERS = (VisionTransformer, Eva)
GLOBAL_POOL = {"cls": "token", "mean": "avg"}  # timm's name for each of our layer features
CROP_MODES = {"center": "shortest", "squash": "squash"}  # timm's crop_mode -> PreprocessSpec.resize


@cache
def configs() -> dict[str, dict[str, Any]]:
    """The i2p timm configs shipped in ``model_configs/``, by file stem."""
    found = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = json.loads(path.read_text())
        if cfg.get("family") == "timm":
            found[path.stem] = cfg
    return found


def architecture(model: str) -> tuple[str, dict[str, Any]]:
    """(timm model name, keyword arguments) of ``model``."""
    cfg = configs().get(model)
    if cfg is not None:
        return cfg["timm_model_name"], dict(cfg.get("timm_kwargs", {}))
    return model, {}


def separate_qkv_bias(tower: nn.Module) -> None:
    """Make an Eva attention with q/v biases (EVA-02) call its ``qkv`` module, then add the bias.

    By default it computes ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``, reading the weight
    without calling the module, so a low-rank branch on ``qkv`` would train nowhere yet merge into the
    weight. ``qkv_bias_separate`` is timm's own switch for the same function as ``qkv(x) + bias``.
    """
    for module in tower.modules():
        if getattr(module, "q_bias", None) is not None and getattr(module, "qkv", None) is not None:
            module.qkv_bias_separate = True


class TimmViT(Family):
    name = "timm"

    def knows(self, model: str) -> bool:
        return model in configs() or timm.is_model(model)

    def build(self, model: str, device: str = "cpu") -> nn.Module:
        name, kwargs = architecture(model)
        try:
            with torch.device(device):
                tower = timm.create_model(name, pretrained=False, **kwargs)
        except Exception as e:  # timm raises many types for kwargs an architecture does not take
            raise BackboneError(f"{model}: timm cannot build {name} ({type(e).__name__}: {e})") from e
        if not isinstance(tower, TOWERS):
            raise BackboneError(
                f"{model}: timm builds a {type(tower).__name__}; supported are "
                f"{', '.join(t.__name__ for t in TOWERS)}"
            )
        size = tower.patch_embed.img_size
        if size is None or size[0] != size[1]:
            raise BackboneError(f"{model}: the input must be square, timm builds it for {size}")
        separate_qkv_bias(tower)
        return tower

    def preprocess(self, model: str) -> PreprocessSpec:
        """timm's data config of the tower as built (its size, not the pretrained one): mean, std, filter,
        ``crop_pct`` (EVA-02: 0.9) and ``crop_mode`` ("center": shortest side; "squash": both sides)."""
        tower = self.build(model, "meta")  # the config and sizes only: no weights allocated
        cfg = resolve_data_config({}, model=tower)
        mode = cfg.get("crop_mode", "center")
        if mode not in CROP_MODES:
            raise BackboneError(
                f"{model}: timm's data config asks for crop_mode {mode!r}; the runtime reproduces "
                f"{', '.join(map(repr, CROP_MODES))}, so this model cannot be trained for deployment"
            )
        return spec_from_config(
            model,
            "timm's data config",
            size=self.image_size(tower),
            resize=CROP_MODES[mode],
            interpolation=cfg.get("interpolation", "bicubic"),
            crop_pct=cfg.get("crop_pct", 1.0),
            mean=cfg["mean"],
            std=cfg["std"],
        )

    def download(self, model: str, tag: str) -> Path:
        name, _ = architecture(model)
        cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}" if tag != "default" else name)
        if cfg is None or not cfg.hf_hub_id:
            tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*")]
            raise BackboneError(
                f"--pretrained {tag!r} is neither a file nor a timm tag of {name} with Hugging Face weights "
                f"(tags: {tags or 'none'})"
            )
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors"))

    def weight_sources(self, model: str) -> str:
        name, _ = architecture(model)
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*")]
        return f"timm tags (Hugging Face): {', '.join(tags)}" if tags else "local file only"

    def owns(self, tower: nn.Module) -> bool:
        return isinstance(tower, TOWERS)

    def blocks(self, tower: nn.Module) -> nn.Module:
        return tower.blocks

    def block_prefix(self) -> str:
        return "blocks."

    def width(self, tower: nn.Module) -> int:
        return tower.embed_dim

    def image_size(self, tower: nn.Module) -> int:
        return tower.patch_embed.img_size[0]

    def pool(self, tower: nn.Module) -> str:
        return "cls" if getattr(tower, "cls_token", None) is not None else "mean"

    def layer_features(self, tower: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        out = tower.forward_intermediates(
            x, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        if self.pool(tower) == "cls":
            return [prefix[:, 0] for _, prefix in out]
        return [(t[0] if isinstance(t, tuple) else t).mean(1) for t in out]  # patch tokens only

    def final_norm(self, tower: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
        norm = tower.norm if not isinstance(tower.norm, nn.Identity) else tower.fc_norm
        return norm, None

    def truncate(self, tower: nn.Module, layer: int) -> None:
        pool = GLOBAL_POOL[self.pool(tower)]
        tower.prune_intermediate_layers([layer - 1], prune_norm=True, prune_head=True)
        tower.reset_classifier(0, pool)

    def head_keys(self) -> tuple[str, ...]:
        return ("norm.", "fc_norm.", "head.", "attn_pool.")
