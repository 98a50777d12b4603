"""The ONNX Runtime backend: provider order and options, I/O checks, concurrent ``run``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from i2p.base.files import cache_root
from i2p.runtime.backends.onnxruntime import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    OnnxRuntimeBackend,
    auto_providers,
    model_input_shape,
)
from tests.support.concurrency import run_in_threads
from tests.support.fake_artifact import build_model, make_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact") / "fake.i2p")


def test_provider_order_prefers_tensorrt_then_cuda_then_cpu(tmp_path: Path) -> None:
    assert auto_providers(available=[CPU_EP]) == [CPU_EP]
    assert auto_providers(device=2, available=[CPU_EP, CUDA_EP]) == [(CUDA_EP, {"device_id": 2}), CPU_EP]
    providers = auto_providers(
        device=1,
        precision="fp16",
        available=[CPU_EP, CUDA_EP, TENSORRT_EP],
        engine_cache=tmp_path / "engines",
        input_shape=("image", 32, 3, 224, 224),
    )
    assert [p if isinstance(p, str) else p[0] for p in providers] == [TENSORRT_EP, CUDA_EP, CPU_EP]
    trt = providers[0][1]
    assert trt["device_id"] == 1 and trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert (tmp_path / "engines").is_dir()
    assert trt["trt_profile_min_shapes"] == "image:1x3x224x224"
    assert trt["trt_profile_max_shapes"] == trt["trt_profile_opt_shapes"] == "image:32x3x224x224"
    shape = ("image", 8, 3, 224, 224)
    fp32 = auto_providers(precision="fp32", available=[TENSORRT_EP, CPU_EP], input_shape=shape)
    assert fp32[0][1]["trt_fp16_enable"] is False


def test_the_tensorrt_ep_always_gets_a_batch_profile(artifact: Path) -> None:
    """Without one, ORT's TensorRT EP builds an engine for every new batch size."""
    with pytest.raises(ValueError, match="pass input_shape"):
        auto_providers(available=[TENSORRT_EP, CPU_EP])
    assert model_input_shape(artifact / "model.onnx", 16) == ("image", 16, 3, 32, 32)


def test_cache_root_follows_i2p_cache_dir_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("I2P_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "i2p"
    monkeypatch.setenv("I2P_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_infer_returns_the_logit_output(artifact: Path) -> None:
    backend = OnnxRuntimeBackend(artifact / "model.onnx", threads=1)
    assert backend.name == "onnxruntime[CPUExecutionProvider]" and not backend.on_gpu
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    logits = backend.infer(x)
    assert logits.shape == (5,) and logits.dtype == np.float32
    logit, prob = backend.session.run(["logit", "probability"], {"image": x})
    np.testing.assert_array_equal(logits, logit)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), prob, rtol=1e-6)


def batch_with_outliers(rng: np.random.Generator) -> np.ndarray:
    """Four ordinary inputs and, in various places, inputs with a far wider range (a hostile batch-mate)."""
    x = rng.uniform(-1, 1, (7, 3, 32, 32)).astype(np.float32)
    x[[1, 4]] *= 50
    x[6] = 0
    return x


def test_int8_scores_do_not_depend_on_batch_mates(tmp_path: Path) -> None:
    """Dynamic INT8 takes one activation scale per call: the backend calls it per image, so batching is exact."""
    artifact = make_artifact(tmp_path / "q.i2p", int8=True)
    backend = OnnxRuntimeBackend(artifact / "model.int8.onnx", threads=1, precision="int8")
    for seed in range(3):
        x = batch_with_outliers(np.random.default_rng(seed))
        alone = np.concatenate([backend.infer(x[i : i + 1]) for i in range(len(x))])
        np.testing.assert_array_equal(backend.infer(x), alone)
        np.testing.assert_array_equal(backend.infer(x[::-1]), alone[::-1])
        (one_call,) = backend.session.run(["logit"], {"image": x})  # what a batched call would give
        assert np.abs(one_call - alone).max() > 1e-3  # the hazard is real for this model
    fp32 = OnnxRuntimeBackend(artifact / "model.onnx", threads=1)
    (one_call,) = fp32.session.run(["logit"], {"image": x})
    np.testing.assert_array_equal(fp32.infer(x), one_call)  # FP32 keeps batched calls


def test_unloadable_or_wrong_models_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(RuntimeError, match="junk.onnx: ONNX Runtime cannot load this model"):
        OnnxRuntimeBackend(tmp_path / "junk.onnx")
    model = build_model(32)
    model.graph.output[0].name = "score"
    model.graph.node[4].output[0] = "score"
    onnx.save(model, tmp_path / "renamed.onnx")
    with pytest.raises(RuntimeError, match=r"no 'logit' output \(outputs: \['score', 'probability'\]\)"):
        OnnxRuntimeBackend(tmp_path / "renamed.onnx", output_name="logit")
    backend = OnnxRuntimeBackend(tmp_path / "renamed.onnx")  # no name given: the model's first output
    assert backend.output_name == "score" and not backend.accepts_images and backend.max_batch is None
    with pytest.raises(RuntimeError, match="accepts_images=False"):
        backend.infer_images([])


def test_concurrent_run_is_thread_safe(artifact: Path) -> None:
    """ONNX Runtime documents InferenceSession.run as thread-safe; check it on our session options."""
    backend = OnnxRuntimeBackend(artifact / "model.fp16.onnx", precision="fp16")
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((int(rng.integers(1, 9)), 3, 32, 32), dtype=np.float32) for _ in range(64)]
    serial = [backend.infer(b) for b in batches]
    out = run_in_threads(lambda i: backend.infer(batches[i]), len(batches), threads=8, rounds=5)
    for a, b in zip(out, serial, strict=True):
        np.testing.assert_array_equal(a, b)
