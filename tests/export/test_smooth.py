"""SmoothQuant scaling of the CPU graph: exact in FP32, the activations' range moved into the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from i2p.export import smooth
from i2p.export.cpu_optimize import CPU_ONNX
from i2p.export.pipeline import ExportResult


@pytest.fixture(scope="module")
def fused(export_l2: ExportResult) -> Path:
    """model.cpu.onnx of a tiny exported detector: LayerNorm/SkipLayerNorm, fused Attention, QuickGelu."""
    return export_l2.artifact / CPU_ONNX  # the session's export (tests/conftest.py): read, never written


def run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(["logit"], {session.get_inputs()[0].name: x})[0]


def test_sites_fold_into_norms_read_only_by_weight_ops_and_mul_elsewhere(fused):
    model = onnx.load(str(fused))
    sites = smooth.smoothing_sites(model)
    norms = [s for s in sites if s.norm is not None]
    assert {s.norm.op_type for s in norms} <= set(smooth.NORMS) and norms
    assert any(c.op_type == "Attention" for s in norms for c in s.consumers)
    explicit = [c.name for s in sites if s.norm is None for c in s.consumers]
    assert any("c_proj" in n for n in explicit)  # after QuickGelu: nothing to fold into
    consumers = [c.name for s in sites for c in s.consumers]
    assert len(consumers) == len(set(consumers)) and not any("head" in n for n in consumers)


def test_smoothed_graph_is_the_same_function_in_fp32(fused):
    rng = np.random.default_rng(0)
    stats, x = (rng.standard_normal((n, 3, 64, 64), dtype=np.float32) for n in (8, 6))
    model = onnx.load(str(fused))
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    sites = smooth.smoothing_sites(onnx.load(str(fused)))
    assert smooth.smooth(model, stats, alpha=0.5) == len(sites)
    weights = {c.input[1] for s in sites for c in s.consumers}
    assert all(not np.array_equal(before[w], numpy_helper.to_array(_init(model, w))) for w in weights)
    muls = [n for n in model.graph.node if n.name.endswith("/smooth")]
    assert len(muls) == sum(s.norm is None for s in sites)  # the norms absorbed theirs
    np.testing.assert_allclose(run(model, x), run(fused, x), atol=1e-4)


def test_factors_follow_smoothquant_and_never_vanish():
    x, w = np.array([16.0, 1.0, 0.0]), np.array([1.0, 4.0, 1.0])
    np.testing.assert_allclose(smooth.factors(x, w, 0.5), [4.0, 0.5, np.sqrt(1e-5)], rtol=1e-6)
    np.testing.assert_allclose(smooth.factors(x, w, 1.0), [16.0, 1.0, 1e-5], rtol=1e-6)


def test_a_norm_that_also_feeds_the_residual_is_not_folded_but_gets_a_mul():
    """LN output read by a MatMul and an Add: scaling gamma would change the Add, so a Mul goes in front."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    gamma = numpy_helper.from_array(np.ones(4, np.float32), "gamma")
    beta = numpy_helper.from_array(np.zeros(4, np.float32), "beta")
    graph = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["image", "gamma", "beta"], ["ln"], name="ln", axis=-1),
            helper.make_node("MatMul", ["ln", "w"], ["mm"], name="mm"),
            helper.make_node("ReduceSum", ["mm"], ["logit"], name="sum", keepdims=0),
            helper.make_node("Add", ["ln", "image"], ["residual"], name="residual"),
        ],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 5, 4])],
        [
            helper.make_tensor_value_info("logit", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("residual", TensorProto.FLOAT, None),
        ],
        [w, gamma, beta],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (site,) = smooth.smoothing_sites(model)
    assert site.norm is None and [c.name for c in site.consumers] == ["mm"]
    x = np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)
    x[..., 0] *= 50  # an outlier channel
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    assert smooth.smooth(model, x) == 1
    assert "Mul" in [n.op_type for n in model.graph.node]
    np.testing.assert_allclose(run(model, x), run(reference, x), rtol=1e-5, atol=1e-4)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)
