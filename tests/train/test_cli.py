"""i2p-train as a command: options refused before torch loads, no empty --out left by a failed run,
--json (progress on stderr, the final metadata alone on stdout), checkpoints readable by others (0644);
``i2p eval --model`` without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from i2p.train.train_cli import train as train_cmd
from tests.support.fake_artifact import make_artifact
from tests.support.training import TINY, training_folder

# torch cannot load in this interpreter: argv[1] names the command of i2p.train.train_cli, the rest its arguments
NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "open_clip"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    from i2p.train import train_cli
    getattr(train_cli, sys.argv[1])(sys.argv[2:])
    """
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "-1"], "rank must be >= 0"),
        (["--epochs", "0"], "epochs and batch size >= 1"),
        (["--layer", "middle"], "--layer must be auto, last or a block number"),
        (["--sensitivity", "magic"], "'magic' is not one of"),
    ],
)
def test_options_are_refused_before_torch_loads(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_TORCH,
            "train",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            *TINY,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "blocked" not in proc.stderr and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return training_folder(tmp_path_factory, n_per_class=8)


def test_a_failed_run_leaves_no_empty_out(tmp_path: Path) -> None:
    empty = tmp_path / "no-images"
    empty.mkdir()
    out = tmp_path / "run"
    res = CliRunner().invoke(train_cmd, ["--data", str(empty), "--out", str(out), *TINY])
    assert res.exit_code == 1 and "Traceback" not in res.output and not out.exists(), res.output
    out.mkdir()  # a directory the user made is theirs: it stays
    res = CliRunner().invoke(train_cmd, ["--data", str(empty), "--out", str(out), *TINY])
    assert res.exit_code == 1 and out.is_dir()


@pytest.mark.slow
def test_json_prints_the_metadata_alone_and_the_checkpoint_is_shared(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "run"
    args = ["--data", str(data_dir), "--out", str(out), "--epochs", "1", "--rank", "2", "--json", *TINY]
    res = CliRunner().invoke(train_cmd, args)
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)
    assert 1 <= meta["layer"] <= 4 and 0 < meta["threshold"] < 1
    assert "stage 1" in res.stderr
    assert (os.stat(out / "checkpoint.safetensors").st_mode & 0o777) == 0o644


@pytest.mark.slow
def test_stage_1_shows_progress_on_a_terminal(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from i2p.base.progress import Progress
    from i2p.train.train_cli import layers

    monkeypatch.setattr(Progress, "_isatty", lambda self: True)  # stderr "is" a terminal
    res = CliRunner().invoke(layers, ["--data", str(data_dir), "--out", str(tmp_path / "l"), *TINY])
    assert res.exit_code == 0, res.output
    assert "stage 1: calibration features" in res.stderr and "stage 1: validation features" in res.stderr
    assert "\r\x1b[K" in res.stderr and "ETA" in res.stderr  # redrawn in place, with its ETA


def test_eval_of_an_artifact_runs_without_torch(tmp_path: Path, data_dir: Path) -> None:
    """``i2p eval --model`` is the lean runtime's: it runs, and refuses a non-artifact cleanly, with torch blocked."""
    artifact = make_artifact(tmp_path / "fake.i2p")

    def run(model: Path) -> subprocess.CompletedProcess:
        args = [sys.executable, "-c", NO_TORCH, "evaluate", "--model", str(model), "--data", str(data_dir)]
        return subprocess.run([*args, "--perturb", "jpeg:75"], capture_output=True, text=True, timeout=120)

    proc = run(artifact)
    assert proc.returncode == 0, proc.stderr
    assert "jpeg:75" in proc.stdout and "mean" in proc.stdout and "threshold" in proc.stdout
    proc = run(data_dir)  # a folder of images, not an artifact: one message, no traceback
    assert proc.returncode == 1 and "manifest.json" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "blocked" not in proc.stderr


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_eval_precision_picks_the_model_file_and_says_which(
    tmp_path: Path, data_dir: Path, precision: str
) -> None:
    """``--precision`` measures that file of the artifact (FP32 vs the CPU default INT8, say) and names it."""
    from i2p.train.train_cli import evaluate

    artifact = make_artifact(tmp_path / "fake.i2p")
    args = ["--model", str(artifact), "--data", str(data_dir), "--precision", precision, "--json"]
    res = CliRunner().invoke(evaluate, args)
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    assert body["precision"] == precision and body["backend"].startswith("onnxruntime")


def test_eval_precision_missing_from_the_artifact_is_a_clear_error(tmp_path: Path, data_dir: Path) -> None:
    from i2p.train.train_cli import evaluate

    artifact = make_artifact(tmp_path / "fake.i2p")
    args = ["--model", str(artifact), "--data", str(data_dir), "--precision", "int8"]
    res = CliRunner().invoke(evaluate, args)
    assert res.exit_code == 1 and "no int8 CPU model" in res.output, res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(
        evaluate, ["--ckpt", str(artifact / "manifest.json"), "--data", str(data_dir), "--precision", "fp32"]
    )
    assert res.exit_code == 2 and "--precision picks a model file of --model" in res.output, res.output
