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


# -- v1: written by the code at ef86020 (tests/fixtures/v1/make_v1.py), before the model-file catalogue and
# the shared schema: operating points, the fused CPU and INT8 models, and the file each automatic choice took.

V1 = Path(__file__).parents[1] / "fixtures" / "v1"
EXPECTED_V1 = json.loads((V1 / "expected.json").read_text())
IMAGES_V1 = [V1 / "images" / name for name in EXPECTED_V1["images"]]


@pytest.mark.parametrize("precision", [None, "fp32", "fp16", "int8"])
def test_v1_artifact_loads_the_same_file_and_gives_the_recorded_probabilities(precision):
    want = EXPECTED_V1["artifact"][str(precision)]
    with Detector(V1 / "artifact", backend="onnxruntime", precision=precision) as det:
        assert (det.backend.model_path.name, det.backend.precision) == (want["model"], want["precision"])
        assert det.threshold == want["threshold"]
        points = {name: det.manifest.point_threshold(name) for name in det.manifest.operating_points}
        assert points == want["operating_points"]
        got = [r.probability for r in det.predict(IMAGES_V1)]
        np.testing.assert_allclose(got, want["probabilities"], rtol=0, atol=1e-6)
        batch = np.stack([preprocess(p, det.manifest.preprocess) for p in IMAGES_V1])
        np.testing.assert_allclose(det.predict_batch(batch), want["predict_batch"], rtol=0, atol=1e-6)


def test_v1_checkpoint_loads_with_its_operating_points_and_gives_the_recorded_logits():
    from i2p.train.checkpoint import load_model

    model, meta = load_model(V1 / "checkpoint.safetensors")
    want = EXPECTED_V1["checkpoint"]
    assert model.layer == want["layer"] and meta.threshold == want["threshold"]
    assert meta.operating_point == want["operating_point"]
    assert json.loads(meta.to_json())["operating_points"] == want["operating_points"]
    x = np.stack([preprocess(p, meta.preprocess) for p in IMAGES_V1])
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, want["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_v1_checkpoint_exports_the_same_model_files_and_outputs(tmp_path):
    from i2p.export.pipeline import ExportOptions, run_export

    out = tmp_path / "v1.i2p"
    run_export(
        ExportOptions(
            ckpt=V1 / "checkpoint.safetensors",
            out=out,
            fp16=True,
            engine="no",
            random_samples=4,
            calib_images=V1 / "calib",
        ),
        echo=lambda _: None,
    )
    old = json.loads((V1 / "artifact" / "manifest.json").read_text())
    new = json.loads((out / "manifest.json").read_text())
    assert new["models"] == old["models"]
    assert (new["operating_point"], new["operating_points"]) == (
        old["operating_point"],
        old["operating_points"],
    )
    for precision in (None, "fp32", "int8"):
        want = EXPECTED_V1["artifact"][str(precision)]
        with Detector(out, backend="onnxruntime", precision=precision) as det:
            assert det.backend.model_path.name == want["model"]
            got = [r.probability for r in det.predict(IMAGES_V1)]
        np.testing.assert_allclose(
            got, want["probabilities"], rtol=0, atol=1e-5 if precision != "int8" else 1e-3
        )
