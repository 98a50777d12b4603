"""Low-sensitivity subspace tuning: a trainable delta confined to the least sensitive directions of W.

For a linear map W (out × in) with SVD W = U S Vᵀ, every singular direction i gets a sensitivity
score — its singular value s_i (how much the pretrained function moves along it), optionally times
sqrt(F_i), the root-mean-square loss gradient projected on that direction (Fisher-style weighting).
The ``rank`` least sensitive directions give frozen bases U_low (out × r) and V_low (in × r), and the
only trainable tensor is A (r × r, zero at start):

    W' = W + ΔW,   ΔW = U_low · A · V_lowᵀ

ΔW lies in span(U_low) ⊗ span(V_low) by construction, and merging is exact: W' is a plain matrix.
The delta is attached as a ``torch.nn.utils.parametrize`` parametrization, so one mechanism serves
``nn.Linear.weight`` and ``nn.MultiheadAttention.in_proj_weight`` alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

# The linear maps of an open_clip ResidualAttentionBlock that get a delta: (module path, weight name).
ADAPTED_MAPS = (
    ("attn", "in_proj_weight"),
    ("attn.out_proj", "weight"),
    ("mlp.c_fc", "weight"),
    ("mlp.c_proj", "weight"),
)


class SubspaceDelta(nn.Module):
    """Parametrization W -> W + U_low A V_lowᵀ."""

    def __init__(self, u_low: torch.Tensor, v_low: torch.Tensor):
        super().__init__()
        self.register_buffer("U", u_low.contiguous())
        self.register_buffer("V", v_low.contiguous())
        self.A = nn.Parameter(torch.zeros(u_low.shape[1], v_low.shape[1], dtype=u_low.dtype))

    def delta(self) -> torch.Tensor:
        return self.U @ self.A @ self.V.T

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def low_sensitivity_bases(
    weight: torch.Tensor, rank: int, grad_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """U_low, V_low of the ``rank`` least sensitive singular directions of ``weight``.

    ``grad_sq`` is the mean of G⊙G-style statistics already projected: one value per singular
    direction, E[(u_iᵀ G v_i)²]; None ranks by singular value alone.
    """
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    score = s if grad_sq is None else s * grad_sq.double().clamp_min(0).sqrt()
    order = torch.argsort(score, stable=True)[:rank]
    return u[:, order].to(weight.dtype), vh[order].T.to(weight.dtype)


def projected_grad_sq(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(u_iᵀ G v_i)² for every singular direction i of ``weight``."""
    u, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return ((u * (grad.double() @ vh.T)).sum(0)) ** 2


def adapted_weights(blocks: nn.ModuleList) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, weight attribute) for every adapted linear map in ``blocks``."""
    for i, block in enumerate(blocks):
        for path, attr in ADAPTED_MAPS:
            yield f"{i}.{path}.{attr}", block.get_submodule(path), attr


def choose_bases(
    blocks: nn.ModuleList, rank: int, grad_sq: dict[str, torch.Tensor] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(U_low, V_low) for every adapted map, ranked by singular value or by ``grad_sq`` weighting."""
    return {
        name: low_sensitivity_bases(getattr(module, attr), rank, (grad_sq or {}).get(name))
        for name, module, attr in adapted_weights(blocks)
    }


def attach(
    blocks: nn.ModuleList, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, SubspaceDelta]:
    """Add a zero-initialized SubspaceDelta on the given bases to every adapted map."""
    deltas = {}
    for name, module, attr in adapted_weights(blocks):
        deltas[name] = SubspaceDelta(*bases[name])
        parametrize.register_parametrization(module, attr, deltas[name])
    return deltas


def merge(blocks: nn.ModuleList) -> None:
    """Fold every delta into its base weight (W' = W + ΔW); afterwards the blocks are plain open_clip."""
    for _, module, attr in adapted_weights(blocks):
        if parametrize.is_parametrized(module, attr):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
