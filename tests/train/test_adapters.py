"""LoRA and full fine-tuning: start as the base model, train what they claim, merge and reload exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from i2p.train import adapters, subspace
from i2p.train.backbone import load_backbone
from i2p.train.model import I2PModel


def tiny(layer: int = 3) -> I2PModel:
    tower, _ = load_backbone("i2p-tiny-vit", "none", 0)
    model = I2PModel(tower, layer).eval()
    torch.nn.init.normal_(model.head.fc.weight)
    return model


def step(model: I2PModel, x: torch.Tensor) -> None:
    """One SGD step on the trainable parameters, so the adaptation is non-zero."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    F.binary_cross_entropy_with_logits(model(x), torch.tensor([0.0, 1.0])).backward()
    opt.step()


@pytest.mark.slow
def test_lora_starts_at_zero_trains_u_and_v_and_merges_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = tiny()
    before = model(x).detach()
    model.deltas = adapters.attach_lora(model.blocks, rank=2, seed=0)
    assert torch.allclose(model(x), before)  # B = 0: the base function
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".U", ".V")) or n.startswith("head.") for n in names)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".U", ".V")))
    w = model.tower.transformer.width
    assert n_lora == 3 * 2 * 16 * w  # 3 blocks x rank 2 x (in_proj 4w + out_proj 2w + fc 5w + proj 5w)
    step(model, x)
    tuned = model(x).detach()
    assert not torch.allclose(tuned, before)
    state = model.trainable_state()
    model.merge()
    assert all(type(m) is not subspace.LowRankLinear for m in model.modules())
    assert torch.allclose(model(x), tuned, atol=1e-5)
    fresh = tiny()
    fresh.head.fc.weight.data.zero_()
    fresh.load_trainable_state(state)  # the subspace form: U = B, V = Aᵀ, A = I
    assert torch.allclose(fresh(x), tuned, atol=1e-5)
    fresh.deltas = adapters.to_lora(fresh.blocks)  # resuming a LoRA run: U and V train again
    assert all(
        d.U.requires_grad and d.V.requires_grad and not d.A.requires_grad for d in fresh.deltas.values()
    )
    assert torch.allclose(fresh(x), tuned, atol=1e-5)


@pytest.mark.slow
def test_to_lora_refuses_a_subspace_delta_that_has_trained():
    model = tiny()
    model.add_deltas(subspace.choose_bases(model.blocks, 2))
    for d in model.deltas.values():
        torch.nn.init.normal_(d.A)
    try:
        adapters.to_lora(model.blocks)
    except ValueError as e:
        assert "not a LoRA delta" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_full_fine_tuning_trains_every_block_parameter_and_reloads():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = tiny()
    n = adapters.unfreeze(model.blocks)
    assert n == sum(p.numel() for p in model.blocks.parameters()) > 0
    assert all(p.requires_grad for p in model.blocks.parameters())
    step(model, x)
    tuned = model(x).detach()
    state = adapters.block_state(model.blocks)
    assert all(k.startswith("block.") for k in state)
    fresh = tiny()
    fresh.head.load_state_dict(model.head.state_dict())
    assert not torch.allclose(fresh(x), tuned)
    adapters.load_block_state(fresh.blocks, state)
    assert torch.allclose(fresh(x), tuned, atol=1e-6)
