"""The README's main job, end to end: synthetic images -> train -> export --fp16 -> Detector."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from i2p.cli import main
from i2p.runtime import Detector


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--epochs", "1", "--images", "24"])
    assert res.exit_code == 0, res.output
    assert "not a useful detector" in res.output
    manifest = json.loads((out / "demo.i2p" / "manifest.json").read_text())
    assert {m["path"] for m in manifest["models"]} >= {"model.onnx", "model.fp16.onnx"}
    parity = json.loads((out / "demo.i2p" / "parity.json").read_text())
    assert parity and "fp16" in json.dumps(parity)
    det = Detector(out / "demo.i2p")
    test_files = sorted((out / "data" / "test").rglob("*.png"))
    preds = det.predict(test_files)
    assert len(preds) == len(test_files) and all(p.ok for p in preds)
    # the table the demo printed holds the mean row of the held-out metrics
    assert any(line.startswith("mean ") for line in res.output.splitlines())
