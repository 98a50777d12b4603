"""model.cpu.onnx: the fused ONNX Runtime CPU graph matches model.onnx, and every rewrite refuses what it cannot prove."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from checkpoints import make_checkpoint
from fake_artifact import build_model
from onnx import numpy_helper

from i2p.export.cpu_optimize import optimize_for_cpu
from i2p.export.network import deploy
from i2p.export.onnx_export import export_onnx
from i2p.train.checkpoint import load_model

LAYER = 3  # of the tiny ViT's 4 blocks; 2 heads of width 32, 17 tokens
ATOL = 1e-4  # logits; FP32 kernels differ only in summation order


def run(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logit, probability = session.run(["logit", "probability"], {"image": images})
    return logit, probability


def images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size), dtype=np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("cpu")
    model, _ = load_model(make_checkpoint(root, layer=LAYER))
    net = deploy(model)
    export_onnx(net, root / "model.onnx")
    return root / "model.onnx", net.blocks[0].attn.num_heads


@pytest.fixture(scope="module")
def fused(exported: tuple[Path, int]):
    src, heads = exported
    dst = src.with_name("model.cpu.onnx")
    return dst, optimize_for_cpu(src, dst, heads)


def test_fusions_fire_on_the_open_clip_graph(exported, fused) -> None:
    src, _ = exported
    dst, report = fused
    assert report.attention_blocks == LAYER and report.cls_only_last_block and not report.skipped
    assert report.ops["Attention"] == LAYER - 1 and report.ops["MultiHeadAttention"] == 1
    assert report.ops["QuickGelu"] == LAYER
    assert report.ops["SkipLayerNormalization"] >= 2 * LAYER - 1
    plain, cpu = onnx.load(str(src)), onnx.load(str(dst))
    assert not [n for n in plain.graph.node if n.domain == "com.microsoft"]  # model.onnx stays standard ONNX
    ops = [n.op_type for n in cpu.graph.node]
    assert "Softmax" not in ops and ops.count("Transpose") <= 1  # no unfused attention left
    assert len(cpu.graph.node) < len(plain.graph.node) / 5
    assert "com.microsoft" in {o.domain for o in cpu.opset_import}


@pytest.mark.parametrize("batch", [1, 5])
def test_fused_model_matches_the_fp32_onnx(exported, fused, batch: int) -> None:
    x = images(batch, seed=batch)
    (ref_logit, ref_prob), (logit, prob) = run(exported[0], x), run(fused[0], x)
    assert logit.shape == prob.shape == (batch,)
    assert np.abs(logit - ref_logit).max() <= ATOL
    assert np.abs(prob - ref_prob).max() <= ATOL / 4
    assert np.ptp(ref_logit) > 100 * ATOL or batch == 1  # the inputs really give different outputs


def test_cls_only_rewrite_refuses_a_graph_that_reads_another_token(exported, tmp_path: Path) -> None:
    """Token 1 instead of the CLS token: the last block must then run for every token, attention still fused."""
    src, heads = exported
    model = onnx.load(str(src))
    (gather,) = [  # the head's read of the last block's output (not a shape Gather inside a block)
        n
        for n in model.graph.node
        if n.op_type == "Gather" and "resblocks" not in n.name and "resblocks" in n.input[0]
    ]
    index = numpy_helper.from_array(np.array(1, np.int64), "token_one")
    model.graph.initializer.append(index)
    gather.input[1] = "token_one"
    other = tmp_path / "other_token.onnx"
    onnx.save(model, str(other))
    report = optimize_for_cpu(other, tmp_path / "other_token.cpu.onnx", heads)
    assert not report.cls_only_last_block
    assert report.ops["Attention"] == LAYER and report.ops["MultiHeadAttention"] == 0
    assert any("CLS" in s and "Gather" in s for s in report.skipped), report.skipped
    x = images(3, seed=7)
    assert np.abs(run(tmp_path / "other_token.cpu.onnx", x)[0] - run(other, x)[0]).max() <= ATOL


def test_a_graph_without_attention_is_left_as_it_computes(tmp_path: Path) -> None:
    """No resblocks/attn scopes (e.g. a future exporter's naming): nothing fused, same outputs."""
    src = tmp_path / "plain.onnx"
    onnx.save(build_model(32), str(src))
    report = optimize_for_cpu(src, tmp_path / "plain.cpu.onnx", 2)
    assert report.attention_blocks == 0 and not report.cls_only_last_block
    assert "no attention" in report.skipped[0]
    x = images(4, size=32)
    assert np.abs(run(tmp_path / "plain.cpu.onnx", x)[0] - run(src, x)[0]).max() <= ATOL
