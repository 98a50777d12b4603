"""Stage 1: the layer-choice rule, the importance profile, and per-block CLS features through open_clip's API."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from i2p.train import importance
from i2p.train.backbone import load_backbone
from i2p.train.model import I2PModel


def test_choose_layer_prefers_the_shallowest_within_tolerance():
    assert importance.choose_layer([0.2, 0.96, 1.0, 0.97], 0.05) == 2
    assert importance.choose_layer([0.2, 0.90, 1.0, 0.97], 0.05) == 3
    assert importance.choose_layer([0.2, 0.90, 1.0, 0.97], 0.0) == 3


def test_profile_finds_the_discriminative_layer():
    g = torch.Generator().manual_seed(0)
    n, width = 200, 16
    y = (torch.arange(n) % 2).float()
    feats = torch.randn(4, n, width, generator=g)
    feats[2, :, :4] += 3.0 * y[:, None]  # only block 3 separates the classes
    vy = (torch.arange(n) % 2).float()
    vfeats = torch.randn(4, n, width, generator=g)
    vfeats[2, :, :4] += 3.0 * vy[:, None]
    p, probe = importance.profile((feats, y), (vfeats, vy), "auto", 0.05)
    assert [s.layer for s in p.scores] == [1, 2, 3, 4]
    assert p.layer == 3
    assert p.scores[2].probe_auc > 0.95 and max(s.probe_auc for i, s in enumerate(p.scores) if i != 2) < 0.75
    assert importance.probe_logits(probe, vfeats[2]).shape == (n,)
    assert importance.profile((feats, y), (vfeats, vy), "last")[0].layer == 4
    assert importance.profile((feats, y), (vfeats, vy), 2)[0].layer == 2


def test_block_features_are_the_cls_token_after_each_block():
    """Stage 1's features at block k == the detector truncated at k (two open_clip entry points)."""
    tower, _ = load_backbone("i2p-tiny-vit", "none", seed=0)
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    feats, labels = importance.block_cls_features(
        tower, [(x[:4], y[:4]), (x[4:], y[4:])], torch.device("cpu")
    )
    assert feats.shape == (4, 6, 64) and labels.tolist() == y.float().tolist()
    for k in (1, 3):
        with torch.no_grad():
            cls = I2PModel(copy.deepcopy(tower), k).eval().forward_features(x)
        torch.testing.assert_close(feats[k - 1], cls, atol=1e-5, rtol=0)
    table = importance.importance_table(importance.profile((feats, labels), (feats, labels), "last")[0])
    *rows, cost = table.splitlines()
    assert rows[-1].endswith("<- L*") and cost.startswith("L* = 4/4: keeps 100%")


def test_robust_rule_prefers_the_layer_that_keeps_its_separation_under_degradation(tmp_path):
    """Block 2 separates clean images best but loses it on the degraded copies; block 3 keeps most of it."""
    g = torch.Generator().manual_seed(0)
    n, width = 300, 16
    y = (torch.arange(n) % 2).float()

    def feats(block2: float, block3: float) -> torch.Tensor:
        x = torch.randn(4, n, width, generator=g)
        x[1, :, :4] += block2 * y[:, None]
        x[2, :, :4] += block3 * y[:, None]
        return x

    calib, val = (feats(3.0, 2.5), y), (feats(3.0, 2.5), y)
    degraded = {"jpeg:75": (feats(0.0, 2.0), y), "blur:1": (feats(0.2, 2.0), y)}
    clean, _ = importance.profile(calib, val, "auto", 0.05, degraded, rule="clean")
    robust, probe = importance.profile(calib, val, "auto", 0.05, degraded, rule="robust")
    assert clean.layer == 2 and clean.criterion == "clean"
    assert robust.layer == 3 and robust.criterion == "robust"
    assert robust.scores[1].degraded_auc["jpeg:75"] < 0.65 < robust.scores[2].degraded_auc["jpeg:75"]
    assert clean.scores[1].degraded_auc == robust.scores[1].degraded_auc  # measured either way
    assert importance.profile(calib, val, "auto", 0.05, None, rule="robust")[0].criterion == "clean"
    back = importance.ImportanceProfile.from_dict(json.loads(json.dumps(robust.to_dict())))
    assert back == robust
    json_path, png_path = robust.save(tmp_path)
    assert png_path.stat().st_size > 1000
    assert "auc jpeg:75" in importance.importance_table(robust).splitlines()[0]


