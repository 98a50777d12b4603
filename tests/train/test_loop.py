"""Training runs (i2p.train.loop): checkpoint, profile and metrics; variants; resume after kill -9; DDP."""

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

from i2p.train.checkpoint import load_model, read_checkpoint
from i2p.train.train_cli import train as train_cmd
from tests.support.training import TINY


def run_cli(args: list[str]):
    return CliRunner().invoke(train_cmd, args, catch_exceptions=False)


@pytest.mark.slow
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
    ckpt = read_checkpoint(out / "checkpoint.safetensors")
    meta, tensors = ckpt.meta, ckpt.tensors
    assert meta.layer == profile["layer"] and meta.complete
    assert 0 < meta.threshold < 1
    assert any(k.startswith("base.") for k in tensors)  # random init: the base is embedded
    # round trip: the reloaded model computes what the saved tensors say
    model, _ = load_model(out / "checkpoint.safetensors")
    assert torch.equal(model.head.fc.weight, tensors["head.fc.weight"])
    # a second run into the same directory refuses to overwrite it
    res = CliRunner().invoke(train_cmd, ["--data", str(data_dir), "--out", str(out), *TINY])
    assert res.exit_code != 0 and "--resume" in res.output


@pytest.mark.slow
def test_baseline_and_head_only_variants(tmp_path, data_dir):
    for name, extra in {"baseline": ["--baseline"], "probe": ["--rank", "0", "--layer", "2"]}.items():
        out = tmp_path / name
        res = run_cli(["--data", str(data_dir), "--out", str(out), "--epochs", "1", *extra, *TINY])
        assert res.exit_code == 0, res.output
        ckpt = read_checkpoint(out / "checkpoint.safetensors")
        meta, tensors = ckpt.meta, ckpt.tensors
        assert not any(k.startswith("delta.") for k in tensors)
        assert meta.layer == (4 if name == "baseline" else 2)
        assert ("head.proj" in tensors) == (name == "baseline")


def _train_cmd(data_dir: Path, out: Path, *extra: str) -> list[str]:
    args = ["--data", str(data_dir), "--out", str(out), "--epochs", "2", "--rank", "2", "--layer", "2", *TINY]
    return [sys.executable, "-m", "i2p.cli", "train", *args, *extra]


@pytest.mark.slow
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
    meta = read_checkpoint(ckpt).meta
    assert not meta.complete and meta.resume.epoch == 0, f"the kill came too late: {meta.resume.epoch=}"
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


@pytest.mark.slow
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
    ckpt = read_checkpoint(out / "checkpoint.safetensors")
    meta, tensors = ckpt.meta, ckpt.tensors
    assert meta.complete and meta.layer == 2
    assert any(k.endswith(".A") and v.abs().max() > 0 for k, v in tensors.items())  # the deltas trained
