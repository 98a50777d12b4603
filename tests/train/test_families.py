"""Backbone families: every family's tower, through the one interface, behaves as I2P needs.

Parametrized over ``MODELS`` (timm style): a new family adds its small random-weight config here. Each is
the real architecture shrunk through its library's own arguments (``train/model_configs/``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from i2p.runtime.manifest import Manifest
from i2p.train import adapters, backbones, subspace
from i2p.train.backbone import BackboneError, load_backbone, preprocess_spec
from i2p.train.checkpoint import load_model, read_checkpoint
from i2p.train.metadata import CheckpointError
from i2p.train.model import I2PModel
from tests.support.checkpoints import make_checkpoint

# (model, family, pool, linear maps of block 0)
PLAIN = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
MODELS = [
    (
        "i2p-tiny-vit",
        "open_clip",
        "cls",
        ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"],
    ),
    ("i2p-tiny-dinov2", "timm", "cls", PLAIN),
    ("i2p-tiny-dinov2-reg", "timm", "cls", PLAIN),  # 4 register tokens, layer scale
    ("i2p-tiny-dinov3", "timm", "cls", PLAIN),  # Eva: RoPE, 4 registers, layer scale
    (
        "i2p-tiny-eva02",
        "timm",
        "cls",
        ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"],
    ),
    ("i2p-tiny-siglip2", "open_clip_timm", "mean", PLAIN),  # no class token
    ("i2p-tiny-pe-core", "open_clip_timm", "cls", PLAIN),  # Eva: RoPE
]
NAMES = [m[0] for m in MODELS]


def image(model: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    family = backbones.for_model(model)
    size = family.image_size(family.build(model))
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("model", "family", "pool", "maps"), MODELS, ids=NAMES)
def test_the_family_records_itself_and_finds_each_blocks_linear_maps(model, family, pool, maps):
    tower, info = load_backbone(model, "none", 0)
    assert (info.family, info.pool) == (family, pool)
    assert info.num_layers == len(backbones.for_tower(tower).blocks(tower)) >= 3
    names = [n for n, _, _ in subspace.adapted_weights(backbones.for_tower(tower).blocks(tower))]
    assert names[: len(maps)] == [f"0.{m}" for m in maps]
    assert len(names) == len(maps) * info.num_layers


@pytest.mark.parametrize("model", NAMES)
def test_stage1_features_after_block_k_are_what_the_model_truncated_at_k_computes(model):
    """forward_intermediates (stage 1) and prune_intermediate_layers (the model) agree on every block."""
    x = image(model)
    tower, info = load_backbone(model, "none", 0)
    family = backbones.for_tower(tower)
    with torch.no_grad():
        features = family.layer_features(tower, x)
        assert len(features) == info.num_layers
        for k in range(1, info.num_layers + 1):
            truncated = I2PModel(load_backbone(model, "none", 0)[0], k).eval()
            assert len(truncated.blocks) == k
            torch.testing.assert_close(truncated.forward_features(x), features[k - 1], atol=1e-6, rtol=0)
    assert not torch.allclose(features[0], features[-1])  # the blocks do something


@pytest.mark.parametrize("model", NAMES)
def test_every_adapted_map_is_one_the_forward_runs(model):
    """A delta on any one map changes the output: no map's weight is read around its module (EVA-02's
    fused q/v bias did that, so its branch would have merged without ever training)."""
    x = image(model)
    net = I2PModel(load_backbone(model, "none", 0)[0], 2).eval()
    torch.nn.init.normal_(net.head.fc.weight)
    net.add_deltas(subspace.choose_bases(net.blocks, 2))
    with torch.no_grad():
        base = net(x)
        for name, delta in net.deltas.items():
            delta.A.fill_(1.0)
            assert (net(x) - base).abs().max() > 1e-6, name
            delta.A.zero_()


@pytest.mark.slow
@pytest.mark.parametrize("model", NAMES)
@pytest.mark.parametrize("adapter", ["subspace", "lora", "full"])
def test_each_adapter_trains_merges_exactly_and_reloads(model, adapter):
    torch.manual_seed(0)
    x = image(model)
    net = I2PModel(load_backbone(model, "none", 0)[0], 2).eval()
    torch.nn.init.normal_(net.head.fc.weight)
    before = net(x).detach()
    if adapter == "subspace":
        net.add_deltas(subspace.choose_bases(net.blocks, 2))
    elif adapter == "lora":
        net.deltas = adapters.attach_lora(net.blocks, 2, seed=0)
    else:
        net.tune_blocks()
    torch.testing.assert_close(net(x).detach(), before)  # every adapter starts at the base function
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(0.05 * torch.randn_like(p))
    tuned = net(x).detach()
    assert (tuned - before).abs().max() > 1e-3
    state = net.trainable_state()
    fresh = I2PModel(load_backbone(model, "none", 0)[0], 2).eval()
    assert fresh.trainable_state_problems(state) == []
    fresh.load_trainable_state(state)
    torch.testing.assert_close(fresh(x).detach(), tuned, atol=1e-5, rtol=0)
    net.merge()
    torch.testing.assert_close(net(x).detach(), tuned, atol=1e-5, rtol=0)
    for _, module, _ in subspace.adapted_weights(net.blocks):  # the library's own classes again
        assert type(module).__module__.startswith(("torch.", "open_clip", "timm"))


@pytest.mark.parametrize("model", NAMES)
def test_checkpoint_round_trip_records_family_and_pool(tmp_path, model):
    ckpt = make_checkpoint(tmp_path, layer=2, backbone=model)
    meta = read_checkpoint(ckpt).meta
    _, info = load_backbone(model, "none", 0)
    assert (meta.backbone.family, meta.backbone.pool) == (info.family, info.pool)
    loaded, _ = load_model(ckpt)
    assert len(loaded.blocks) == 2 and loaded.pool == info.pool
    x = image(model)
    with torch.no_grad():
        assert torch.isfinite(loaded(x)).all()


@pytest.mark.parametrize("model", NAMES)
def test_a_local_weights_file_loads_and_one_that_does_not_fit_is_named(tmp_path, model):
    tower, _ = load_backbone(model, "none", 3)
    sd = {k: v.contiguous() for k, v in tower.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded, info = load_backbone(model, str(tmp_path / name), 0)
        assert info.pretrained == str(tmp_path / name)
        for k, v in loaded.state_dict().items():
            torch.testing.assert_close(v, sd[k], atol=0, rtol=0)
    prefix = backbones.for_tower(tower).block_prefix()
    broken = {k: v for k, v in sd.items() if not k.startswith(f"{prefix}1.")}
    broken["extra.weight"] = torch.zeros(2)
    save_file(broken, tmp_path / "bad.safetensors")
    with pytest.raises(BackboneError, match=rf"missing \['{prefix}1\..*1 unexpected \['extra.weight'\]"):
        load_backbone(model, str(tmp_path / "bad.safetensors"), 0)


@pytest.mark.parametrize(
    ("model", "resize", "interpolation", "crop_pct"),
    [
        ("i2p-tiny-vit", "shortest", "bicubic", 1.0),
        ("i2p-tiny-dinov2", "shortest", "bicubic", 1.0),
        ("i2p-tiny-dinov3", "shortest", "bicubic", 1.0),
        ("i2p-tiny-siglip2", "squash", "bicubic", 1.0),  # open_clip's resize_mode
        ("i2p-tiny-pe-core", "squash", "bilinear", 1.0),
        ("i2p-tiny-eva02", "shortest", "bicubic", 0.9),  # timm's crop_pct
    ],
)
def test_the_spec_reproduces_the_librarys_own_evaluation_transform(model, resize, interpolation, crop_pct):
    """The spec comes from the model's own data config and the runtime's preprocessing equals the
    library's transform (torchvision on PIL) on images of several sizes and aspect ratios."""
    import open_clip
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from i2p.runtime.preprocess import preprocess

    spec = preprocess_spec(model)
    assert (spec.resize, spec.interpolation, spec.crop_pct) == (resize, interpolation, crop_pct)
    family = backbones.for_model(model)
    if family.name == "timm":
        cfg = resolve_data_config(
            {"input_size": (3, spec.size, spec.size)}, model=family.build(model, "meta")
        )
        transform = create_transform(**cfg)
    else:
        transform = open_clip.image_transform(
            spec.size, False, spec.mean, spec.std, resize_mode=resize, interpolation=interpolation
        )
    rng = np.random.default_rng(0)
    for w, h in [(97, 71), (50, 200), (300, 300), (641, 479), (30, 31)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = transform(img).numpy()
        got = preprocess(img, spec)
        assert got.shape == want.shape, (w, h)
        assert np.abs(got - want).max() < 1e-6, (w, h)


def test_data_configs_the_runtime_cannot_reproduce_are_refused_before_training(tmp_path, monkeypatch):
    """A library config asking for another resize mode, filter or crop fraction: refused naming the model
    and the field, so no checkpoint records preprocessing export would refuse."""
    import open_clip

    from i2p.train.backbones import timm_vit

    tiny = json.loads((timm_vit.CONFIG_DIR / "i2p-tiny-vit.json").read_text())
    for name, pp, why in [
        ("i2p-test-longest", {"resize_mode": "longest"}, r"resize must be one of \['shortest', 'squash'\]"),
        ("i2p-test-nearest", {"interpolation": "nearest"}, "interpolation must be one of"),
    ]:
        (tmp_path / f"{name}.json").write_text(json.dumps({**tiny, "preprocess_cfg": pp}))
        open_clip.add_model_config(tmp_path / f"{name}.json")
        with pytest.raises(BackboneError, match=rf"{name}: open_clip's preprocess config .*{why}"):
            preprocess_spec(name)
    dinov2 = timm_vit.configs()["i2p-tiny-dinov2"]
    overlays = {
        "i2p-test-border": (
            {"crop_mode": "border"},
            "crop_mode 'border'; the runtime reproduces 'center', 'squash'",
        ),
        "i2p-test-pct": ({"crop_pct": 0.3}, r"timm's data config .*crop_pct must be in \[0.5, 1\], got 0.3"),
        "i2p-test-lanczos": ({"interpolation": "lanczos"}, "interpolation must be one of"),
    }
    configs = {
        name: {**dinov2, "timm_kwargs": {**dinov2["timm_kwargs"], "pretrained_cfg_overlay": overlay}}
        for name, (overlay, _) in overlays.items()
    }
    monkeypatch.setattr(timm_vit, "configs", lambda: configs)  # i2p configs as if shipped in model_configs/
    for name, (_, why) in overlays.items():
        with pytest.raises(BackboneError, match=rf"{name}: .*{why}"):
            preprocess_spec(name)


def test_unknown_models_and_non_vit_timm_towers_are_refused():
    with pytest.raises(BackboneError, match="unknown model 'no_such_net'"):
        load_backbone("no_such_net", "none")
    with pytest.raises(BackboneError, match="timm builds a ResNet; supported are VisionTransformer, Eva"):
        load_backbone("resnet18", "none")
    assert isinstance(backbones.for_model("vit_small_patch14_dinov2"), backbones.Family)
    with pytest.raises(BackboneError, match="not a tower of a supported backbone family"):
        backbones.for_tower(nn.Linear(2, 2))


def test_pool_is_checked_and_checkpoints_before_families_read_as_open_clip_cls():
    from tests.fixtures.v0 import __file__ as v0

    meta = read_checkpoint(Path(v0).parent / "checkpoint.safetensors").meta
    assert (meta.backbone.family, meta.backbone.pool) == ("open_clip", "cls")
    for bad in ("max", "", "CLS"):
        with pytest.raises(CheckpointError, match="field 'pool' must be one of"):
            dataclasses.replace(meta.backbone, pool=bad)
    manifest = json.loads((Path(v0).parent / "artifact" / "manifest.json").read_text())
    assert "pool" not in manifest and Manifest.from_dict(manifest).pool == "cls"


@pytest.mark.slow  # ~6 s for the first case under load (a real i2p-train run), ~1 s after
@pytest.mark.parametrize("model", ["i2p-tiny-dinov2", "i2p-tiny-siglip2"])  # class token; mean-pooled patches
def test_baseline_trains_a_linear_probe_on_the_frozen_final_features_of_a_family(tmp_path, data_dir, model):
    """``--baseline`` ("Simplicity Prevails" probe, UnivFD recipe) on a timm family: the whole tower stays
    frozen at its random init, its final norm is the head's, and only the linear layer trains."""
    from click.testing import CliRunner

    from i2p.train.train_cli import train as train_cmd
    from tests.support.training import TINY

    out = tmp_path / "probe"
    args = ["--data", str(data_dir), "--out", str(out), "--epochs", "1", "--baseline"]
    res = CliRunner().invoke(train_cmd, [*args, *TINY, "--model", model], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ckpt = read_checkpoint(out / "checkpoint.safetensors")
    meta = ckpt.meta
    assert meta.baseline and meta.layer == meta.num_layers == 3
    assert (meta.backbone.model, meta.backbone.family) == (
        model,
        "timm" if "dinov2" in model else "open_clip_timm",
    )
    assert not any(k.startswith("delta.") for k in ckpt.tensors)
    trained, _ = load_model(out / "checkpoint.safetensors")
    fresh = I2PModel(load_backbone(model, "none", 0)[0], 3, baseline=True)
    for name, value in fresh.state_dict().items():  # tower and final norm: the frozen init, bit for bit
        if not name.startswith("head.fc."):
            assert torch.equal(trained.state_dict()[name], value), name
    assert not torch.equal(trained.head.fc.weight, fresh.head.fc.weight)  # the probe trained
