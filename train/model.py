"""The detector: a ViT tower truncated at the critical layer L*, subspace deltas, and a one-logit head.

Like timm models it is ``forward_features`` (the layer feature after block L*: the class token, or the
mean patch token of a tower without one) + ``forward_head`` (logit). Blocks after L* are dropped at
construction, so they are never run in training or deployment. The tower is any family's
(``i2p.train.backbones``); the family does the truncation through its library's public API.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import adapters, backbones, subspace


class Head(nn.Module):
    """LayerNorm + Linear -> one logit, on the layer-L* feature.

    The UnivFD baseline reads the tower's final embedding instead: its head is the tower's own final norm
    (CLIP's ln_post) and projection (frozen) followed by the linear layer, which folds into the same
    LayerNorm + Linear.
    """

    def __init__(self, width: int, norm: nn.LayerNorm | None = None, proj: torch.Tensor | None = None):
        super().__init__()
        self.norm = norm if norm is not None else nn.LayerNorm(width)
        self.register_buffer("proj", proj)
        self.fc = nn.Linear(width if proj is None else proj.shape[1], 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        x = self.norm(cls)
        if self.proj is not None:
            x = x @ self.proj
        return self.fc(x).squeeze(-1)

    def folded(self) -> nn.Sequential:
        """The same function as plain LayerNorm + Linear(width, 1): the projection folded into fc."""
        fc = nn.Linear(self.norm.normalized_shape[0], 1)
        with torch.no_grad():
            w = self.fc.weight if self.proj is None else self.fc.weight @ self.proj.T
            fc.weight.copy_(w)
            fc.bias.copy_(self.fc.bias)
        return nn.Sequential(copy.deepcopy(self.norm), fc)


class I2PModel(nn.Module):
    def __init__(self, tower: nn.Module, layer: int, baseline: bool = False):
        super().__init__()
        self.family = backbones.for_tower(tower)
        num_layers = len(self.family.blocks(tower))
        if not 1 <= layer <= num_layers:
            raise ValueError(f"layer {layer} is outside 1..{num_layers}")
        width = self.family.width(tower)
        if baseline:  # UnivFD: frozen full tower, final embedding, linear head
            norm, proj = self.family.final_norm(tower)
            head = Head(
                width,
                norm=copy.deepcopy(norm).requires_grad_(False),
                proj=None if proj is None else proj.detach(),
            )
        else:
            head = Head(width)
        self.family.truncate(tower, layer)
        tower.requires_grad_(False)
        self.tower, self.head = tower, head
        self.layer, self.num_layers, self.baseline = layer, num_layers, baseline
        self.deltas: dict[str, subspace.SubspaceDelta] = {}
        self.tuned_blocks = False  # full fine-tuning: the blocks' own weights train and are stored

    @property
    def blocks(self) -> nn.ModuleList:
        return self.family.blocks(self.tower)

    @property
    def pool(self) -> str:
        """How the layer feature is read: "cls" or "mean" (``backbones.family``)."""
        return self.family.pool(self.tower)

    def add_deltas(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Attach trainable subspace deltas to every linear map of blocks 1..L*."""
        self.deltas = subspace.attach(self.blocks, bases)

    def tune_blocks(self) -> None:
        """Full fine-tuning (``--adapter full``): every parameter of blocks 1..L* trains and is checkpointed."""
        adapters.unfreeze(self.blocks)
        self.tuned_blocks = True

    def resume_adapter(self, adapter: str) -> None:
        """On a model rebuilt from a checkpoint: make the adapter's tensors train again (``--resume``)."""
        if adapter == "lora":
            self.deltas = adapters.to_lora(self.blocks)
        elif adapter == "full":
            self.tune_blocks()

    def merge(self) -> None:
        """Fold the deltas into the base weights: afterwards the tower holds plain ViT blocks.

        The low-rank branches are ordinary submodules, so a ``copy.deepcopy`` merges independently of
        the original (handy to keep the unmerged model for comparison).
        """
        subspace.merge(self.blocks)
        self.deltas = {}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The layer feature after block L*: the truncated tower's own output (its final norm/proj are gone)."""
        return self.tower(x)

    def forward_head(self, cls: torch.Tensor) -> torch.Tensor:
        return self.head(cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: head tensors and each delta's U, V, A (the frozen base is referenced)."""
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        for name, d in self.deltas.items():
            state.update({f"delta.{name}.U": d.U, f"delta.{name}.V": d.V, f"delta.{name}.A": d.A})
        if self.tuned_blocks:
            state.update(adapters.block_state(self.blocks))
        return {k: v.detach() for k, v in state.items()}

    def trainable_state_problems(self, state: dict[str, torch.Tensor]) -> list[str]:
        """What keeps ``state`` (a checkpoint's head and delta tensors) from loading into this model."""
        head = {f"head.{k}": v for k, v in self.head.state_dict().items() if v is not None}
        expected = {k: tuple(v.shape) for k, v in head.items()}
        names = {name: getattr(m, attr) for name, m, attr in subspace.adapted_weights(self.blocks)}
        stored = {k[len("delta.") : -len(".U")] for k in state if k.startswith("delta.") and k.endswith(".U")}
        if stored:  # rank 0 stores no deltas; otherwise every adapted map has one
            for name, w in names.items():
                u, v = state.get(f"delta.{name}.U"), state.get(f"delta.{name}.V")
                rank = (u.shape[-1], v.shape[-1]) if u is not None and v is not None else (0, 0)
                expected |= {
                    f"delta.{name}.U": (w.shape[0], rank[0]),
                    f"delta.{name}.V": (w.shape[1], rank[1]),
                    f"delta.{name}.A": rank,
                }
        if any(k.startswith(adapters.BLOCK_PREFIX) for k in state):  # full fine-tuning: every block tensor
            expected |= {
                f"{adapters.BLOCK_PREFIX}{k}": tuple(v.shape) for k, v in self.blocks.state_dict().items()
            }
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [
            f"{k} has shape {tuple(state[k].shape)}, the model needs {shape}"
            for k, shape in expected.items()
            if k in state and tuple(state[k].shape) != shape
        ]
        return problems

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of trainable_state on a freshly built model (deltas are created from the stored bases)."""
        bases = {
            k[len("delta.") : -len(".U")]: (v, state[k[:-2] + ".V"])
            for k, v in state.items()
            if k.startswith("delta.") and k.endswith(".U")
        }
        if bases:
            self.add_deltas(bases)
            with torch.no_grad():
                for name, d in self.deltas.items():
                    d.A.copy_(state[f"delta.{name}.A"])
        self.head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
        if any(k.startswith(adapters.BLOCK_PREFIX) for k in state):
            adapters.load_block_state(self.blocks, state)
            self.tuned_blocks = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; the frozen base counts once, U/V bases are buffers."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return trainable, total
