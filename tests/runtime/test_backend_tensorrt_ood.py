"""The TensorRT backend's OOD glue: with the artifact's ood output the engine's ``ood`` tensor is bound, copied back
and returned as [N, 2] (logit, ood), as the ONNX Runtime backend does. TensorRT is not needed for the glue: a fake
engine (numpy "device" buffers behind the tensor-name calls) stands in; the GPU test runs a real engine."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from i2p.runtime.backends import checked_scores
from i2p.runtime.backends import tensorrt as trt_backend
from i2p.runtime.tensorrt import api
from i2p.runtime.tensorrt.api import EngineBuildError

SIZE = 4


class FakeCuda:
    """pycuda's copies between pinned host arrays and "device" buffers (numpy arrays here)."""

    @staticmethod
    def memcpy_htod_async(dst: np.ndarray, src: np.ndarray, stream: object) -> None:
        dst.reshape(-1)[: src.size] = src.reshape(-1)

    @staticmethod
    def memcpy_dtoh_async(dst: np.ndarray, src: np.ndarray, stream: object) -> None:
        dst.reshape(-1)[:] = src.reshape(-1)[: dst.size]


class FakeExecution:
    """execute_async_v3 computes logit = sum of the input, ood = mean square, into their device buffers."""

    def __init__(self, buffers: dict[str, np.ndarray], ood: bool) -> None:
        self.buffers, self.ood, self.n = buffers, ood, 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.n = shape[0]
        return True

    def execute_async_v3(self, stream: int) -> bool:
        x = self.buffers["image"][: self.n].reshape(self.n, -1)
        self.buffers["logit"][: self.n] = x.sum(1)
        if self.ood:
            self.buffers["ood"][: self.n] = (x**2).mean(1)
        return True


def backend(ood: bool, max_batch: int = 8) -> trt_backend.TensorRTBackend:
    """A TensorRTBackend whose engine, context and stream are the fakes above (no constructor: no GPU)."""
    b = object.__new__(trt_backend.TensorRTBackend)
    names = ["logit", *(["ood"] if ood else [])]
    b.input_name, b.output_name, b.ood_name = "image", "logit", "ood" if ood else None
    b.size, b.max_batch, b._graph, b._closed = SIZE, max_batch, None, False
    b._lock, b._cuda = threading.Lock(), FakeCuda()
    b._context = SimpleNamespace(push=lambda: None, pop=lambda: None)
    b._stream = SimpleNamespace(handle=0, synchronize=lambda: None)
    b._device_buffers = {"image": np.zeros((max_batch, 3, SIZE, SIZE), np.float16)}
    b._device_buffers |= {n: np.full(max_batch, np.nan, np.float16) for n in names}
    b._host = {"image": np.zeros((max_batch, 3, SIZE, SIZE), np.float16)}
    b._host |= {n: np.zeros(max_batch, np.float16) for n in names}
    b._exec = FakeExecution(b._device_buffers, ood)
    return b


def batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(0, 1, (n, 3, SIZE, SIZE)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 5, 8])
def test_infer_returns_logit_and_ood_from_their_bindings(n: int) -> None:
    x = batch(n)
    logits, ood = checked_scores(backend(ood=True).infer(x), n)
    x16 = x.astype(np.float16).astype(np.float32).reshape(n, -1)  # the FP16 input binding
    np.testing.assert_allclose(logits, x16.sum(1), rtol=2e-3, atol=2e-2)
    np.testing.assert_allclose(ood, (x16**2).mean(1), rtol=2e-3)
    assert ood is not None and ood.dtype == np.float32 and logits.dtype == np.float32


def test_without_the_ood_output_infer_returns_logits_only() -> None:
    out = backend(ood=False).infer(batch(3))
    assert out.shape == (3,)
    logits, ood = checked_scores(out, 3)
    assert ood is None and logits.shape == (3,)


def test_an_empty_batch_is_empty() -> None:
    assert backend(ood=True).infer(np.zeros((0, 3, SIZE, SIZE), np.float32)).shape == (0,)


@pytest.mark.parametrize(
    ("names", "inputs", "outputs"),
    [
        (["image", "logit", "probability"], ["image"], ["logit", "ood"]),  # an engine built without it
        (["image", "ood", "probability"], ["image"], ["logit", "ood"]),
        (["pixels", "logit", "ood"], ["pixels"], ["logit", "ood"]),
        (["image", "mask", "logit", "ood"], ["image", "mask"], ["logit", "ood"]),
    ],
)
def test_an_engine_without_the_manifest_s_tensors_is_refused(names, inputs, outputs) -> None:
    with pytest.raises(EngineBuildError, match=r"expected input 'image' and outputs \['logit', 'ood'\]"):
        trt_backend.check_engine_io(Path("e.engine"), names, inputs, "image", outputs)
    trt_backend.check_engine_io(
        Path("e.engine"), ["image", "logit", "ood", "probability"], ["image"], "image", outputs
    )


@pytest.mark.gpu
@pytest.mark.skipif(not api.available(), reason="needs tensorrt, pycuda and an NVIDIA GPU")
def test_a_real_engine_s_ood_matches_onnxruntime(tmp_path: Path) -> None:
    from i2p.runtime import Detector
    from tests.support.corpus import base_image, encode
    from tests.support.fake_artifact import make_artifact

    artifact = make_artifact(tmp_path / "ood.i2p", size=32, ood_threshold=1.05)
    blobs = [encode(base_image(24 + i % 17, 24 + i % 13, seed=i), "PNG") for i in range(12)]
    want = Detector(artifact, backend="onnxruntime", precision="fp32").predict(blobs)
    got = Detector(artifact, backend="tensorrt").predict(blobs)
    for g, w in zip(got, want, strict=True):
        assert g.ood == pytest.approx(w.ood, rel=2e-2) and g.probability == pytest.approx(
            w.probability, abs=2e-2
        )
