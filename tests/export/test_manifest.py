"""Operating points round-trip checkpoint -> manifest -> runtime; LoRA and full fine-tuning train, merge and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from i2p.export.export_cli import export
from i2p.runtime import Detector
from i2p.runtime.manifest import ArtifactError, read_manifest
from i2p.train.checkpoint import read_checkpoint
from i2p.train.train_cli import evaluate as eval_cmd
from i2p.train.train_cli import train as train_cmd
from tests.support.training import TINY


def train(data_dir: Path, out: Path, *extra: str) -> Path:
    args = ["--data", str(data_dir), "--out", str(out), "--epochs", "1", "--layer", "2", *TINY, *extra]
    res = CliRunner().invoke(train_cmd, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out / "checkpoint.safetensors"


def export_artifact(ckpt: Path, out: Path) -> Path:
    res = CliRunner().invoke(export, ["--ckpt", str(ckpt), "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_operating_points_round_trip_checkpoint_manifest_runtime(tmp_path, data_dir):
    ckpt = train(data_dir, tmp_path / "run", "--rank", "2", "--target-fpr", "0.05")
    meta = read_checkpoint(ckpt).meta
    points = meta.operating_points
    assert set(points) == {"balanced", "fpr_1pct", "fpr_5pct"}
    assert meta.operating_point == "fpr_5pct" and meta.threshold == points["fpr_5pct"].threshold
    assert points["fpr_5pct"].rule == "max_tpr_at_fpr" and points["fpr_5pct"].target_fpr == 0.05
    assert points["balanced"].rule == "balanced_accuracy" and points["fpr_1pct"].val_fpr <= 0.01
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["operating_point"] == "fpr_5pct"

    art = export_artifact(ckpt, tmp_path / "det.i2p")
    manifest = read_manifest(art)
    assert manifest.operating_points == points and manifest.operating_point == "fpr_5pct"
    assert manifest.threshold == meta.threshold
    for name, point in points.items():
        with Detector(art, backend="onnxruntime", operating_point=name) as det:
            assert det.threshold == point.threshold
    with pytest.raises(ArtifactError, match="no operating point 'fpr_2pct'.*balanced, fpr_1pct, fpr_5pct"):
        Detector(art, backend="onnxruntime", operating_point="fpr_2pct")
    with pytest.raises(ValueError, match="not both"):
        Detector(art, backend="onnxruntime", operating_point="balanced", threshold=0.5)

    # i2p eval picks the same named threshold for the checkpoint and for the deployed artifact
    for source in (["--ckpt", str(ckpt)], ["--model", str(art), "--backend", "onnxruntime"]):
        args = [*source, "--data", str(data_dir), "--operating-point", "balanced", "--json", "--workers", "0"]
        res = CliRunner().invoke(eval_cmd, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["threshold"] == points["balanced"].threshold


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_lora_and_full_fine_tuning_train_merge_and_export(tmp_path, data_dir, adapter):
    ckpt = train(data_dir, tmp_path / adapter, "--adapter", adapter, "--rank", "2", "--lr", "0.01")
    tensors = read_checkpoint(ckpt).tensors
    if adapter == "lora":  # stored in the subspace form: U = B (trained, non-zero), A = identity
        us = [v for k, v in tensors.items() if k.startswith("delta.") and k.endswith(".U")]
        assert us and any(u.abs().sum() > 0 for u in us)
    else:
        assert any(k.startswith("block.1.") for k in tensors) and not any(
            k.startswith("block.2.") for k in tensors
        )
    art = export_artifact(ckpt, tmp_path / f"{adapter}.i2p")
    parity = json.loads((art / "parity.json").read_text())
    assert parity["passed"] if "passed" in parity else all(r["status"] != "fail" for r in parity["reports"])
