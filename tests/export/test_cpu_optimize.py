"""model.cpu.onnx: the fused ONNX Runtime CPU graph matches model.onnx, every rewrite refuses what it cannot
prove, export lists and hashes the file only when its parity passes, and the Detector prefers it on the CPU."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from i2p.base.files import sha256_file, write_json_atomic
from i2p.export import cpu_optimize
from i2p.export.cpu_optimize import CPU_MODEL, CPU_ONNX, FusionReport, optimize_for_cpu
from i2p.export.network import deploy
from i2p.export.onnx_export import export_onnx
from i2p.export.pipeline import ExportOptions, run_export
from i2p.runtime import ArtifactError, Detector
from i2p.runtime.manifest import MANIFEST, read_manifest
from i2p.train.checkpoint import load_model
from tests.support.fake_artifact import build_model

LAYER = 3  # checkpoint_l3's (tests/conftest.py), of the tiny ViT's 4 blocks; 2 heads of width 32, 17 tokens
ATOL = 1e-4  # logits; FP32 kernels differ only in summation order


def run(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logit, probability = session.run(["logit", "probability"], {"image": images})
    return logit, probability


def images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size), dtype=np.float32)


@pytest.fixture(scope="module")
def exported(checkpoint_l3: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("cpu")
    model, _ = load_model(checkpoint_l3)
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


# -- i2p-export's model.cpu.onnx and the Detector ---------------------------------------------------------


def export_artifact(ckpt: Path, out: Path):
    return run_export(
        ExportOptions(ckpt=ckpt, out=out, cpu=True, engine="no", random_samples=8), echo=lambda _: None
    )


@pytest.fixture(scope="module")
def artifact(checkpoint_l3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_artifact(checkpoint_l3, tmp_path_factory.mktemp("art") / "det.i2p").artifact


def without_cpu_model(artifact: Path, dst: Path) -> Path:
    """A copy of ``artifact`` as exported with --no-cpu: no model.cpu.onnx, no manifest entry."""
    shutil.copytree(artifact, dst)
    (dst / CPU_ONNX).unlink()
    m = read_manifest(dst)
    files = {k: v for k, v in m.files.items() if k != CPU_ONNX}
    write_json_atomic(dst / MANIFEST, replace(m, models=m.models[:1], files=files).to_json())
    return dst


def test_export_lists_hashes_and_checks_the_cpu_model(artifact: Path) -> None:
    m = read_manifest(artifact)
    assert m.models[-1] == CPU_MODEL and CPU_MODEL.format == "onnx-ort-fused"
    assert m.model("fp32").path == "model.onnx"  # what TensorRT and Triton build from stays standard ONNX
    assert m.files[CPU_ONNX] == sha256_file(artifact / CPU_ONNX)
    parity = json.loads((artifact / "parity.json").read_text())
    (cpu,) = [c for c in parity["comparisons"] if c["model"] == CPU_ONNX]
    assert cpu["status"] == "pass" and cpu["logit"]["max_abs"] <= 1e-3 and cpu["samples"] == 8
    assert m.extra["parity"][CPU_ONNX]["status"] == "pass"


def test_detector_prefers_the_cpu_model_and_agrees_with_model_onnx(artifact: Path, tmp_path: Path) -> None:
    fused, plain = Detector(artifact), Detector(without_cpu_model(artifact, tmp_path / "plain.i2p"))
    assert fused.backend.model_path.name == CPU_ONNX and plain.backend.model_path.name == "model.onnx"
    assert Detector(artifact, precision="fp32").backend.model_path.name == CPU_ONNX
    x = images(6, seed=3)
    assert np.abs(fused.predict_batch(x) - plain.predict_batch(x)).max() <= 1e-5


def test_a_tampered_cpu_model_is_refused(artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.i2p"
    shutil.copytree(artifact, copy)
    with open(copy / CPU_ONNX, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArtifactError, match=r"model\.cpu\.onnx.*does not match the manifest"):
        Detector(copy)


def test_a_cpu_model_this_onnxruntime_cannot_load_falls_back(artifact: Path, tmp_path: Path, caplog) -> None:
    """E.g. an older ONNX Runtime without one of the contrib ops: a warning, then model.onnx."""
    copy = tmp_path / "copy.i2p"
    shutil.copytree(artifact, copy)
    model = onnx.load(str(copy / CPU_ONNX))
    next(n for n in model.graph.node if n.op_type == "Attention").op_type = "AttentionFromTheFuture"
    onnx.save(model, str(copy / CPU_ONNX))
    m = read_manifest(copy)
    write_json_atomic(
        copy / MANIFEST, replace(m, files={**m.files, CPU_ONNX: sha256_file(copy / CPU_ONNX)}).to_json()
    )
    with caplog.at_level(logging.WARNING, logger="i2p"):
        det = Detector(copy)
    assert det.backend.model_path.name == "model.onnx"
    assert any(CPU_ONNX in r.getMessage() and "does not load" in r.getMessage() for r in caplog.records)


def test_a_cpu_model_that_fails_parity_is_dropped(checkpoint_l3: Path, tmp_path: Path, monkeypatch) -> None:
    """A rewrite that changes the function (here: the head's bias + 1) costs the file, not the export."""

    def wrong(src: Path, dst: Path, num_heads: int) -> FusionReport:
        model = onnx.load(str(src))
        bias = next(t for t in model.graph.initializer if t.name == "head.1.bias")
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1, bias.name))
        onnx.save(model, str(dst))
        return FusionReport({}, 0, False)

    monkeypatch.setattr(cpu_optimize, "optimize_for_cpu", wrong)
    result = export_artifact(checkpoint_l3, tmp_path / "det.i2p")
    assert not (result.artifact / CPU_ONNX).exists()
    assert [f.path for f in result.manifest.models] == [
        "model.onnx"
    ] and CPU_ONNX not in result.manifest.files
    assert result.parity.passed and all(c.model != CPU_ONNX for c in result.parity.comparisons)
    assert any(n.startswith(f"{CPU_ONNX}: dropped, parity against PyTorch failed") for n in result.notes)
    assert Detector(result.artifact).backend.model_path.name == "model.onnx"
