"""The Triton repository of an artifact with the OOD output: ood and uncertain from network to ensemble, and an
old artifact's ensemble that says it has none (configs checked without a server; the served ensemble is in
test_triton_server_ood.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from i2p.export.triton import TritonOptions, write_repository
from i2p.runtime import Detector
from i2p.runtime.backends import checked_scores
from i2p.runtime.manifest import read_manifest
from i2p.runtime.serving import VERDICT, decode_batch, ood_verdicts, verdicts
from tests.support.corpus import base_image, encode
from tests.support.fake_artifact import make_artifact

OOD_THRESHOLD = 0.79  # between the fake network's scores on these images, so both flags occur


def config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def repository(tmp_path: Path, backend: str, ood: bool) -> Path:
    artifact = make_artifact(
        tmp_path / "a.i2p", size=32, threshold=0.4, ood_threshold=OOD_THRESHOLD if ood else None
    )
    write_repository(
        tmp_path / "repo", artifact, read_manifest(artifact), TritonOptions(backend=backend), False
    )
    return tmp_path / "repo"


@pytest.mark.parametrize("backend", ["python", "onnxruntime", "tensorrt"])
def test_the_ensemble_returns_ood_and_uncertain_wired_from_the_network(tmp_path, backend):
    repo = repository(tmp_path, backend, ood=True)
    top = config(repo, "i2p")
    assert [(o.name, o.data_type, list(o.dims)) for o in top.output] == [
        ("probability", mc.TYPE_FP32, [1]),
        ("label", mc.TYPE_STRING, [1]),
        ("error", mc.TYPE_STRING, [1]),
        ("ood", mc.TYPE_FP32, [1]),
        ("uncertain", mc.TYPE_BOOL, [1]),
    ]
    assert float(top.parameters["ood_threshold"].string_value) == OOD_THRESHOLD
    post = config(repo, "i2p_postprocess")
    assert float(post.parameters["ood_threshold"].string_value) == OOD_THRESHOLD
    network = config(repo, "i2p_network")
    assert [o.name for o in network.output] == ["logit", "ood"]
    if backend != "python":  # [batch] from the ONNX/TensorRT network, as the logit
        assert all(list(o.dims) == [1] and list(o.reshape.shape) == [] for o in network.output)
    available = {"image"}  # every step reads tensors made before it, and declares what it maps
    for step in top.ensemble_scheduling.step:
        model = config(repo, step.model_name)
        assert set(step.input_map) == {i.name for i in model.input}
        assert set(step.input_map.values()) <= available
        assert set(step.output_map) <= {o.name for o in model.output}
        assert not set(step.output_map.values()) & available  # each tensor is made once
        available |= set(step.output_map.values())
    assert {o.name for o in top.output} <= available
    assert dict(top.ensemble_scheduling.step[1].output_map) == {"logit": "logit", "ood": "ood_score"}


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_an_artifact_without_the_ood_output_says_so(tmp_path, backend):
    repo = repository(tmp_path, backend, ood=False)
    top = config(repo, "i2p")
    assert [o.name for o in top.output] == list(VERDICT)
    assert top.parameters["ood_threshold"].string_value == "absent"
    assert "ood_threshold" not in config(repo, "i2p_postprocess").parameters
    assert [i.name for i in config(repo, "i2p_postprocess").input] == ["logit", "decode_error"]
    assert [o.name for o in config(repo, "i2p_network").output] == ["logit"]


def test_server_steps_compute_the_detector_s_ood_and_uncertain(tmp_path):
    """decode_batch + network + verdicts + ood_verdicts on bytes == Detector.predict, errors included."""
    artifact = make_artifact(tmp_path / "a.i2p", size=32, threshold=0.4, ood_threshold=OOD_THRESHOLD)
    detector = Detector(artifact, backend="onnxruntime", precision="fp32")
    blobs = [encode(base_image(40 + 7 * i, 30 + 3 * i, seed=i), "JPEG" if i % 2 else "PNG") for i in range(8)]
    blobs.insert(3, b"\x89PNG\r\n\x1a\nnot really")
    pixels, errors = decode_batch(blobs, detector.spec)
    logits, ood = checked_scores(detector.backend.infer(pixels), len(blobs))
    assert ood is not None
    _, labels, reasons = verdicts(logits, errors, detector.threshold, ood)
    scores, flags = ood_verdicts(ood, reasons, detector.ood_threshold)
    expected = detector.predict(blobs)
    assert {p.uncertain for p in expected if p.ok} == {True, False}
    for p, label, score, flag in zip(expected, labels, scores, flags, strict=True):
        if p.ok:
            assert (label, float(score), bool(flag)) == (p.label, p.ood, p.uncertain)
        else:
            assert np.isnan(score) and not flag and label == ""
