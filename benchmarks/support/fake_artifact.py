"""A small but real exported artifact for runtime tests and the leak check: ONNX graphs built with onnx.helper.

The network is a stand-in for the truncated ViT (Conv patchify -> ReLU -> Linear -> logit, plus Sigmoid ->
probability) with the I/O names, dynamic batch axis, FP16 copy and manifest of a real ``i2p-export``
output, so the Detector, backends and CLIs are exercised end to end without torch. The convolution
makes the output depend on where pixels are, so orientation bugs change the answer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers import float16

from i2p.base.files import sha256_file, write_json_atomic
from i2p.runtime.backends.onnxruntime import CPU_FUSED_FORMAT
from i2p.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    ModelFile,
    TensorSpec,
)
from i2p.runtime.preprocess import PreprocessSpec
from i2p.runtime.schema import OOD_OUTPUT, OodSpec

PATCH = 4
CHANNELS = 4


def detector_graph(
    name: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], size: int, ood: bool = False
) -> onnx.ModelProto:
    """An opset-17 model with an exported detector's I/O: image [batch, 3, size, size] -> logit, probability
    (and ``ood`` [batch] with ``ood``)."""
    outputs = ("logit", "probability", *((OOD_OUTPUT,) if ood else ()))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch"]) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def build_model(size: int, seed: int = 0, ood: bool = False) -> onnx.ModelProto:
    """FP32 graph: image [batch, 3, size, size] -> logit [batch], probability [batch] (opset 17); with
    ``ood`` also ood [batch], the mean square of the features (a stand-in for the Mahalanobis score)."""
    if size % PATCH:
        raise ValueError(f"size must be a multiple of {PATCH}, got {size}")
    rng = np.random.default_rng(seed)
    features = CHANNELS * (size // PATCH) ** 2
    conv_w = rng.normal(0, 1 / np.sqrt(3 * PATCH * PATCH), (CHANNELS, 3, PATCH, PATCH)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, CHANNELS).astype(np.float32)
    fc_w = rng.normal(0, 3 / np.sqrt(features), (features, 1)).astype(np.float32)
    fc_b = np.array([-0.5], np.float32)
    inits = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(conv_b, "conv_b"),
        numpy_helper.from_array(fc_w, "fc_w"),
        numpy_helper.from_array(fc_b, "fc_b"),
        numpy_helper.from_array(np.array([1], np.int64), "squeeze_axes"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["patches"], strides=[PATCH, PATCH]),
        helper.make_node("Relu", ["patches"], ["act"]),
        helper.make_node("Flatten", ["act"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logit2d"]),
        helper.make_node("Squeeze", ["logit2d", "squeeze_axes"], ["logit"]),
        # From logit2d, not from the graph output "logit": the FP16 converter's keep_io_types breaks a
        # graph output that another node also consumes.
        helper.make_node("Sigmoid", ["logit2d"], ["prob2d"]),
        helper.make_node("Squeeze", ["prob2d", "squeeze_axes"], ["probability"]),
    ]
    if ood:
        inits.append(numpy_helper.from_array(np.array([1 / features], np.float32), "ood_scale"))
        nodes += [
            helper.make_node("Mul", ["flat", "flat"], ["ood_sq"]),
            helper.make_node("ReduceSum", ["ood_sq", "squeeze_axes"], ["ood_sum"], keepdims=0),
            helper.make_node("Mul", ["ood_sum", "ood_scale"], [OOD_OUTPUT]),
        ]
    model = detector_graph("fake_i2p", nodes, inits, size, ood)
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model, full_check=True)
    return model


def make_artifact(
    directory: str | os.PathLike,
    size: int = 32,
    threshold: float = 0.5,
    seed: int = 0,
    fp16: bool = True,
    format_version: int = FORMAT_VERSION,
    int8: bool = False,
    ood_threshold: float | None = None,
    preprocess: PreprocessSpec | None = None,
) -> Path:
    """Write ``directory`` as an artifact (model.onnx, model.fp16.onnx, manifest.json) and return it.

    ``preprocess``: the manifest's preprocessing (its ``size`` overrides ``size``); default: the CLIP mode.

    ``int8``: also model.int8.onnx, ONNX Runtime's dynamic INT8 of the same graph (per-call input scales).
    ``ood_threshold``: the network also has the ``ood`` output, and the manifest its OodSpec.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    preprocess = preprocess or PreprocessSpec(size=size)
    size = preprocess.size
    ood = ood_threshold is not None
    model = build_model(size, seed, ood)
    onnx.save(model, root / "model.onnx")
    models = [ModelFile("model.onnx", "fp32")]
    if fp16:
        onnx.save(float16.convert_float_to_float16(model, keep_io_types=True), root / "model.fp16.onnx")
        models.append(ModelFile("model.fp16.onnx", "fp16"))
    if int8:
        _quantize(root / "model.onnx", root / "model.int8.onnx")
        models.append(ModelFile("model.int8.onnx", "int8", CPU_FUSED_FORMAT))
    manifest = Manifest(
        name="fake",
        backbone="fake-patchify",
        layer=1,
        num_layers=2,
        threshold=threshold,
        preprocess=preprocess,
        inputs=(TensorSpec("image", "float32", ("batch", 3, size, size)),),
        outputs=tuple(
            TensorSpec(o, "float32", ("batch",))
            for o in ("logit", "probability", *((OOD_OUTPUT,) if ood else ()))
        ),
        models=tuple(models),
        files={m.path: sha256_file(root / m.path) for m in models},
        tools={"onnx": onnx.__version__},
        format_version=format_version,
        ood=OodSpec(threshold=ood_threshold) if ood else None,
    )
    write_json_atomic(root / MANIFEST, manifest.to_json())
    return root


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # the quantizer logs every node it visits
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=["Conv", "Gemm"], weight_type=QuantType.QUInt8)
    finally:
        logging.disable(logging.NOTSET)
