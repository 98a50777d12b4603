"""open_clip's own ``VisionTransformer`` (OpenAI CLIP, LAION, MetaCLIP): class token, nn.MultiheadAttention.

The tower is built from an open_clip config with a stand-in text tower (never used, never downloaded);
``model_configs/`` adds the tiny ``i2p-tiny-vit`` for tests and the demo.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from i2p.runtime.preprocess import CLIP_MEAN, CLIP_STD, PreprocessSpec

from .family import BackboneError, Family, spec_from_config

CONFIG_DIR = Path(__file__).parent.parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # ships "i2p-tiny-vit" for tests and the demo

# The text tower is never used: ``create_model`` builds this stand-in instead of the configured one (a
# large transformer, or a Hugging Face model whose config would be downloaded).
NO_TEXT_TOWER = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


def open_clip_spec(model: str, name: str, size: int) -> PreprocessSpec:
    """open_clip's preprocessing of open_clip model ``name`` at ``size``: what ``create_model_and_transforms``
    merges (the first pretrained tag's config, then the model config's ``preprocess_cfg``): mean, std,
    ``resize_mode`` ("shortest", or "squash": DFN, CLIPA, MetaCLIP 2 at 378, SigLIP 2, PE-Core) and
    ``interpolation``. open_clip has no crop fraction: it crops exactly ``size``."""
    tags = open_clip.list_pretrained_tags_by_model(name)
    pp = dict(open_clip.get_pretrained_cfg(name, tags[0])) if tags else {}
    pp.update((open_clip.get_model_config(name) or {}).get("preprocess_cfg") or {})
    return spec_from_config(
        model,
        f"open_clip's preprocess config of {name}",
        size=size,
        resize=pp.get("resize_mode") or "shortest",
        interpolation=pp.get("interpolation") or "bicubic",
        mean=pp.get("mean") or CLIP_MEAN,
        std=pp.get("std") or CLIP_STD,
    )


class _NoRandomInitNotice(logging.Filter):
    """open_clip warns that an unloaded model is random; ours gets its weights right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


class OpenClipViT(Family):
    name = "open_clip"
    weights_prefix = "visual."

    def knows(self, model: str) -> bool:
        cfg = open_clip.get_model_config(model)
        return cfg is not None and not cfg.get("vision_cfg", {}).get("timm_model_name")

    def build(self, model: str, device: str = "cpu") -> VisionTransformer:
        quiet = _NoRandomInitNotice()
        logging.getLogger().addFilter(quiet)
        try:
            with torch.device(device):
                tower = open_clip.create_model(model, pretrained=None, text_cfg=NO_TEXT_TOWER, device=device)
            tower = tower.visual
        except Exception as e:  # open_clip raises many types for configs it cannot build
            raise BackboneError(
                f"{model}: open_clip cannot build this model ({type(e).__name__}: {e})"
            ) from e
        finally:
            logging.getLogger().removeFilter(quiet)
        if (
            not isinstance(tower, VisionTransformer)
            or tower.attn_pool is not None
            or tower.pool_type != "tok"
        ):
            raise BackboneError(f"{model}: only plain open_clip ViT image towers are supported")
        if not all(type(b) is ResidualAttentionBlock for b in tower.transformer.resblocks):
            raise BackboneError(
                f"{model}: custom attention blocks are not supported (need nn.MultiheadAttention)"
            )
        if getattr(tower, "class_embedding", None) is None:
            raise BackboneError(f"{model}: the tower has no class token, which the detector head reads")
        return tower

    def preprocess(self, model: str) -> PreprocessSpec:
        size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
        return open_clip_spec(model, model, size if isinstance(size, int) else size[0])

    def download(self, model: str, tag: str) -> Path:
        cfg = open_clip.get_pretrained_cfg(model, tag)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise BackboneError(
                f"--pretrained {tag!r} is neither a file nor an open_clip tag for {model} (tags: {tags})"
            )
        return Path(open_clip.download_pretrained(cfg))

    def weight_sources(self, model: str) -> str:
        tags = open_clip.list_pretrained_tags_by_model(model)
        return f"open_clip tags: {', '.join(tags)}" if tags else "local file only"

    def owns(self, tower: nn.Module) -> bool:
        return isinstance(tower, VisionTransformer)

    def blocks(self, tower: VisionTransformer) -> nn.ModuleList:
        return tower.transformer.resblocks

    def block_prefix(self) -> str:
        return "transformer.resblocks."

    def width(self, tower: VisionTransformer) -> int:
        return tower.transformer.width

    def image_size(self, tower: VisionTransformer) -> int:
        size = tower.image_size
        return size if isinstance(size, int) else size[0]

    def pool(self, tower: VisionTransformer) -> str:
        return "cls"

    def layer_features(self, tower: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
        out = tower.forward_intermediates(
            x, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        return [t[:, 0] for t in out["image_intermediates_prefix"]]

    def final_norm(self, tower: VisionTransformer) -> tuple[nn.Module, torch.Tensor | None]:
        return tower.ln_post, tower.proj

    def truncate(self, tower: VisionTransformer, layer: int) -> None:
        tower.transformer.resblocks = tower.transformer.resblocks[:layer]
        tower.ln_post, tower.proj = nn.Identity(), None

    def head_keys(self) -> tuple[str, ...]:
        return ("ln_post", "proj")
