"""What I2P needs of a backbone family, in one small interface: each family answers it through its
library's public API (``forward_intermediates``, ``prune_intermediate_layers``, data configs).

A *tower* is the library's own image module (open_clip's ``VisionTransformer``, a timm model), kept as
it is so its parameter names, ONNX node names and weight files stay the library's. A ``Family`` is
stateless: it builds towers from a model name and answers questions about a tower it owns.

The layer feature after block k is pooled one way per tower and recorded as ``pool``: ``"cls"`` (the
class token) when the tower has one, else ``"mean"`` (the mean of the patch tokens, register tokens
excluded). Stage 1's features, the truncated tower's output and the exported network all use it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from i2p.runtime.preprocess import PreprocessSpec


class BackboneError(ValueError):
    """The backbone name, its weights file or its architecture cannot be used."""


def spec_from_config(model: str, source: str, **fields: Any) -> PreprocessSpec:
    """The ``PreprocessSpec`` of a library's data config (size, resize, interpolation, crop_pct, mean, std).

    A config the runtime cannot reproduce (another resize mode or filter, a crop fraction out of range) is
    refused here, before training, naming the model and the field: a checkpoint never records
    preprocessing that export would have to refuse or the runtime would serve differently.
    """
    for key in ("mean", "std"):
        fields[key] = tuple(fields[key])
    try:
        return PreprocessSpec(**fields)
    except ValueError as e:
        raise BackboneError(
            f"{model}: {source} asks for preprocessing the runtime does not reproduce ({e}), so this model "
            "cannot be trained for deployment"
        ) from e


class Family(ABC):
    """One library's towers: how to build them and the handful of things I2P asks of them."""

    name: str  # recorded in the checkpoint: "open_clip", "timm"
    weights_prefix: str = ""  # key prefix of the tower inside a full-model weights file (stripped)

    @abstractmethod
    def knows(self, model: str) -> bool:
        """Whether ``model`` names one of this family's architectures."""

    @abstractmethod
    def build(self, model: str, device: str = "cpu") -> nn.Module:
        """The tower with random weights (nothing downloaded), checked to be one I2P can adapt.

        ``device="meta"``: shapes only, no memory (for sizes and parameter counts)."""

    @abstractmethod
    def preprocess(self, model: str) -> PreprocessSpec:
        """The preprocessing the model was trained with, from the library's own config."""

    @abstractmethod
    def download(self, model: str, tag: str) -> Path:
        """A library weights tag fetched on request (the user named it); BackboneError for an unknown tag."""

    @abstractmethod
    def weight_sources(self, model: str) -> str:
        """Where weights for ``model`` come from besides a local file (library tags), for ``i2p backbones``."""

    @abstractmethod
    def owns(self, tower: nn.Module) -> bool:
        """Whether ``tower`` is one of this family's modules."""

    @abstractmethod
    def blocks(self, tower: nn.Module) -> nn.ModuleList | nn.Sequential:
        """The transformer blocks, in order (truncation keeps a prefix of them)."""

    @abstractmethod
    def block_prefix(self) -> str:
        """State-dict prefix of the blocks: block i's tensors are ``f"{prefix}{i}."``."""

    @abstractmethod
    def width(self, tower: nn.Module) -> int:
        """The width of the layer feature."""

    @abstractmethod
    def image_size(self, tower: nn.Module) -> int:
        """The side of the square input the tower was built for."""

    @abstractmethod
    def pool(self, tower: nn.Module) -> str:
        """How the layer feature is read from a block's tokens: one of ``POOLS``."""

    @abstractmethod
    def layer_features(self, tower: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The pooled feature [N, width] after every block, through the library's ``forward_intermediates``."""

    @abstractmethod
    def final_norm(self, tower: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
        """(norm, projection or None) the full tower applies to its final feature: the baseline head's."""

    @abstractmethod
    def truncate(self, tower: nn.Module, layer: int) -> None:
        """Keep blocks 1..layer and drop what follows, so that ``tower(x)`` is the pooled feature after
        block ``layer`` (no final norm, projection or head)."""

    @abstractmethod
    def head_keys(self) -> tuple[str, ...]:
        """State-dict prefixes of what ``truncate`` drops besides the blocks."""

    def dropped_keys(self, layer: int, num_layers: int) -> tuple[str, ...]:
        """Prefixes of the state a model truncated at ``layer`` never reads."""
        return (*(f"{self.block_prefix()}{i}." for i in range(layer, num_layers)), *self.head_keys())
