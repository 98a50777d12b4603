"""``i2p eval``: --ckpt and --model take the same --threshold (i2p-detect's rule), and a checkpoint of an
unfinished training run is named as one by ``i2p eval`` and ``i2p-export`` alike.

The --model tests are torch-free (they run in the lean CI venv); the --ckpt ones skip without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from i2p.evaluation.cli import evaluate as evaluate_artifacts_only
from tests.support.fake_artifact import make_artifact
from tests.support.images import make_image_folder

NOT_PROBABILITIES = ["nan", "inf", "-inf", "-0.1", "1.5", "abc", "1e309"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root, n_per_class=2, size=(72, 64))
    return root


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("art") / "m.i2p", size=32, threshold=0.4, fp16=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from tests.support.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), layer=2, rank=2)


def _eval(*args: str, lean: bool = False):
    """``i2p eval ARGS``: the lean install's artifacts-only command, or the full one of ``i2p``."""
    if lean:
        return CliRunner().invoke(evaluate_artifacts_only, ["--workers", "1", *args])
    from i2p.cli import main

    return CliRunner().invoke(main, ["eval", "--workers", "1", *args])


def _refused(res, value: str) -> None:
    """A usage error (exit 2) naming --threshold, before anything loads; no traceback."""
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output + repr(res.exception)
    assert "--threshold" in res.output and "Traceback" not in res.output, res.output
    expected = "is not a valid float" if value == "abc" else "is not a probability in [0, 1]"
    assert expected in res.output, res.output


@pytest.mark.parametrize("value", NOT_PROBABILITIES)
def test_model_path_refuses_a_threshold_that_is_not_a_probability(artifact, data_dir, value):
    res = _eval("--model", str(artifact), "--data", str(data_dir), "--threshold", value, lean=True)
    _refused(res, value)


@pytest.mark.parametrize("value", NOT_PROBABILITIES)
def test_ckpt_path_refuses_the_same_thresholds(checkpoint, data_dir, value):
    res = _eval("--ckpt", str(checkpoint), "--data", str(data_dir), "--threshold", value)
    _refused(res, value)


@pytest.mark.parametrize("value", ["0", "1", "0.25"])
def test_both_paths_take_every_probability(artifact, checkpoint, data_dir, value):
    for source in (["--model", str(artifact)], ["--ckpt", str(checkpoint)]):
        res = _eval(*source, "--data", str(data_dir), "--threshold", value, "--json")
        assert res.exit_code == 0, res.output + repr(res.exception)
        assert json.loads(res.stdout)["threshold"] == float(value)


def _unfinished(checkpoint: Path, out: Path, epochs: int = 3) -> Path:
    """A copy of ``checkpoint`` as a killed run leaves it: complete false, epoch 1 of ``epochs`` done."""
    from tests.train.test_checkpoint import rewrite

    out.mkdir()
    resume = {"complete": False, "epoch": 0, "scheduler": {}, "optimizer_steps": {}}
    edit = lambda m: m | resume | {"config": m["config"] | {"epochs": epochs}}  # noqa: E731
    return rewrite(checkpoint, out / "checkpoint.safetensors", meta=edit)


def test_eval_and_export_both_warn_about_an_unfinished_run(checkpoint, data_dir, tmp_path):
    from i2p.cli import main
    from i2p.train.checkpoint import read_checkpoint, unfinished_run_warning

    ckpt = _unfinished(checkpoint, tmp_path / "killed")
    warning = unfinished_run_warning(ckpt, read_checkpoint(ckpt).meta)
    assert warning == (
        "warning: checkpoint.safetensors is from an unfinished training run (epoch 1 of 3); "
        "i2p-train --resume with the same --out finishes it"
    )
    res = _eval("--ckpt", str(ckpt), "--data", str(data_dir), "--json")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert warning in res.stderr and warning not in res.stdout  # the JSON on stdout stays JSON
    json.loads(res.stdout)
    res = CliRunner().invoke(
        main, ["export", "--ckpt", str(ckpt), "--json", "--engine", "no", "--samples", "4"]
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert warning in json.loads(res.stdout)["notes"]


def test_a_finished_run_has_no_warning(checkpoint, data_dir):
    res = _eval("--ckpt", str(checkpoint), "--data", str(data_dir))
    assert res.exit_code == 0 and "unfinished" not in res.output, res.output


@pytest.mark.parametrize("source", ["model", "ckpt"])
def test_json_stays_valid_with_skipped_files_and_progress_goes_to_stderr(
    artifact, checkpoint, data_dir, tmp_path, source
):
    """An unreadable file is reported on stderr; stdout holds the JSON alone; a log gets an ETA line."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "gen_a" / "0_real" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = ["--model", str(artifact)] if source == "model" else ["--ckpt", str(checkpoint)]
    res = _eval(*model, "--data", str(data), "--json")
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    assert body["metrics"]["mean"]["n"] == 8 and "broken.png" in res.stderr + json.dumps(body["skipped"])
    assert any(line.startswith("evaluating: ") and "ETA" in line for line in res.stderr.splitlines())


def test_the_same_mistake_exits_with_the_same_code_in_every_command(tmp_path, data_dir):
    """A checkpoint given as --model is a bad input file: exit 1 from i2p detect and i2p eval alike."""
    from i2p.cli import main

    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(b"\x02\0\0\0\0\0\0\0{}")
    runs = {
        "detect": CliRunner().invoke(main, ["detect", str(data_dir), "-r", "--model", str(ckpt)]),
        "eval": _eval("--model", str(ckpt), "--data", str(data_dir), lean=True),
    }
    for name, res in runs.items():
        assert res.exit_code == 1 and "training checkpoint" in res.output, (name, res.output)
    misuse = CliRunner().invoke(main, ["detect", str(data_dir), "--model", str(ckpt), "--batch-size", "0"])
    assert misuse.exit_code == 2  # a usage error stays 2
    bad_perturb = _eval("--model", str(ckpt), "--data", str(data_dir), "--perturb", "jpeg:500", lean=True)
    assert bad_perturb.exit_code == 2 and "jpeg takes an integer quality 1..100" in bad_perturb.output
