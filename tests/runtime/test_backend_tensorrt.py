"""The TensorRT backend and its parts (``i2p.runtime.tensorrt``): engine cache keys, sidecars and lookup, the
ONNX rewrite for TensorRT 8.5, the FP32 pinning, errors without TensorRT, CUDA graph capture (pycuda and a
GPU), and (where TensorRT, pycuda and a GPU exist) the engine against ONNX Runtime on the CPU.

Runtime-only: nothing here imports torch, open_clip or ``i2p.export`` (a Jetson with the runtime and the
``[gpu]`` extras runs this file).

GPU tolerance: |engine logit - ONNX Runtime FP32 logit| <= 0.05 + 2% of |logit| for the FP16 engine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from i2p import kernels
from i2p.base.files import sha256_file
from i2p.runtime.backends import tensorrt as trt_backend
from i2p.runtime.manifest import Manifest, ModelFile, TensorSpec
from i2p.runtime.preprocess import PreprocessSpec
from i2p.runtime.tensorrt import api
from i2p.runtime.tensorrt import engine_build as build
from i2p.runtime.tensorrt.api import EngineBuildError, TensorRTUnavailableError, graphs_supported
from i2p.runtime.tensorrt.cache import (
    EngineKey,
    engine_mismatch,
    engine_name,
    engine_source,
    lookup,
    sidecar_path,
    timing_cache_name,
    write_engine,
)
from i2p.runtime.tensorrt.graph import CudaGraph
from i2p.runtime.tensorrt.layernorm import decompose_layernorm
from tests.support.fake_artifact import detector_graph

SHA = "ab" * 32
KEY = EngineKey(
    gpu="NVIDIA Jetson AGX Orin",
    compute_capability=(8, 7),
    tensorrt="10.3.0",
    precision="fp16",
    onnx_sha256=SHA,
    input_size=224,
    max_batch=32,
    opt_batch=8,
)


def _trt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Engine names and sidecars


def test_engine_name_follows_the_artifact_contract() -> None:
    name = engine_name("NVIDIA Jetson AGX Orin", (8, 7), "10.3.0", "fp16", SHA)
    assert name == f"nvidia-jetson-agx-orin_sm87_trt10.3.0_fp16_{SHA[:12]}.engine"
    assert KEY.filename == name


def test_engine_names_differ_for_every_key_field() -> None:
    base = ("NVIDIA H100 80GB HBM3", (9, 0), "10.15.1", "fp16", SHA)
    variants = [
        ("NVIDIA A100-SXM4-80GB", (9, 0), "10.15.1", "fp16", SHA),
        ("NVIDIA H100 80GB HBM3", (8, 9), "10.15.1", "fp16", SHA),
        ("NVIDIA H100 80GB HBM3", (9, 0), "8.5.2.2", "fp16", SHA),
        ("NVIDIA H100 80GB HBM3", (9, 0), "10.15.1", "fp32", SHA),
        ("NVIDIA H100 80GB HBM3", (9, 0), "10.15.1", "fp16", "cd" * 32),
    ]
    names = {engine_name(*base), *(engine_name(*v) for v in variants)}
    assert len(names) == 1 + len(variants)
    assert all(re.fullmatch(r"[a-z0-9-]+_sm\d+_trt[0-9.]+_fp(16|32)_[0-9a-f]{12}\.engine", n) for n in names)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("gpu", (8, 7), "10.3.0", "int8", SHA), "precision"),
        (("gpu", (8, 7), "10.3.0", "fp16", "not-a-sha"), "sha256"),
        (("gpu", (8, 7), "10.3/../x", "fp16", SHA), "version"),
    ],
)
def test_engine_name_rejects_bad_fields(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine_name(*args)


def _engine(tmp_path: Path, key: EngineKey = KEY, data: bytes = b"\x00serialized engine\xff" * 100) -> Path:
    path = tmp_path / "engines" / key.filename
    write_engine(path, data, key)
    return path


def test_a_freshly_written_engine_verifies(tmp_path: Path) -> None:
    path = _engine(tmp_path)
    assert engine_mismatch(path, KEY) is None
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["sha256"] == sha256_file(path) and meta["format"] == "i2p-tensorrt-engine"
    assert meta["gpu"] == KEY.gpu and tuple(meta["compute_capability"]) == (8, 7)
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_a_tampered_engine_is_detected(tmp_path: Path) -> None:
    path = _engine(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert "does not match the sha256" in engine_mismatch(path, KEY)
    path.write_bytes(bytes(data[:-10]))  # truncated
    assert "does not match the sha256" in engine_mismatch(path, KEY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gpu", "NVIDIA GeForce RTX 4090"),
        ("compute_capability", (8, 9)),
        ("tensorrt", "10.4.0"),
        ("precision", "fp32"),
        ("onnx_sha256", "cd" * 32),
        ("input_size", 336),
    ],
)
def test_an_engine_built_for_something_else_is_rejected(tmp_path: Path, field: str, value: object) -> None:
    path = _engine(tmp_path, KEY.__class__(**{**KEY.__dict__, field: value}))
    reason = engine_mismatch(tmp_path / "engines" / path.name, KEY)
    assert reason is not None and field in reason


def test_max_batch_larger_engines_serve_smaller_batches(tmp_path: Path) -> None:
    path = _engine(tmp_path)
    assert engine_mismatch(path, EngineKey(**{**KEY.__dict__, "max_batch": 16, "opt_batch": 4})) is None
    assert "max_batch=32" in engine_mismatch(path, EngineKey(**{**KEY.__dict__, "max_batch": 64}))


def test_missing_or_broken_sidecars_are_reasons_to_rebuild(tmp_path: Path) -> None:
    assert engine_mismatch(tmp_path / "none.engine", KEY) == "no engine built yet"
    path = _engine(tmp_path)
    side = sidecar_path(path)
    side.write_text("{not json")
    assert "unreadable" in engine_mismatch(path, KEY)
    side.write_text(json.dumps({"format": "something-else", **KEY.__dict__, "sha256": sha256_file(path)}))
    assert "not an i2p engine sidecar" in engine_mismatch(path, KEY)
    side.unlink()
    assert "missing" in engine_mismatch(path, KEY)


# --------------------------------------------------------------------------------------------------
# Which ONNX file an engine is built from


def _manifest(
    models: tuple[ModelFile, ...], files: dict[str, str] | None = None, size: int = 224
) -> Manifest:
    return Manifest(
        name="t",
        backbone="ViT-B-16",
        layer=2,
        num_layers=12,
        threshold=0.5,
        preprocess=PreprocessSpec(size=size),
        inputs=(TensorSpec("image", "float32", ("batch", 3, size, size)),),
        outputs=(
            TensorSpec("logit", "float32", ("batch",)),
            TensorSpec("probability", "float32", ("batch",)),
        ),
        models=models,
        files=files or {},
    )


FP32, FP16 = ModelFile("model.onnx", "fp32"), ModelFile("model.fp16.onnx", "fp16")


def test_engine_source_depends_on_the_tensorrt_version() -> None:
    both = _manifest((FP32, FP16))
    assert engine_source(both, "10.3.0") == FP16  # strongly typed: precision from the graph
    assert engine_source(both, "11.4.1") == FP16
    assert engine_source(both, "8.5.2.2") == FP32  # weak typing: FP32 graph + BuilderFlag.FP16
    assert engine_source(_manifest((FP16,)), "8.6.1") == FP16
    with pytest.raises(EngineBuildError, match="re-export with i2p-export --fp16"):
        engine_source(_manifest((FP32,)), "10.3.0")


# --------------------------------------------------------------------------------------------------
# TensorRT 8.5: LayerNormalization rewritten into elementary ops


def _layernorm_model(bias: bool = True) -> bytes:
    rng = np.random.default_rng(0)
    width = 16
    inits = [
        numpy_helper.from_array(rng.normal(1, 0.2, width).astype(np.float32), "ln.weight"),
        numpy_helper.from_array(rng.normal(0, 0.2, (width, 1)).astype(np.float32), "head.weight"),
    ]
    ln_inputs = ["x", "ln.weight"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.2, width).astype(np.float32), "ln.bias"))
        ln_inputs.append("ln.bias")
    nodes = [
        helper.make_node("Flatten", ["image"], ["x"], "/flatten", axis=1),
        helper.make_node(
            "LayerNormalization", ln_inputs, ["y"], "/ln/LayerNormalization", axis=-1, epsilon=1e-5
        ),
        helper.make_node("MatMul", ["y", "head.weight"], ["z"], "/head/MatMul"),
        helper.make_node("Flatten", ["z"], ["logit2d"], "/flatten2", axis=0),
        helper.make_node("Squeeze", ["logit2d", "zero"], ["logit"], "/squeeze"),
    ]
    inits.append(numpy_helper.from_array(np.asarray([0], np.int64), "zero"))
    graph = helper.make_graph(
        nodes,
        "ln",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_rewrite_computes_the_same_function(bias: bool) -> None:
    original = _layernorm_model(bias)
    rewritten = decompose_layernorm(original)
    graph = onnx.load_from_string(rewritten).graph
    assert not [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert sum("/LayerNorm/" in n.name for n in graph.node) == (9 if bias else 8)
    x = np.random.default_rng(1).normal(3, 2, (5, 1, 4, 4)).astype(np.float32)
    run = {m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in (original, rewritten)}
    want, got = (run[m].run(None, {"image": x})[0] for m in (original, rewritten))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layernorm_rewrite_refuses_what_it_cannot_do() -> None:
    model = onnx.load_from_string(_layernorm_model())
    model.graph.node[1].attribute[0].i = 1  # axis=1
    with pytest.raises(EngineBuildError, match="only axis=-1"):
        decompose_layernorm(model.SerializeToString())


# --------------------------------------------------------------------------------------------------
# TensorRT < 10: which layers stay FP32 (a fake network stands in for TensorRT's)


class _FakeLayer:
    def __init__(self, name: str, type_: str, out_dtypes: list[str]) -> None:
        self.name, self.type, self.precision = name, type_, None
        self._outs = [SimpleNamespace(dtype=d) for d in out_dtypes]
        self.output_types: dict[int, str] = {}
        self.num_outputs = len(out_dtypes)

    def get_output(self, j: int) -> SimpleNamespace:
        return self._outs[j]

    def set_output_type(self, j: int, dtype: str) -> None:
        self.output_types[j] = dtype


def test_layernorm_reductions_and_softmax_are_pinned_to_fp32() -> None:
    fake_trt = SimpleNamespace(
        LayerType=SimpleNamespace(SOFTMAX="softmax", REDUCE="reduce", NORMALIZATION="norm"),
        float32="f32",
        float16="f16",
    )
    layers = [
        _FakeLayer("/blocks.0/attn/MatMul", "matmul", ["f32"]),
        _FakeLayer("/blocks.0/attn/Softmax", "softmax", ["f32"]),
        _FakeLayer("/ln_1/LayerNormalization", "norm", ["f32"]),
        _FakeLayer("/ln_1/LayerNorm/mean", "reduce", ["f32"]),
        _FakeLayer("/ln_1/LayerNorm/centered", "elementwise", ["f32"]),
        _FakeLayer("/ln_1/LayerNorm/shape", "shape", ["i32"]),
        _FakeLayer("/mlp/fc/Add", "elementwise", ["f32"]),
    ]
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert build.keep_fp32(network, fake_trt) == 4
    pinned = [layer.name for layer in layers if layer.precision == "f32"]
    assert pinned == [
        "/blocks.0/attn/Softmax",
        "/ln_1/LayerNormalization",
        "/ln_1/LayerNorm/mean",
        "/ln_1/LayerNorm/centered",
    ]
    assert all(layer.output_types == {0: "f32"} for layer in layers if layer.precision == "f32")


# --------------------------------------------------------------------------------------------------
# Without TensorRT


@pytest.mark.skipif(_trt_importable(), reason="tensorrt is installed here")
def test_clear_error_without_tensorrt(tmp_path: Path) -> None:
    assert api.available() is False
    with pytest.raises(TensorRTUnavailableError, match="needs the tensorrt Python package"):
        trt_backend.TensorRTBackend(tmp_path, _manifest((FP32, FP16)))
    with pytest.raises(TensorRTUnavailableError, match="python3-libnvinfer"):
        build.build_engine(tmp_path / "model.onnx", tmp_path / "x.engine", max_batch=4, opt_batch=2)


def test_build_arguments_are_checked_before_anything_heavy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opt_batch"):
        build.build_engine(tmp_path / "m.onnx", tmp_path / "x.engine", max_batch=4, opt_batch=8)
    with pytest.raises(ValueError, match="precision"):
        build.build_engine(tmp_path / "m.onnx", tmp_path / "x.engine", 4, 2, precision="int8")


# --------------------------------------------------------------------------------------------------
# On a GPU with TensorRT


def _tiny_artifact(root: Path, size: int = 32) -> Manifest:
    """A small ViT-shaped network (patchify, LayerNorm, softmax attention, head) as FP32 and FP16 ONNX."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # what the exporter uses

    rng = np.random.default_rng(0)
    patch, dim = 8, 32
    tokens = (size // patch) ** 2

    def init(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    inits = [
        init("patch.weight", dim, 3, patch, patch),
        init("qk.weight", dim, dim),
        init("head.weight", dim, 1),
        numpy_helper.from_array(np.ones(dim, np.float32), "ln.weight"),
        numpy_helper.from_array(np.zeros(dim, np.float32), "ln.bias"),
        numpy_helper.from_array(np.asarray([0, dim, tokens], np.int64), "tok_shape"),
        numpy_helper.from_array(np.asarray([1], np.int64), "one"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "patch.weight"], ["p"], "/patch", strides=[patch, patch]),
        helper.make_node("Reshape", ["p", "tok_shape"], ["t0"], "/tok"),
        helper.make_node("Transpose", ["t0"], ["t"], "/tokT", perm=[0, 2, 1]),
        helper.make_node(
            "LayerNormalization", ["t", "ln.weight", "ln.bias"], ["n"], "/ln/LayerNormalization"
        ),
        helper.make_node("MatMul", ["n", "qk.weight"], ["q"], "/attn/q"),
        helper.make_node("Transpose", ["n"], ["nT"], "/attn/kT", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "nT"], ["s"], "/attn/scores"),
        helper.make_node("Softmax", ["s"], ["a"], "/attn/Softmax", axis=-1),
        helper.make_node("MatMul", ["a", "n"], ["o"], "/attn/out"),
        helper.make_node("ReduceMean", ["o"], ["m"], "/pool", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["m", "head.weight"], ["l2"], "/head"),
        helper.make_node("Squeeze", ["l2", "one"], ["logit"], "/squeeze"),
        helper.make_node("Sigmoid", ["logit"], ["probability"], "/sigmoid"),
    ]
    model = detector_graph("tiny", nodes, inits, size)
    onnx.save(model, root / "model.onnx")
    onnx.save(convert_float_to_float16(model, keep_io_types=True), root / "model.fp16.onnx")
    files = {f: sha256_file(root / f) for f in ("model.onnx", "model.fp16.onnx")}
    return _manifest((FP32, FP16), files, size)


