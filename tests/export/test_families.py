"""Every backbone family through export and the runtime: merged, truncated ONNX == the adapted PyTorch model.

Parametrized over ``MODELS`` (a new family adds its small config). open_clip's ViT has the same checks in
test_network.py and test_runtime_vs_torch.py on the shared fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from i2p.export.network import deploy
from i2p.export.onnx_export import check_graph, export_onnx
from i2p.export.pipeline import ExportOptions, ExportResult, run_export
from i2p.runtime import Detector
from i2p.runtime.manifest import Manifest
from i2p.synthetic import make_image_folder
from i2p.train import subspace
from i2p.train.backbone import load_backbone, preprocess_spec
from i2p.train.checkpoint import load_model
from i2p.train.checkpoint_scoring import eval_loader, predict
from i2p.train.config import TrainConfig
from i2p.train.data import discover
from i2p.train.distributed import Placement
from i2p.train.model import I2PModel
from tests.support.checkpoints import make_checkpoint

pytestmark = pytest.mark.slow  # an export with FP16, CPU and INT8 files per model (~5-10 s each)

MODELS = [
    "i2p-tiny-dinov2",
    "i2p-tiny-dinov2-reg",
    "i2p-tiny-dinov3",
    "i2p-tiny-siglip2",  # squash resize, bicubic
    "i2p-tiny-pe-core",  # squash resize, bilinear
    "i2p-tiny-eva02",  # crop_pct 0.9
]
NETWORKS = MODELS
LAYER = 2


@pytest.mark.parametrize("model", NETWORKS)
def test_the_merged_network_exports_to_plain_onnx_that_onnx_runtime_runs_at_fp32_parity(model, tmp_path):
    """RoPE (DINOv3, EVA-02, PE-Core), registers, attention-pool towers cut before their pool: standard
    ONNX ops at opset 17, run by ONNX Runtime within 1e-4 of the unmerged adapted model."""
    tower, _ = load_backbone(model, "none", 0)
    net = I2PModel(tower, LAYER).eval()
    torch.nn.init.normal_(net.head.fc.weight)
    net.add_deltas(subspace.choose_bases(net.blocks, 4))
    with torch.no_grad():
        for d in net.deltas.values():
            d.A.normal_()
    size = net.family.image_size(net.tower)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = net(x).numpy()
    deployed = deploy(net)
    export_onnx(deployed, tmp_path / "model.onnx")
    summary = check_graph(tmp_path / "model.onnx", LAYER, deployed.maps_per_block)
    assert set(summary.ops) <= PLAIN_OPS, set(summary.ops) - PLAIN_OPS
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, _ = session.run(None, {"image": x.numpy()})
    assert np.abs(logits - reference).max() < 1e-4
    assert reference.std() > 1e-2


# ONNX's standard domain, all in TensorRT 8.6's supported-ops list (no custom or contrib op)
PLAIN_OPS = {
    "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Cos", "Div", "Equal", "Erf", "Expand",
    "Flatten", "Gather", "Gemm", "Identity", "LayerNormalization", "MatMul", "Mul", "Neg", "Range",
    "ReduceMean", "Reshape", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze",
    "Sub", "Transpose", "Unsqueeze", "Where",
}  # fmt: skip


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory) -> tuple[Path, ExportResult]:
    folder = tmp_path_factory.mktemp(request.param)
    ckpt = make_checkpoint(folder, layer=LAYER, backbone=request.param)
    calib = folder / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (72, 64, 3), dtype=np.uint8)).save(calib / f"{i:02d}.png")
    opts = ExportOptions(
        ckpt=ckpt, out=folder / "det.i2p", engine="no", fp16=True, random_samples=4, calib_images=calib
    )
    return ckpt, run_export(opts, echo=lambda _: None)


def test_fp32_onnx_equals_the_unmerged_adapted_model(exported):
    ckpt, result = exported
    model, meta = load_model(ckpt)  # deltas unmerged, blocks after L* dropped by the library's API
    x = torch.randn(
        5, 3, meta.preprocess.size, meta.preprocess.size, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        reference = model.eval()(x).numpy()
    session = ort.InferenceSession(str(result.artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, probs = session.run(None, {"image": x.numpy()})
    assert np.abs(logits - reference).max() < 1e-4
    assert np.abs(probs - 1 / (1 + np.exp(-reference))).max() < 1e-4
    assert reference.std() > 1e-3  # the inputs really get different scores (PE-Core's random head: ~0.009)


def test_every_precision_passes_its_gate_and_the_manifest_records_the_pool(exported):
    ckpt, result = exported
    meta = load_model(ckpt)[1]
    kept = {m.path for m in result.manifest.models}
    assert {"model.onnx", "model.fp16.onnx", "model.cpu.onnx", "model.int8.onnx"} <= kept
    assert all(r["status"] == "pass" for r in result.parity.summary().values())
    manifest = Manifest.from_dict(json.loads((result.artifact / "manifest.json").read_text()))
    assert manifest.pool == meta.backbone.pool
    assert manifest.extra["backbone_family"] == meta.backbone.family
    assert manifest.preprocess == meta.preprocess == preprocess_spec(meta.backbone.model)  # the modes travel
    assert (manifest.layer, manifest.num_layers) == (LAYER, meta.num_layers)


def test_the_runtime_scores_images_as_the_checkpoints_evaluation_does(exported, tmp_path):
    ckpt, result = exported
    make_image_folder(tmp_path / "images", n_per_class=4, size=(97, 71), formats=("png", "jpg"))
    samples = discover(tmp_path / "images")
    model, meta = load_model(ckpt)
    loader = eval_loader(samples, meta.preprocess, TrainConfig(data="", batch_size=4, workers=0))
    torch_probs, idx = predict(model, loader, Placement(torch.device("cpu")))
    det = Detector(result.artifact, backend="onnxruntime", precision="fp32")
    runtime_probs = np.array([p.probability for p in det.predict([samples[i].path for i in idx])])
    assert len(runtime_probs) == len(samples) == 16
    assert np.abs(runtime_probs - torch_probs).max() < 1e-4
    assert torch_probs.std() > 1e-4


def test_the_triton_preprocess_model_gets_the_artifacts_preprocessing(exported, tmp_path):
    """The ensemble's preprocess model reads the spec from its config as ``initialize`` does, with every
    mode field, and what it computes (``decode_batch``) scores the images as ``Detector.predict`` does."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from i2p.export.triton import TritonOptions, write_repository
    from i2p.runtime.preprocess import PreprocessSpec
    from i2p.runtime.serving import decode_batch

    _, result = exported
    manifest = Manifest.from_dict(json.loads((result.artifact / "manifest.json").read_text()))
    ensemble, _ = write_repository(
        tmp_path / "repo", result.artifact, manifest, TritonOptions(backend="python"), False
    )
    text = (ensemble.parent / f"{ensemble.name}_preprocess" / "config.pbtxt").read_text()
    param = text_format.Parse(text, mc.ModelConfig()).parameters["preprocess"].string_value
    spec = PreprocessSpec.from_dict(json.loads(param))
    assert spec == manifest.preprocess
    make_image_folder(tmp_path / "images", n_per_class=3, size=(97, 71), formats=("png", "jpg"))
    paths = [s.path for s in discover(tmp_path / "images")]
    pixels, errors = decode_batch([p.read_bytes() for p in paths], spec)
    assert errors == [""] * len(paths)
    with Detector(result.artifact, backend="onnxruntime", precision="fp32") as det:
        served = 1 / (1 + np.exp(-det.backend.infer(pixels)))
        np.testing.assert_allclose(served, [p.probability for p in det.predict(paths)], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"resize": "longest"}, r"resize must be one of \['shortest', 'squash'\]"),
        ({"interpolation": "lanczos"}, r"interpolation must be one of \['bicubic', 'bilinear'\]"),
        ({"crop": "border"}, r"crop must be one of \['center'\]"),
        ({"crop_pct": 0.2}, r"crop_pct must be in \[0.5, 1\]"),
        ({"pad_to_square": True}, r"unknown preprocessing keys \['pad_to_square'\]"),
    ],
)
def test_export_refuses_a_checkpoint_whose_preprocessing_the_runtime_cannot_reproduce(tmp_path, change, why):
    """Preprocessing the runtime does not implement is refused before anything is written, naming the
    checkpoint and the field: an artifact is never served with other preprocessing than it was trained on."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from i2p.train.metadata import CheckpointError

    good = make_checkpoint(tmp_path, layer=LAYER, backbone="i2p-tiny-siglip2")
    with safe_open(str(good), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        meta = json.loads(f.metadata()["i2p"])
    meta["preprocess"] = {**meta["preprocess"], **change}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"i2p": json.dumps(meta)})
    out = tmp_path / "bad.i2p"
    with pytest.raises(CheckpointError, match=rf"bad.safetensors.*'preprocess'.*{why}"):
        run_export(ExportOptions(ckpt=bad, out=out, engine="no", random_samples=4), echo=lambda _: None)
    assert not out.exists()
