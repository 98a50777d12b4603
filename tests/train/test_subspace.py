"""Subspace deltas: confined to the low-sensitivity directions, a low-rank branch in training, merged exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from i2p.train import subspace
from i2p.train.backbone import load_backbone
from i2p.train.model import I2PModel
from tests.support.checkpoints import tiny_model


def trained_tiny_model() -> I2PModel:
    """A tiny model whose deltas and head are non-zero, as after training."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    for d in model.deltas.values():
        nn.init.normal_(d.A)
    nn.init.normal_(model.head.fc.weight)
    return model


class _Materialized(nn.Module):
    """The textbook formulation W' = W + U A Vᵀ as a parametrization (what training used to run)."""

    def __init__(self, delta: subspace.SubspaceDelta):
        super().__init__()
        self.d = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.d.delta()


def materialized_twin(model: I2PModel) -> I2PModel:
    """A copy of ``model`` running plain open_clip blocks with W' = W + ΔW, sharing nothing with it."""
    twin = copy.deepcopy(model)
    for name, module, attr in subspace.adapted_weights(twin.blocks):
        delta = module._modules.pop(subspace.DELTA)
        module.__class__ = module.base_class
        del module.base_class
        parametrize.register_parametrization(module, attr, _Materialized(delta))
        twin.deltas[name] = delta
    return twin


def test_delta_stays_in_low_sensitivity_subspace():
    model = trained_tiny_model()
    for name, module, attr in subspace.adapted_weights(model.blocks):
        d = model.deltas[name]
        delta = d.delta()
        assert delta.abs().max() > 1e-3  # a real, non-zero delta
        left = torch.eye(d.U.shape[0]) - d.U @ d.U.T
        right = torch.eye(d.V.shape[0]) - d.V @ d.V.T
        assert (left @ delta).abs().max() < 1e-5, name  # column space within span(U_low)
        assert (delta @ right).abs().max() < 1e-5, name  # row space within span(V_low)
        base = getattr(module, attr)
        s = torch.linalg.svdvals(base)
        # U_low, V_low are the least sensitive (smallest singular value) directions of the base weight
        assert torch.allclose(
            torch.linalg.svdvals(d.U.T @ base @ d.V).sort().values, s[-4:].sort().values, atol=1e-4
        )


def test_merge_is_exact_and_leaves_plain_open_clip_modules():
    model = trained_tiny_model()
    expected = {
        name: (getattr(module, attr) + model.deltas[name].delta()).detach().clone()
        for name, module, attr in subspace.adapted_weights(model.blocks)
    }
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        adapted = model(x)
        model.merge()
        merged = model(x)
    for name, module, attr in subspace.adapted_weights(model.blocks):
        torch.testing.assert_close(getattr(module, attr), expected[name], atol=1e-6, rtol=0)
        assert type(module) in (nn.MultiheadAttention, nn.Linear) or type(module).__module__.startswith(
            "torch."
        )
        assert not hasattr(module, subspace.DELTA) and not hasattr(module, "base_class")
    assert not any("delta" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_branch_equals_the_materialized_weight_in_value_and_gradient():
    """y = W x + U(A(Vᵀx)) is the same function as (W + UAVᵀ) x, with the same dL/dA."""
    model = trained_tiny_model()
    twin = materialized_twin(model)
    x = torch.randn(3, 3, 64, 64)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    for name, d in model.deltas.items():
        torch.testing.assert_close(d.A.grad, twin.deltas[name].A.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.head.fc.weight.grad, twin.head.fc.weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_training_forms_no_dense_weight_gradient():
    """Only r x r tensors get gradients; no tensor of a base weight's shape is computed for backward."""
    model = tiny_model().train()
    shapes = {tuple(getattr(m, a).shape) for _, m, a in subspace.adapted_weights(model.blocks)}
    produced = []

    def record(grad: torch.Tensor) -> None:
        produced.append(tuple(grad.shape))

    for p in model.trainable_parameters():
        p.register_hook(record)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert produced and not shapes & set(produced)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".A") or n.startswith("head.") for n in with_grad)
    assert len([n for n in with_grad if n.endswith(".A")]) == 3 * 4  # 4 maps in each of L* = 3 blocks
    assert all(model.deltas[k].A.shape == (4, 4) for k in model.deltas)
    trainable, _ = model.parameter_counts()
    assert trainable == 12 * 16 + 64 * 2 + 64 + 1


@pytest.mark.slow
def test_base_state_dict_keys_do_not_change():
    """The frozen base keeps its names: an embedded or referenced base loads into an adapted tower."""
    plain = tiny_model(rank=0)
    adapted = tiny_model()
    base_keys = set(plain.tower.state_dict())
    adapted_keys = set(adapted.tower.state_dict())
    assert base_keys <= adapted_keys
    assert all(".delta." in k for k in adapted_keys - base_keys)


def test_checkpoint_tensors_round_trip():
    model = trained_tiny_model()
    state = model.trainable_state()
    assert {k.rsplit(".", 1)[1] for k in state if k.startswith("delta.")} == {"U", "V", "A"}
    fresh = tiny_model(rank=0).eval()
    fresh.load_trainable_state(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_attaching_twice_and_unsupported_attention_calls_are_errors():
    model = tiny_model()
    with pytest.raises(TypeError, match="cannot attach"):
        model.add_deltas(subspace.choose_bases(model.blocks, 2))
    attn = model.blocks[0].attn
    x = torch.randn(1, 5, attn.embed_dim)
    with pytest.raises(NotImplementedError, match="self-attention"):
        attn(x, x.clone(), x, need_weights=False)


@pytest.mark.parametrize("as_bool", [True, False])
def test_attention_mask_means_what_it_means_for_multihead_attention(as_bool):
    model = trained_tiny_model()
    plain = copy.deepcopy(model.blocks)
    subspace.merge(plain)
    x = torch.randn(2, 5, model.blocks[0].attn.embed_dim)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    if not as_bool:
        mask = torch.zeros(5, 5).masked_fill(mask, float("-inf"))
    with torch.no_grad():
        want = plain[0].attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        got = model.blocks[0].attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fisher_weighting_changes_the_chosen_directions():
    model = tiny_model(rank=0)
    w = model.blocks[0].mlp.c_fc.weight
    u_plain, _ = subspace.low_sensitivity_bases(w, 4)
    grad_sq = torch.ones(min(w.shape))
    grad_sq[torch.argsort(torch.linalg.svdvals(w))[:4]] = 1e6  # make the smallest directions loss-sensitive
    u_fisher, _ = subspace.low_sensitivity_bases(w, 4, grad_sq)
    overlap = (u_plain.T @ u_fisher).abs().max()
    assert overlap < 1e-3


@pytest.mark.parametrize("baseline", [False, True])
def test_head_only_runs_build_no_graph_through_the_frozen_tower(baseline):
    """rank 0 and the UnivFD baseline: the tower's output carries no autograd history, so backward
    stops at the head and costs nothing in the tower."""
    tower, _ = load_backbone("i2p-tiny-vit", "none", 0)
    model = I2PModel(tower, 4 if baseline else 2, baseline=baseline).train()
    features = model.forward_features(torch.randn(2, 3, 64, 64))
    assert features.grad_fn is None and not features.requires_grad
    model.forward_head(features).sum().backward()
    assert all(p.grad is None for p in model.tower.parameters())
    assert model.head.fc.weight.grad is not None
