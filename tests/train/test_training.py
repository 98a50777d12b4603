"""Training: subspace deltas, layer importance, checkpoints, resume after kill -9, DDP, CLI errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from i2p.train import importance, subspace
from i2p.train.backbone import BackboneError, load_backbone, read_state_dict
from i2p.train.checkpoint import CheckpointError, load_model, read_checkpoint
from i2p.train.cli import train as train_cmd
from i2p.train.model import I2PModel
from tests.support.images import make_image_folder

TINY = ["--model", "i2p-tiny-vit", "--pretrained", "none", "--workers", "0", "--batch-size", "16"]


def tiny_model(layer: int = 3, rank: int = 4, seed: int = 0) -> I2PModel:
    tower, _ = load_backbone("i2p-tiny-vit", "none", seed)
    model = I2PModel(tower, layer)
    model.add_deltas(subspace.choose_bases(model.blocks, rank))
    return model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root, n_per_class=12, size=(72, 64))
    return root


# ---------------------------------------------------------------------------------------------- subspace


# Subspace deltas (bases, branch, merge, gradients): tests/train/test_subspace.py


def test_blocks_after_the_critical_layer_are_dropped():
    model = tiny_model(layer=2)
    assert len(model.blocks) == 2 and model.num_layers == 4


# ---------------------------------------------------------------------------------------------- stage 1


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


# ---------------------------------------------------------------------------------------------- runs


def run_cli(args: list[str]):
    return CliRunner().invoke(train_cmd, args, catch_exceptions=False)


def test_train_writes_checkpoint_profile_and_metrics(tmp_path, data_dir):
    out = tmp_path / "run"
    res = run_cli(["--data", str(data_dir), "--out", str(out), "--epochs", "1", "--rank", "2", *TINY])
    assert res.exit_code == 0, res.output
    assert "trainable parameters" in res.output and "mean" in res.output
    profile = json.loads((out / "layer_importance.json").read_text())
    assert len(profile["scores"]) == 4 and 1 <= profile["layer"] <= 4
    assert (out / "layer_importance.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["val"]) == {"gen_a", "gen_b", "mean"}
    meta, tensors = read_checkpoint(out / "checkpoint.safetensors")
    assert meta["layer"] == profile["layer"] and meta["complete"]
    assert 0 < meta["threshold"] < 1
    assert any(k.startswith("base.") for k in tensors)  # random init: the base is embedded
    # round trip: the reloaded model computes what the saved tensors say
    model, _ = load_model(out / "checkpoint.safetensors")
    assert torch.equal(model.head.fc.weight, tensors["head.fc.weight"])
    # a second run into the same directory refuses to overwrite it
    res = CliRunner().invoke(train_cmd, ["--data", str(data_dir), "--out", str(out), *TINY])
    assert res.exit_code != 0 and "--resume" in res.output


def test_baseline_and_head_only_variants(tmp_path, data_dir):
    for name, extra in {"baseline": ["--baseline"], "probe": ["--rank", "0", "--layer", "2"]}.items():
        out = tmp_path / name
        res = run_cli(["--data", str(data_dir), "--out", str(out), "--epochs", "1", *extra, *TINY])
        assert res.exit_code == 0, res.output
        meta, tensors = read_checkpoint(out / "checkpoint.safetensors")
        assert not any(k.startswith("delta.") for k in tensors)
        assert meta["layer"] == (4 if name == "baseline" else 2)
        assert ("head.proj" in tensors) == (name == "baseline")


def test_truncated_checkpoint_is_a_clear_error(tmp_path, data_dir):
    out = tmp_path / "run"
    run_cli(["--data", str(data_dir), "--out", str(out), "--epochs", "1", "--rank", "2", *TINY])
    ckpt = out / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="checkpoint.safetensors"):
        read_checkpoint(ckpt)


def test_torchscript_weights_are_refused(tmp_path):
    """A TorchScript archive carries code: the backbone loader refuses it instead of running it."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), path)
    with pytest.raises(BackboneError, match="TorchScript"):
        read_state_dict(path)


def _train_cmd(data_dir: Path, out: Path, *extra: str) -> list[str]:
    args = ["--data", str(data_dir), "--out", str(out), "--epochs", "2", "--rank", "2", "--layer", "2", *TINY]
    return [sys.executable, "-m", "i2p.cli", "train", *args, *extra]


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, data_dir):
    """kill -9 a real training process after its first checkpoint; --resume reaches the same result."""
    full = tmp_path / "full"
    subprocess.run(_train_cmd(data_dir, full), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(data_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = killed / "checkpoint.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta, _ = read_checkpoint(ckpt)
    assert not meta["complete"] and meta["epoch"] == 0, f"the kill came too late: {meta['epoch']=}"
    subprocess.run(_train_cmd(data_dir, killed, "--resume"), check=True, capture_output=True)
    a, b = load_file(full / "checkpoint.safetensors"), load_file(ckpt)
    for k in a:
        if k.startswith(("head.", "delta.")):
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    ma, mb = (
        json.loads((full / "metrics.json").read_text()),
        json.loads((killed / "metrics.json").read_text()),
    )
    assert ma["val"] == mb["val"] and ma["threshold"] == pytest.approx(mb["threshold"])


def test_ddp_two_cpu_processes(tmp_path, data_dir):
    out = tmp_path / "ddp"
    args = ["--data", str(data_dir), "--out", str(out), "--epochs", "1", "--rank", "2", "--layer", "2", *TINY]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "i2p.cli",
        "train",
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta, tensors = read_checkpoint(out / "checkpoint.safetensors")
    assert meta["complete"] and meta["layer"] == 2
    assert any(k.endswith(".A") and v.abs().max() > 0 for k, v in tensors.items())  # the deltas trained
