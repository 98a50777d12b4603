"""The detector model: truncation at L*, the trainable state, and what keeps a state from loading."""

from __future__ import annotations

import pytest
import torch

from i2p.train.backbone import load_backbone
from i2p.train.model import I2PModel
from tests.support.checkpoints import tiny_model


@pytest.mark.slow
def test_blocks_after_the_critical_layer_are_dropped():
    model = tiny_model(layer=2)
    assert len(model.blocks) == 2 and model.num_layers == 4


@pytest.mark.slow
def test_a_trained_state_loads_into_a_fresh_model_and_nothing_else():
    model = tiny_model(layer=2)
    with torch.no_grad():
        for d in model.deltas.values():
            d.A.normal_()
    state = model.trainable_state()
    fresh = tiny_model(layer=2, rank=0)
    assert fresh.trainable_state_problems(state) == []
    fresh.load_trainable_state(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    deeper = tiny_model(layer=1, rank=0)
    assert any(p.startswith("unexpected delta.1.") for p in deeper.trainable_state_problems(state))
    wrong = state | {"delta.0.attn.in_proj_weight.A": torch.zeros(3, 3)}
    assert fresh.trainable_state_problems(wrong) == [
        "delta.0.attn.in_proj_weight.A has shape (3, 3), the model needs (4, 4)"
    ]


@pytest.mark.parametrize("baseline", [False, True])
def test_forward_features_is_the_cls_token_after_block_l(baseline):
    """The truncated tower's own forward ends in the CLS token (ln_post and proj moved to the head)."""
    tower, _ = load_backbone("i2p-tiny-vit", "none", 0)
    ref = tower.forward_intermediates(
        torch.ones(2, 3, 64, 64),
        indices=[1],
        intermediates_only=True,
        output_fmt="NLC",
        output_extra_tokens=True,
    )["image_intermediates_prefix"][0][:, 0]
    model = I2PModel(tower, 2, baseline=baseline).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(torch.ones(2, 3, 64, 64)), ref, atol=1e-6, rtol=0)
