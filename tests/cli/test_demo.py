"""The README's main job, end to end: synthetic images -> train -> export --fp16 -> Detector."""

from __future__ import annotations

import json
import os
import shlex

import pytest
from click.testing import CliRunner

from i2p.cli import main
from i2p.demo import MARKER, prepare_out
from i2p.runtime import Detector


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--epochs", "1", "--images", "24", "--json"])
    assert res.exit_code == 0, res.output
    assert "not a useful detector" in res.stderr
    summary = json.loads(res.stdout)  # --json: the summary alone on stdout
    assert summary["artifact"] == str(out / "demo.i2p") and summary["metrics"]["mean"]
    for command in summary["next"]:  # the next commands name this demo's own outputs
        assert command in res.stderr
        assert all(
            os.path.exists(a)
            for a in shlex.split(command)
            if a.startswith(str(out)) and "detections" not in a and "layers" not in a
        )
    assert (os.stat(out / "run" / "checkpoint.safetensors").st_mode & 0o777) == 0o644
    manifest = json.loads((out / "demo.i2p" / "manifest.json").read_text())
    assert {m["path"] for m in manifest["models"]} >= {"model.onnx", "model.fp16.onnx"}
    parity = json.loads((out / "demo.i2p" / "parity.json").read_text())
    assert parity and "fp16" in json.dumps(parity)
    det = Detector(out / "demo.i2p")
    test_files = sorted((out / "data" / "test").rglob("*.png"))
    preds = det.predict(test_files)
    assert len(preds) == len(test_files) and all(p.ok for p in preds)
    # the table the demo printed holds the mean row of the held-out metrics
    assert any(line.startswith("mean ") for line in res.stderr.splitlines())
    # the sample table shows whole paths and a header over every column
    assert any(line.startswith(str(out / "data" / "test")) for line in res.stderr.splitlines())
    assert any(  # degraded-probe AUC columns (robust stage 1) stand between fisher and importance
        line.split()[:4] == ["layer", "probe_auc", "probe_loss", "fisher"]
        and line.split()[-2:] == ["importance", "chosen"]
        for line in res.stderr.splitlines()
    )


def test_demo_refuses_an_out_that_is_not_its_own(tmp_path, monkeypatch):
    """Nothing is deleted: a non-empty directory without the demo's marker, '.', or a file are refused."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    monkeypatch.chdir(precious)
    for out in (str(precious), ".", "notes.txt"):
        res = CliRunner().invoke(main, ["demo", "--out", out])
        assert res.exit_code == 2 and "--out" in res.output, res.output
    assert (precious / "notes.txt").read_text() == "keep me" and sorted(os.listdir(precious)) == ["notes.txt"]


def test_a_previous_demo_output_is_redone_and_other_files_kept(tmp_path):
    out = tmp_path / "demo"
    prepare_out(out)
    (out / "run").mkdir()
    (out / "run" / "old.txt").write_text("stale")
    (out / "mine.txt").write_text("the user's")
    prepare_out(out)  # what the demo does first
    assert sorted(os.listdir(out)) == [MARKER, "mine.txt"]


def test_next_commands_run_as_printed_without_an_activated_venv(tmp_path):
    """The printed commands name the venv's own scripts by absolute path: no PATH, no activation needed."""
    import subprocess
    import sys

    from i2p.demo import next_commands

    out = tmp_path / "with space"
    commands = next_commands(out)
    assert all(
        os.path.isabs(shlex.split(c)[0]) and shlex.split(c)[0].startswith(sys.prefix) for c in commands
    )
    bench = next(c for c in commands if "i2p-bench" in c)
    proc = subprocess.run(  # a shell whose PATH lacks the venv, as after a fresh `python3 -m venv .venv`
        [*shlex.split(bench)[:1], "--help"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 0 and "--batch-sizes" in proc.stdout, proc.stderr
    assert all(str(out.absolute()) in c for c in commands if "--model" in c)
