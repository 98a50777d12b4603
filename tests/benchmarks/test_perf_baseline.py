"""benchmarks/perf_baseline.py's glue: the manifests it draws, the epoch times it parses, its JSON line."""

from __future__ import annotations

import json

import pytest

from benchmarks import perf_baseline
from i2p.evaluation.labels import discover
from tests.support.images import make_image_folder


def test_draw_is_balanced_seeded_and_the_manifest_reads_back(tmp_path):
    make_image_folder(tmp_path / "d", "flat", n_per_class=6)
    samples = discover(tmp_path / "d")
    drawn = perf_baseline.draw(samples, 5, seed=3)
    assert drawn == perf_baseline.draw(samples, 5, seed=3) != perf_baseline.draw(samples, 5, seed=4)
    assert [s.label for s in drawn].count(0) == 2 and len(drawn) == 5
    back = discover(perf_baseline.write_manifest(tmp_path / "m" / "x.csv", drawn))
    assert [(s.path.resolve(), s.label) for s in back] == [(s.path.resolve(), s.label) for s in drawn]


def test_epoch_times_come_from_the_progress_lines():
    stamped = [
        (0.0, "data: 4 train / 2 val images"),
        (10.0, "L* = 12/12; trainable parameters 513 / 1"),
        (40.0, "features: validation: 72 images in 7.5 s"),
        (45.0, "epoch 1/2: loss 0.6, val mean AUC 0.9"),
        (50.0, "epoch 2/2: loss 0.5, val mean AUC 0.9"),
    ]
    assert perf_baseline.epoch_times(stamped) == {"epoch_s": [35.0, 5.0], "val_extract_s": 7.5}
    with pytest.raises(ValueError, match="no 'epoch"):
        perf_baseline.epoch_times(stamped[:3])


def test_main_prints_one_json_line_with_both_runs_and_the_ratio(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path / "sid" / "train", n_per_class=4)
    make_image_folder(tmp_path / "sid" / "val", n_per_class=4)
    commands = []

    def fake_run(cmd, env):
        commands.append(cmd)
        views = int(cmd[cmd.index("--feature-views") + 1])
        epoch = 30.0 if views == 3 else 10.0
        return {
            "wall_s": 3 * epoch,
            "epoch_s": [epoch] * 3,
            "val_extract_s": 6.0,
            "mean_epoch_s": epoch,
            "val_auc": 0.9,
        }

    monkeypatch.setattr(perf_baseline, "train_once", fake_run)
    args = [
        "--threads",
        "2",
        "--work",
        str(tmp_path / "w"),
        "--data",
        str(tmp_path / "sid"),
        "--weights",
        "w.pt",
    ]
    result = perf_baseline.main([*args, "--train", "6", "--val", "4"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["epoch_ratio"] == 3.0 and result["uncached_estimate_ratio"] == pytest.approx(3.4)
    assert result["views_3"]["command"].startswith("i2p-train --data")
    assert all("--baseline" in c and c[c.index("--pretrained") + 1] == "w.pt" for c in commands)
    assert len(discover(tmp_path / "w" / "train.csv")) == 6 and len(discover(tmp_path / "w" / "val.csv")) == 4