def test_the_stored_layer_rule_is_a_constant_that_checkpoints_already_hold():
    """The text the v1 fixture (written before the constant) stores; editing the module docstring changes nothing."""
    from pathlib import Path

    from i2p.train.checkpoint import read_checkpoint

    v1 = Path(__file__).parents[1] / "fixtures" / "v1" / "checkpoint.safetensors"
    stored = read_checkpoint(v1).meta.importance["rule"]
    assert stored == importance.LAYER_RULE
    profile = importance.ImportanceProfile((), 1, "auto", 0.0, 1, 1)
    assert profile.to_dict()["rule"] == stored


@pytest.mark.slow
def test_the_profile_is_written_under_python_OO():
    """``-OO`` drops docstrings: the old to_dict sliced the module docstring and crashed there."""
    import subprocess
    import sys

    code = (
        "from i2p.train.importance import ImportanceProfile, LAYER_RULE\n"
        "assert ImportanceProfile((), 1, 'auto', 0.0, 1, 1).to_dict()['rule'] == LAYER_RULE\n"
    )
    subprocess.run([sys.executable, "-OO", "-c", code], check=True, timeout=120)


def test_truncated_speed_is_measured_block_by_block():
    """Blocks that cost 1, 2, 3 units: cutting after block k keeps the fixed cost plus blocks 1..k."""
    import time as time_mod

    class Sleep(torch.nn.Module):
        def __init__(self, seconds: float) -> None:
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            time_mod.sleep(self.seconds)
            return x

    blocks = [Sleep(0.01), Sleep(0.02), Sleep(0.03)]
    tower = torch.nn.Sequential(Sleep(0.01), *blocks)  # 0.01 s of "embedding" before the blocks
    speed = importance.truncated_speed(blocks, lambda: tower(torch.zeros(1)))
    assert len(speed) == 3 and speed[-1] == pytest.approx(1.0, abs=0.02)
    assert speed[0] == pytest.approx(0.07 / 0.02, rel=0.3) and speed[0] > speed[1] > speed[2]
    assert importance.truncated_speed(blocks[:2], lambda: blocks[0](0)) == ()  # not every block ran


def test_the_table_names_the_cost_of_the_pick_and_its_faster_alternative():
    scores = tuple(
        importance.LayerScore(i, 0.0, auc, 0.1, 0.0, {"jpeg:75": auc - 0.01})
        for i, auc in enumerate([0.7, 0.9, 0.985, 0.99], start=1)
    )
    p = importance.ImportanceProfile(scores, 4, "auto", 0.0, 10, 10, "robust", (3.2, 1.9, 1.3, 1.0))
    alt = p.faster_alternative()
    assert alt is not None and alt.layer == 3  # within 0.01 worst-case AUC of L*
    table = importance.importance_table(p)
    assert "Faster alternative: `--layer 3`: 1.30x faster, worst-case AUC -0.0050" in table
    assert table.splitlines()[0].split()[-4:] == ["compute", "speed", "importance", "chosen"]
    back = importance.ImportanceProfile.from_dict(p.to_dict())
    assert back == p  # stored in the checkpoint with the profile
    old = {k: v for k, v in p.to_dict().items() if k != "relative_speed"}
    assert importance.ImportanceProfile.from_dict(old).relative_speed == ()  # older checkpoints load
    assert "fewer blocks" in importance.importance_table(importance.ImportanceProfile.from_dict(old))
    first = importance.ImportanceProfile(scores, 1, "fixed", 0.0, 10, 10, "robust")
    assert first.faster_alternative() is None and "shallowest" in first.cost_line()
