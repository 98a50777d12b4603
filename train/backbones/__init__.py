"""Backbone families: each library's image towers behind one interface (``Family``), one file per family."""

from __future__ import annotations

from torch import nn

from i2p.runtime.schema import POOLS

from .family import BackboneError, Family
from .open_clip_timm import OpenClipTimm
from .open_clip_vit import OpenClipViT
from .timm_vit import TimmViT

FAMILIES: tuple[Family, ...] = (OpenClipViT(), TimmViT(), OpenClipTimm())

__all__ = ["FAMILIES", "POOLS", "BackboneError", "Family", "for_model", "for_tower", "named"]


def for_model(model: str) -> Family:
    """The family that builds ``model``; BackboneError naming where names come from otherwise."""
    for family in FAMILIES:
        if family.knows(model):
            return family
    raise BackboneError(
        f"unknown model {model!r}: not an open_clip model (open_clip.list_models()), a timm model "
        "(timm.list_models()) or an i2p config in train/model_configs/; `i2p backbones` lists them"
    )


def named(name: str) -> Family:
    """The family a checkpoint recorded by name."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise BackboneError(f"unknown backbone family {name!r} (known: {[f.name for f in FAMILIES]})")


def for_tower(tower: nn.Module) -> Family:
    """The family of an already built tower."""
    for family in FAMILIES:
        if family.owns(tower):
            return family
    raise BackboneError(f"{type(tower).__name__} is not a tower of a supported backbone family")