gpu_only = pytest.mark.skipif(not api.available(), reason="needs tensorrt, pycuda and an NVIDIA GPU")


@pytest.mark.gpu
@gpu_only
def test_engine_matches_onnxruntime_cpu_and_is_cached(tmp_path: Path) -> None:
    manifest = _tiny_artifact(tmp_path)
    backend = trt_backend.TensorRTBackend(tmp_path, manifest, max_batch=8, cuda_graph_batch=4)
    meta = json.loads(sidecar_path(backend.engine_path).read_text())
    built = EngineKey(
        **{f: meta[f] for f in EngineKey.__dataclass_fields__}
        | {"compute_capability": tuple(meta["compute_capability"])}
    )
    assert (
        built.onnx_sha256 == manifest.files["model.fp16.onnx"]
        and engine_mismatch(backend.engine_path, built) is None
    )
    x = np.random.default_rng(2).normal(0, 1, (11, 3, 32, 32)).astype(np.float32)
    reference = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    want = reference.run(["logit"], {"image": x})[0]
    import tensorrt

    assert backend.graph_captured is graphs_supported(tensorrt.__version__)  # capture errors fail here
    with pytest.raises(ValueError, match="exceeds max_batch=8"):
        backend.infer(x)  # the Detector cuts batches; the backend refuses what its profile cannot run
    got = np.concatenate([backend.infer(x[:8]), backend.infer(x[8:])])
    got4 = backend.infer(x[:4])  # the CUDA graph batch
    print(f"\nmax |TensorRT fp16 - ORT fp32| logit: {np.max(np.abs(got - want)):.4g}")
    assert np.all(np.abs(got - want) <= 0.05 + 0.02 * np.abs(want))
    np.testing.assert_allclose(got4, got[:4], rtol=1e-3, atol=1e-3)
    mtime = backend.engine_path.stat().st_mtime_ns
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        backend.infer(x[:1])
    again = trt_backend.TensorRTBackend(tmp_path, manifest, max_batch=8)
    assert again.engine_path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    again.close()


