"""The frozen backbone: built through open_clip's public API, weights read without unpickling code."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from i2p.train.backbone import BackboneError, build_tower, load_backbone, read_state_dict

TINY = "i2p-tiny-vit"


def test_torchscript_weights_are_refused(tmp_path):
    """A TorchScript archive carries code: the backbone loader refuses it instead of running it."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), path)
    with pytest.raises(BackboneError, match="TorchScript"):
        read_state_dict(path)


def test_weights_that_are_not_a_state_dict_are_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(BackboneError, match="not a state dict"):
        read_state_dict(path)


def test_full_model_and_visual_only_weights_load_the_same(tmp_path):
    tower, _ = load_backbone(TINY, "none", seed=3)
    sd = {k: v.contiguous() for k, v in tower.state_dict().items()}
    save_file(
        {f"visual.{k}": v for k, v in sd.items()} | {"logit_scale": torch.ones(())},
        tmp_path / "full.safetensors",
    )
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    for name in ("full.safetensors", "ddp.pt"):
        loaded, info = load_backbone(TINY, str(tmp_path / name))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items()), name
        assert info.num_layers == 4 and info.width == 64 and info.pretrained.endswith(name)


def test_wrongly_shaped_weights_name_the_file_and_the_tensor(tmp_path):
    sd = dict(build_tower(TINY).state_dict()) | {"ln_pre.weight": torch.zeros(32)}
    path = tmp_path / "w.safetensors"
    save_file(sd, path)
    with pytest.raises(
        BackboneError, match=r"w.safetensors: weights do not fit i2p-tiny-vit: ln_pre.weight \(32,\)"
    ):
        load_backbone(TINY, str(path))


def test_unknown_or_unsupported_models_are_refused():
    with pytest.raises(BackboneError, match="unknown model .no-such-model.: not an open_clip model"):
        build_tower("no-such-model")
    with pytest.raises(BackboneError, match="only plain open_clip ViT"):
        build_tower("RN50")
