"""Files written by the previous version (tests/fixtures/v0, made by its ``make_v0.py`` at commit 1ad9450)
still load, and give the outputs recorded when they were written.

Tolerances are float32 round-off (thread counts change reduction order), far below any real change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from i2p.runtime import Detector
from i2p.runtime.preprocess import preprocess

V0 = Path(__file__).parents[1] / "fixtures" / "v0"
EXPECTED = json.loads((V0 / "expected.json").read_text())
IMAGES = [V0 / "images" / name for name in EXPECTED["images"]]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_v0_artifact_loads_and_gives_the_recorded_probabilities(precision):
    want = EXPECTED["artifact"][precision]
    with Detector(V0 / "artifact", backend="onnxruntime", precision=precision) as det:
        assert det.threshold == want["threshold"]
        got = [r.probability for r in det.predict(IMAGES)]
        np.testing.assert_allclose(got, want["probabilities"], rtol=0, atol=1e-6)
        batch = np.stack([preprocess(p, det.manifest.preprocess) for p in IMAGES])
        np.testing.assert_allclose(det.predict_batch(batch), want["predict_batch"], rtol=0, atol=1e-6)


def test_v0_checkpoint_loads_and_gives_the_recorded_logits():
    from i2p.train.checkpoint import load_model

    model, meta = load_model(V0 / "checkpoint.safetensors")
    want = EXPECTED["checkpoint"]
    assert model.layer == want["layer"] and meta.threshold == want["threshold"]
    x = np.stack([preprocess(p, meta.preprocess) for p in IMAGES])
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, want["logits"], rtol=0, atol=1e-5)


def test_v0_checkpoint_exports_to_the_recorded_artifact_outputs(tmp_path):
    from i2p.export.pipeline import ExportOptions, run_export

    out = tmp_path / "v0.i2p"
    run_export(
        ExportOptions(ckpt=V0 / "checkpoint.safetensors", out=out, engine="no", random_samples=4),
        echo=lambda _: None,
    )
    with Detector(out, backend="onnxruntime") as det:
        got = [r.probability for r in det.predict(IMAGES)]
    np.testing.assert_allclose(got, EXPECTED["artifact"]["fp32"]["probabilities"], rtol=0, atol=1e-5)