@pytest.mark.gpu
@gpu_only
def test_infer_images_preprocesses_on_the_gpu_like_the_cpu(tmp_path: Path) -> None:
    from i2p.runtime.preprocess import preprocess

    manifest = _tiny_artifact(tmp_path)
    backend = trt_backend.TensorRTBackend(tmp_path, manifest, max_batch=8)
    rng = np.random.default_rng(3)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for w, h in [(1, 1), (3, 500), (640, 480), (300, 1400)]
    ]
    assert backend.accepts_images
    via_gpu = backend.infer_images(images)
    via_cpu = backend.infer(np.stack([preprocess(img, manifest.preprocess) for img in images]))
    backend.close()
    np.testing.assert_allclose(via_gpu, via_cpu, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Engine lookup, version rules


def test_lookup_finds_a_verified_engine_or_says_where_to_build(tmp_path: Path) -> None:
    """In the runtime's own cache; engines in the artifact: tests/runtime/test_engine_cache.py."""
    cache = tmp_path / "cache" / "engines"
    miss = lookup(cache, KEY)
    assert (
        not miss.found and miss.path == cache / KEY.filename and len(miss.reasons) == 1 and miss.data is None
    )
    write_engine(cache / KEY.filename, b"engine", KEY)
    hit = lookup(cache, KEY)
    assert hit.found and hit.path == cache / KEY.filename and hit.data == b"engine"  # the bytes verified
    assert timing_cache_name(KEY) == "timing_nvidia-jetson-agx-orin_sm87_trt10.3.0.cache"


def test_cuda_graphs_are_skipped_before_tensorrt_10() -> None:
    assert not graphs_supported("8.5.2.2") and not graphs_supported("8.6.1") and not graphs_supported("9.3.0")
    assert graphs_supported("10.3.0") and graphs_supported("11.1.0")


# --------------------------------------------------------------------------------------------------
# CUDA graphs (pycuda and a GPU; no TensorRT needed)

needs_pycuda_gpu = pytest.mark.skipif(not kernels.available(), reason="needs pycuda and an NVIDIA GPU")


@pytest.mark.gpu
@needs_pycuda_gpu
def test_cuda_graph_replays_captured_work_and_cleans_up_a_failed_capture() -> None:
    cuda = kernels.driver()
    with kernels.activated(kernels.primary_context(0)):
        stream, n = cuda.Stream(), 1 << 16
        buffer = cuda.mem_alloc(4 * n)
        cuda.memset_d32(buffer, 0, n)
        graph = CudaGraph(stream.handle, lambda: cuda.memset_d32_async(buffer, 7, n, stream))
        host = np.empty(n, np.uint32)
        cuda.memcpy_dtoh(host, buffer)
        assert not host.any()  # captured, not run
        graph.launch(stream.handle)
        stream.synchronize()
        cuda.memcpy_dtoh(host, buffer)
        assert (host == 7).all()
        graph.close()
        graph.close()

        def failing() -> None:
            cuda.memset_d32_async(buffer, 1, n, stream)
            raise RuntimeError("enqueue failed")

        with pytest.raises(RuntimeError, match="enqueue failed"):
            CudaGraph(stream.handle, failing)
        cuda.memset_d32_async(buffer, 3, n, stream)  # the stream left capture mode: it runs work again
        stream.synchronize()
        cuda.memcpy_dtoh(host, buffer)
        assert (host == 3).all()
        buffer.free()
