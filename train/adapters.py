"""The alternatives to subspace tuning that the ablation compares with, as training options a user can pick.

``--adapter subspace`` (I2P, default): ΔW = U_low A V_lowᵀ, U_low/V_low frozen minor singular directions,
only A (r × r) trains. ``--adapter lora``: LoRA (Hu et al., 2021) of the same rank on the same maps,
ΔW = B A with B (out × r, zero at start) and A (r × in, random) both trained. ``--adapter full``:
every parameter of blocks 1..L* trains.

All three merge and export alike: a LoRA delta is stored in the subspace delta's own form (U = B,
V = Aᵀ, A = identity), so a checkpoint loads, merges (W' = W + U A Vᵀ) and exports with the same code,
and full fine-tuning stores the tuned blocks' tensors (``block.<i>.<name>``), which load over the base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import subspace

BLOCK_PREFIX = "block."


class LoRADelta(subspace.SubspaceDelta):
    """A subspace delta whose U and V train and whose A stays the identity: ΔW = U Vᵀ = B A."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        nn.Module.__init__(self)  # the parent's U/V buffers and A parameter swap roles here
        self.U = nn.Parameter(u.detach().clone())
        self.V = nn.Parameter(v.detach().clone())
        self.register_buffer("A", torch.eye(u.shape[1], dtype=u.dtype, device=u.device))


def attach_lora(blocks: nn.ModuleList, rank: int, seed: int = 0) -> dict[str, subspace.SubspaceDelta]:
    """LoRA branches of ``rank`` on every map subspace tuning adapts: B = 0, A kaiming-uniform (zero delta)."""
    g = torch.Generator().manual_seed(seed)
    bases = {}
    for name, module, attr in subspace.adapted_weights(blocks):
        out_features, in_features = getattr(module, attr).shape
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's (and LoRA's) initial range for A
        a_t = torch.empty(in_features, rank).uniform_(-bound, bound, generator=g)
        bases[name] = (torch.zeros(out_features, rank), a_t)
    subspace.attach(blocks, bases)
    return to_lora(blocks)


def to_lora(blocks: nn.ModuleList) -> dict[str, subspace.SubspaceDelta]:
    """Turn attached subspace deltas (fresh, or loaded from a LoRA checkpoint) into trainable LoRA ones."""
    deltas = {}
    for name, module, _ in subspace.adapted_weights(blocks):
        old = getattr(module, subspace.DELTA, None)
        if old is None:
            continue
        if old.A.abs().sum() and not torch.equal(
            old.A, torch.eye(len(old.A), dtype=old.A.dtype, device=old.A.device)
        ):
            raise ValueError(f"{name}: stored delta is not a LoRA delta (its A is not the identity)")
        deltas[name] = LoRADelta(old.U.to(old.A.device), old.V.to(old.A.device))
        module.add_module(subspace.DELTA, deltas[name])
    return deltas


def unfreeze(blocks: nn.ModuleList) -> int:
    """Full fine-tuning: every parameter of ``blocks`` trains; returns how many."""
    blocks.requires_grad_(True)
    return sum(p.numel() for p in blocks.parameters())


def block_state(blocks: nn.ModuleList) -> dict[str, torch.Tensor]:
    """The tuned blocks' tensors for a checkpoint, keyed ``block.<i>.<name>``."""
    return {f"{BLOCK_PREFIX}{k}": v.detach() for k, v in blocks.state_dict().items()}


def load_block_state(blocks: nn.ModuleList, state: dict[str, torch.Tensor]) -> None:
    """Copy stored ``block.*`` tensors over the base weights (strict: every tensor of the blocks)."""
    tuned = {k[len(BLOCK_PREFIX) :]: v for k, v in state.items() if k.startswith(BLOCK_PREFIX)}
    if tuned:
        blocks.load_state_dict(tuned, strict=True)
