"""The OOD head folded into the exported graph: each file's ``ood`` output against the PyTorch computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from i2p.export.ood_head import OOD_RTOL, ood_nodes
from i2p.export.pipeline import ExportOptions, ExportResult, run_export
from i2p.runtime.backends.onnxruntime import FP16_CPU_DISABLED_OPTIMIZERS
from i2p.runtime.manifest import read_manifest
from i2p.train import density
from i2p.train.checkpoint import load_model, read_checkpoint
from tests.support.checkpoints import make_checkpoint

FILES = ("model.onnx", "model.cpu.onnx", "model.fp16.onnx", "model.int8.onnx")


@pytest.fixture(scope="module")
def ood_export(tmp_path_factory, calibration_images) -> tuple[Path, ExportResult]:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ood_ckpt"), layer=2, ood=True)
    opts = ExportOptions(
        ckpt=ckpt,
        out=tmp_path_factory.mktemp("ood_export") / "det.i2p",
        engine="no",
        fp16=True,
        random_samples=4,
        calib_images=calibration_images,
    )
    return ckpt, run_export(opts, echo=lambda _: None)


def _images(n: int = 6, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 64, 64)).astype(np.float32)


def _torch_ood(ckpt: Path, x: np.ndarray) -> np.ndarray:
    """Independent of the export: the unmerged checkpoint model + the stored density."""
    model, _ = load_model(ckpt)
    fitted = density.stored(read_checkpoint(ckpt))
    with torch.no_grad():
        return fitted.score(density.head_features(model, model.forward_features(torch.from_numpy(x)))).numpy()


def _run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    disabled = list(FP16_CPU_DISABLED_OPTIMIZERS) if "fp16" in path.name else None  # onnxruntime#28392
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, {"image": x}), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("file", FILES)
def test_each_file_returns_the_pytorch_ood(ood_export, file):
    ckpt, result = ood_export
    assert file in result.files, result.notes
    x = _images()
    out = _run(result.artifact / file, x)
    assert list(out) == ["logit", "probability", "ood"]
    want = _torch_ood(ckpt, x)
    rel = np.abs(out["ood"].astype(np.float64) - want) / np.maximum(1, np.abs(want))
    limit = {"model.onnx": 1e-4, "model.cpu.onnx": 1e-4, "model.fp16.onnx": OOD_RTOL["fp16"]}.get(file, 0.25)
    assert rel.max() <= limit, (file, rel.max())
    print(f"{file}: max relative ood error {rel.max():.2g}")
    assert out["ood"].shape == (len(x),) and (out["ood"] > 0).all()


@pytest.mark.slow
def test_the_ood_head_stays_float32_in_fp16_and_int8_files(ood_export):
    """The FP16 conversion blocks the /ood/ nodes (the same FP32 whitening) and INT8 leaves their MatMul in
    float32 (SmoothQuant rescales its rows by the LayerNorm's channel factors, exactly in FP32)."""
    _, result = ood_export
    fp32 = onnx.load(str(result.artifact / "model.onnx"))
    w = _ood_weight(fp32)
    assert w.dtype == np.float32 and w.shape == (64, 64)
    for file in ("model.fp16.onnx", "model.int8.onnx"):
        model = onnx.load(str(result.artifact / file))
        assert ood_nodes(model), file
        if file == "model.fp16.onnx":
            np.testing.assert_array_equal(_ood_weight(model), w)
        assert _ood_weight(model).dtype == np.float32
        assert not any(n.name in ood_nodes(model) for n in model.graph.node if "Integer" in n.op_type)


def _ood_weight(model: onnx.ModelProto) -> np.ndarray:
    inits = {t.name: t for t in model.graph.initializer}
    (matmul,) = [n for n in model.graph.node if n.name in ood_nodes(model) and n.op_type == "MatMul"]
    return numpy_helper.to_array(inits[matmul.input[1]])


@pytest.mark.slow
def test_manifest_and_parity_carry_the_ood(ood_export):
    ckpt, result = ood_export
    manifest = read_manifest(result.artifact)
    assert [o.name for o in manifest.outputs] == ["logit", "probability", "ood"]
    assert manifest.ood == read_checkpoint(ckpt).meta.ood
    parity = json.loads((result.artifact / "parity.json").read_text())
    by_file = {c["model"]: c for c in parity["comparisons"]}
    assert by_file["model.onnx"]["ood"]["max_abs"] <= 1e-4
    assert by_file["model.fp16.onnx"]["ood"]["max_abs"] <= OOD_RTOL["fp16"]
    assert by_file["model.int8.onnx"]["tolerances"]["ood_rtol"] is None  # on record, not gated


@pytest.mark.slow
def test_a_checkpoint_without_density_exports_without_ood(export_l2):
    manifest = read_manifest(export_l2.artifact)
    assert [o.name for o in manifest.outputs] == ["logit", "probability"] and manifest.ood is None
    assert "ood" not in json.loads((export_l2.artifact / "manifest.json").read_text())
    assert list(_run(export_l2.artifact / "model.onnx", _images(2))) == ["logit", "probability"]
