"""Head-only training on cached tower features (i2p.train.features): the same result as running the tower
every epoch, the tower run once per image per view, bad files, resume, the option, and DDP sharding."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from safetensors.torch import load_file

from i2p.train import data as data_mod
from i2p.train import features, loop
from i2p.train.backbone import load_backbone, preprocess_spec
from i2p.train.checkpoint import read_checkpoint
from i2p.train.config import TrainConfig
from i2p.train.distributed import Placement
from i2p.train.model import I2PModel
from i2p.train.train_cli import train as train_cmd
from tests.support.images import make_image_folder
from tests.support.training import TINY

TINY_CFG = dict(
    model="i2p-tiny-vit",
    pretrained="none",
    device="cpu",
    workers=0,
    batch_size=8,
    epochs=2,
    baseline=True,
    lr=0.05,
)


@pytest.fixture
def tower_calls(monkeypatch) -> dict[str, int]:
    """Images through the tower, split by whether autograd was recording (i.e. the tower trains)."""
    calls = {"no_grad": 0, "grad": 0}
    forward = I2PModel.forward_features

    def counting(self, x):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += len(x)
        return forward(self, x)

    monkeypatch.setattr(I2PModel, "forward_features", counting)
    return calls


def _run(out: Path, data: Path, **kw) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = TrainConfig(data=str(data), out=str(out), **{**TINY_CFG, **kw})
    loop.train(cfg)
    return load_file(out / "checkpoint.safetensors"), json.loads((out / "metrics.json").read_text())


def _assert_same_run(a, b) -> None:
    (ta, ma), (tb, mb) = a, b
    for k in ta:
        if k.startswith("head."):
            torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-5, msg=k)
    assert ma["val"].keys() == mb["val"].keys()
    for g in ma["val"]:
        assert ma["val"][g] == pytest.approx(mb["val"][g], abs=1e-6), g
    assert ma["threshold"] == pytest.approx(mb["threshold"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{"baseline": True}, {"baseline": False, "rank": 0, "layer": "2"}])
def test_as_many_views_as_epochs_equals_running_the_tower_every_epoch(
    tmp_path, data_dir, monkeypatch, variant
):
    """--feature-views >= --epochs: the same head and metrics as the per-epoch image path; 1 view differs."""
    cached = _run(tmp_path / "cached", data_dir, feature_views=2, **variant)
    one_view = _run(tmp_path / "one", data_dir, feature_views=1, **variant)
    monkeypatch.setattr(features, "frozen_tower", lambda model: False)  # today's path: the tower every step
    uncached = _run(tmp_path / "uncached", data_dir, **variant)
    _assert_same_run(cached, uncached)
    diff = (one_view[0]["head.fc.weight"] - uncached[0]["head.fc.weight"]).abs().max()
    assert diff > 1e-3  # one reused view is a different augmentation from epoch 2 on


@pytest.mark.slow
def test_the_tower_runs_once_per_image_per_view_and_validation_once(tmp_path, data_dir, tower_calls):
    cfg = TrainConfig(
        data=str(data_dir), out=str(tmp_path / "r"), **{**TINY_CFG, "epochs": 3, "feature_views": 2}
    )
    splits = loop.load_splits(cfg, preprocess_spec(cfg.model).max_pixels, Placement(torch.device("cpu")))
    loop.train(cfg)
    n_train, n_val = len(splits.train), len(splits.val)
    assert tower_calls == {"no_grad": 2 * n_train + n_val, "grad": 0}  # views 0 and 1; epoch 3 reuses view 0


@pytest.mark.slow
def test_full_fine_tuning_and_deltas_still_train_through_the_tower(tmp_path, data_dir, tower_calls):
    for name, kw in {"full": {"adapter": "full"}, "deltas": {"rank": 2}}.items():
        tower_calls.update(grad=0)
        tensors, _ = _run(tmp_path / name, data_dir, baseline=False, layer="2", epochs=1, **kw)
        assert tower_calls["grad"] > 0, name  # every step runs the tower with autograd on
        prefix = "block." if name == "full" else "delta."
        assert any(k.startswith(prefix) for k in tensors), name


@pytest.mark.slow
def test_an_undecodable_training_image_is_skipped_each_epoch_with_todays_message(tmp_path):
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    make_image_folder(train_dir, n_per_class=12, size=(72, 64))
    make_image_folder(val_dir, n_per_class=4, size=(72, 64), seed=1)
    jpg = next(p for p in sorted(train_dir.rglob("*.jpg")))
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])  # header intact: passes the scan, fails to decode
    args = ["--data", str(train_dir), "--val", str(val_dir), "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(train_cmd, [*args, "--baseline", "--epochs", "2", *TINY, "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    skipped = [line for line in res.output.splitlines() if line.startswith(f"skipped {jpg}: ")]
    assert len(skipped) == 2 and "truncated" in skipped[0]  # 48 images, batches of 8: none dropped
    assert read_checkpoint(tmp_path / "run" / "checkpoint.safetensors").meta.complete


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["subspace", "full"])  # --baseline ignores --adapter full, resumed too
def test_resume_reextracts_and_matches_an_uninterrupted_run(tmp_path, data_dir, monkeypatch, adapter):
    full = _run(tmp_path / "full", data_dir, feature_views=2, adapter=adapter)
    end_epoch = loop._end_epoch

    def end_then_die(run, epoch, *args):
        end_epoch(run, epoch, *args)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(loop, "_end_epoch", end_then_die)
    kw = {**TINY_CFG, "feature_views": 2, "adapter": adapter}
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "killed"), **kw)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg)
    assert read_checkpoint(tmp_path / "killed" / "checkpoint.safetensors").meta.resume.epoch == 0
    monkeypatch.setattr(loop, "_end_epoch", end_epoch)
    loop.train(cfg, resume=True)  # epoch 2 must train on view 1, extracted afresh
    resumed = load_file(tmp_path / "killed" / "checkpoint.safetensors")
    assert resumed.keys() == full[0].keys()  # no block tensors: the tower stayed frozen
    _assert_same_run(full, (resumed, json.loads((tmp_path / "killed" / "metrics.json").read_text())))


def test_feature_views_round_trips_through_the_checkpoint_and_is_checked(tmp_path, data_dir):
    cfg = TrainConfig(data="d", feature_views=3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "feature_views"}  # a checkpoint from before
    assert TrainConfig.from_dict(old).feature_views == 1
    with pytest.raises(ValueError, match="--feature-views"):
        TrainConfig(data="d", feature_views=0)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        train_cmd,
        [
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--baseline",
            "--epochs",
            "1",
            "--feature-views",
            "3",
            *TINY,
        ],
    )
    assert res.exit_code == 0, res.output
    assert read_checkpoint(out / "checkpoint.safetensors").meta.config["feature_views"] == 3
    res = CliRunner().invoke(train_cmd, ["--data", str(data_dir), "--feature-views", "0", *TINY])
    assert res.exit_code != 0 and "--feature-views must be >= 1" in res.output


# ---------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrainConfig(data=folder, **{**TINY_CFG, "batch_size": 4})
    tower, _ = load_backbone(cfg.model, cfg.pretrained, cfg.seed)
    model = I2PModel(tower, 4, baseline=True)
    images = data_mod.ImageDataset(
        data_mod.discover(folder), preprocess_spec(cfg.model), cfg.augment, cfg.seed
    )
    images.set_epoch(1)
    seen = []
    forward = model.forward_features
    model.forward_features = lambda x: seen.append(len(x)) or forward(x)
    sharded = features.extract(model, images, cfg, Placement(torch.device("cpu"), rank, world), "test")
    ran = sum(seen)
    alone = features.extract(model, images, cfg, Placement(torch.device("cpu")), "test")
    Path(out, f"{rank}.json").write_text(
        json.dumps(
            {
                "ran": ran,
                "max_diff": float((sharded.values - alone.values).abs().max()),
                "bad": sharded.bad == alone.bad and list(sharded.bad),
                "n": len(images),
            }
        )
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_extract_their_share_and_all_receive_every_feature(tmp_path):
    folder = tmp_path / "d"
    make_image_folder(folder, "flat", n_per_class=5, size=(72, 64))
    jpg = next(p for p in sorted(folder.rglob("*.jpg")))
    jpg.write_bytes(jpg.read_bytes()[:200])  # decodes on no rank
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(folder), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["n"] == 10 and r0["ran"] + r1["ran"] == 9  # each image once across the ranks, the bad one never
    assert r0["ran"] in (4, 5) and r1["ran"] in (4, 5)
    assert (
        r0["max_diff"] < 1e-5 and r1["max_diff"] < 1e-5
    )  # every rank holds every row, as one process computes it
    assert r0["bad"] and r0["bad"] == r1["bad"]  # and every rank knows the bad file


@pytest.mark.slow
def test_ddp_baseline_run_trains_the_same_head_as_one_process(tmp_path, data_dir):
    """Two gloo ranks, each half of every global batch, on all-gathered features: one process's head."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--data", str(data_dir), "--epochs", "2", "--baseline", "--feature-views", "2", "--lr", "0.05"]
    args += [*TINY, "--device", "cpu", "--out", str(tmp_path / "ddp")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    res = subprocess.run([*cmd, "-m", "i2p.cli", "train", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    one = _run(tmp_path / "one", data_dir, batch_size=16, feature_views=2)
    ddp = load_file(tmp_path / "ddp" / "checkpoint.safetensors")
    _assert_same_run(one, (ddp, json.loads((tmp_path / "ddp" / "metrics.json").read_text())))
