"""open_clip's timm-based image towers: SigLIP 2 (no class token, attention-pool head) and PE-Core (RoPE,
attention pool), whose open_clip config names a timm trunk (``vision_cfg.timm_model_name``).

The tower is that trunk, built by timm from the open_clip config (``timm_pool`` as its global pool), so
stage 1, truncation and export go through timm's public API exactly as for ``TimmViT``. open_clip cannot
pass timm's own size arguments through its config, so an i2p config in ``model_configs/``
(``{"family": "open_clip_timm", "open_clip_model": ..., "timm_kwargs": {...}}``) shrinks the trunk with
them (depth, embed_dim, num_heads, img_size), the same architecture. Weight files are open_clip's:
the tower's tensors are ``visual.trunk.*``; the projection head after the pool is never used.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from torch import nn

from i2p.runtime.preprocess import PreprocessSpec

from .family import BackboneError
from .open_clip_vit import CONFIG_DIR, OpenClipViT, open_clip_spec
from .timm_vit import TOWERS, TimmViT, separate_qkv_bias


@cache
def configs() -> dict[str, dict[str, Any]]:
    """The i2p configs of open_clip timm towers shipped in ``model_configs/``, by file stem."""
    found = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = json.loads(path.read_text())
        if cfg.get("family") == "open_clip_timm":
            found[path.stem] = cfg
    return found


def architecture(model: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(open_clip model name, its vision config, timm keyword overrides) of ``model``."""
    cfg = configs().get(model)
    name, overrides = (cfg["open_clip_model"], dict(cfg.get("timm_kwargs", {}))) if cfg else (model, {})
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    return name, vision, overrides


class OpenClipTimm(TimmViT):
    name = "open_clip_timm"
    weights_prefix = "visual.trunk."

    def knows(self, model: str) -> bool:
        return bool(architecture(model)[1].get("timm_model_name"))

    def build(self, model: str, device: str = "cpu") -> nn.Module:
        name, vision, overrides = architecture(model)
        if vision.get("timm_proj") not in (None, "none", ""):
            raise BackboneError(
                f"{model}: a timm tower with an extra projection ({vision['timm_proj']}) is not supported"
            )
        kwargs = {"img_size": vision.get("image_size", 224), "num_classes": 0, **overrides}
        pool = vision.get("timm_pool")
        if pool is not None:
            kwargs["global_pool"] = pool
        try:
            with torch.device(device):
                tower = timm.create_model(vision["timm_model_name"], pretrained=False, **kwargs)
        except Exception as e:  # timm raises many types for kwargs an architecture does not take
            raise BackboneError(
                f"{model}: timm cannot build {vision['timm_model_name']} ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(tower, TOWERS):
            raise BackboneError(f"{model}: the timm trunk is a {type(tower).__name__}, not a ViT or Eva")
        separate_qkv_bias(tower)
        return tower

    def preprocess(self, model: str) -> PreprocessSpec:
        """open_clip's preprocessing of the model's weights (its pretrained config), at the tower's size."""
        size = self.image_size(self.build(model, "meta"))  # the size only: no weights allocated
        return open_clip_spec(model, architecture(model)[0], size)

    def weight_sources(self, model: str) -> str:
        return OpenClipViT().weight_sources(architecture(model)[0])

    def download(self, model: str, tag: str) -> Path:
        return OpenClipViT().download(architecture(model)[0], tag)
