"""Low-sensitivity subspace tuning: a trainable delta confined to the least sensitive directions of W.

For a linear map W (out × in) with SVD W = U S Vᵀ, every singular direction i gets a sensitivity
score — its singular value s_i (how much the pretrained function moves along it), optionally times
sqrt(F_i), the root-mean-square loss gradient projected on that direction (Fisher-style weighting).
The ``rank`` least sensitive directions give frozen bases U_low (out × r) and V_low (in × r), and the
only trainable tensor is A (r × r, zero at start):

    W' = W + ΔW,   ΔW = U_low · A · V_lowᵀ

ΔW lies in span(U_low) ⊗ span(V_low) by construction, and merging is exact: W' is a plain matrix.

Training never forms ΔW: the delta runs as a separate low-rank branch, y = W x + b + U_low (A (V_lowᵀ x)),
so autograd's only weight gradient is dL/dA = U_lowᵀ G (X V_low) (r × r), never the dense dL/dW of a
materialized W' (the cost that made subspace tuning as slow as full fine-tuning). The branch is attached
by swapping the adapted module's class for a subclass whose forward adds it (the mechanism
``torch.nn.utils.parametrize`` uses), so the base weights keep their names and state-dict keys;
``merge`` folds ΔW into W and restores the plain class.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

DELTA = "delta"  # the branch's submodule name on an adapted module


class SubspaceDelta(nn.Module):
    """The branch x -> U_low A V_lowᵀ x, i.e. x ΔWᵀ for row-vector activations."""

    def __init__(self, u_low: torch.Tensor, v_low: torch.Tensor):
        super().__init__()
        self.register_buffer("U", u_low.contiguous())
        self.register_buffer("V", v_low.contiguous())
        self.A = nn.Parameter(torch.zeros(u_low.shape[1], v_low.shape[1], dtype=u_low.dtype))

    def delta(self) -> torch.Tensor:
        """ΔW = U_low A V_lowᵀ (out × in): for merging and inspection, never in training."""
        return self.U @ self.A @ self.V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(F.linear(x, self.V.T), self.A), self.U)


class LowRankLinear(nn.Linear):
    """nn.Linear plus its subspace branch: y = x Wᵀ + b + delta(x)."""

    delta: SubspaceDelta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)


class LowRankMultiheadAttention(nn.MultiheadAttention):
    """Self-attention with a subspace branch on the packed QKV projection (the out_proj has its own).

    Covers what open_clip's vision blocks call: self-attention (query is key is value), no key padding
    mask, no attention weights returned; anything else is an error rather than a silent difference.
    """

    delta: SubspaceDelta

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if (
            key is not query
            or value is not query
            or key_padding_mask is not None
            or need_weights
            or is_causal
        ):
            raise NotImplementedError(
                "subspace attention supports self-attention without key_padding_mask, need_weights or is_causal"
            )
        x = query if self.batch_first else query.transpose(0, 1)  # [B, S, E]
        b, s, e = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias) + self.delta(x)
        q, k, v = qkv.view(b, s, 3, self.num_heads, e // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=_additive_mask(attn_mask, b, self.num_heads, q.dtype),
            dropout_p=self._dropout(),
        )
        out = self.out_proj(o.transpose(1, 2).reshape(b, s, e))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0


def _additive_mask(
    mask: torch.Tensor | None, batch: int, heads: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """nn.MultiheadAttention's mask ([L, S] or [B*H, L, S]; True = blocked) as an additive SDPA mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.view(batch, heads, *mask.shape[1:]) if mask.dim() == 3 else mask.to(dtype)


LOW_RANK_CLASSES: dict[str, type[nn.Module]] = {
    "in_proj_weight": LowRankMultiheadAttention,
    "weight": LowRankLinear,
}


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


def linear_maps(block: nn.Module) -> list[tuple[str, str]]:
    """(module path, weight name) of every linear map of a block, in module order: each nn.Linear, and
    nn.MultiheadAttention's packed QKV projection (its out_proj is an nn.Linear).

    Found by type, so every family's block layout is covered as its library defines it: open_clip's
    attn.in_proj / attn.out_proj / mlp.c_fc / mlp.c_proj, timm's attn.qkv / attn.proj / mlp.fc1 / mlp.fc2,
    an Eva's separate q/k/v projections and SwiGLU's fc1_g / fc1_x / fc2.
    """
    maps = []
    for path, module in block.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            maps.append((path, "in_proj_weight"))
        elif isinstance(module, nn.Linear):
            maps.append((path, "weight"))
    return maps


def adapted_weights(blocks: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, weight attribute) for every adapted linear map in ``blocks``."""
    for i, block in enumerate(blocks):
        for path, attr in linear_maps(block):
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
    """Add a zero-initialized low-rank branch on the given bases to every adapted map."""
    deltas = {}
    for name, module, attr in adapted_weights(blocks):
        low_rank = LOW_RANK_CLASSES[attr]
        if not isinstance(module, low_rank.__bases__[0]) or hasattr(module, DELTA):
            raise TypeError(f"{name}: cannot attach a subspace branch to this {type(module).__name__}")
        deltas[name] = SubspaceDelta(*bases[name])
        module.add_module(DELTA, deltas[name])
        module.base_class = type(module)  # restored by merge
        module.__class__ = low_rank
    return deltas


@torch.no_grad()
def merge(blocks: nn.ModuleList) -> None:
    """Fold every branch into its base weight (W' = W + ΔW); afterwards the blocks are the library's own."""
    for _, module, attr in adapted_weights(blocks):
        delta = getattr(module, DELTA, None)
        if delta is None:
            continue
        weight = getattr(module, attr)
        weight.add_(delta.delta().to(weight.dtype))
        del module._modules[DELTA]
        module.__class__ = module.base_class
        del module.base_class
