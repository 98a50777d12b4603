"""A Triton Inference Server model repository entry for the exported network.

``REPO/<name>/config.pbtxt`` + ``REPO/<name>/1/model.onnx`` (or ``model.plan`` for a TensorRT engine).
The config is built with Triton's own ModelConfig protobuf (``tritonclient.grpc.model_config_pb2``) and
printed with ``text_format``, so it is well-formed by construction.

With ``max_batch_size > 0`` Triton owns the leading batch axis and ``dims`` list the rest. The outputs
``logit`` and ``probability`` are ``[batch]``: nothing is left once the batch axis is removed, and Triton
requires non-empty dims, so they are declared ``dims: [1]`` with ``reshape: { shape: [] }`` (the
model produces ``[batch]``; clients receive ``[batch, 1]``), as Triton's model-configuration guide
prescribes for batch-only tensors.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .artifact import staged_directory
from .onnx_export import INPUT, OUTPUTS

CONFIG = "config.pbtxt"
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "engine": ("tensorrt_plan", "model.plan")}


def model_name(name: str) -> str:
    """A Triton-safe model directory name: letters, digits, '-', '_' and '.'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return cleaned or "i2p_detector"


def triton_config(name: str, kind: str, max_batch: int, image_size: int) -> str:
    """config.pbtxt text for the detector: float32 image [3, S, S] in, logit and probability out."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    platform, filename = PLATFORMS[kind]
    config = mc.ModelConfig(
        name=name, platform=platform, max_batch_size=max_batch, default_model_filename=filename
    )
    config.input.add(name=INPUT, data_type=mc.TYPE_FP32, dims=[3, image_size, image_size])
    for output in OUTPUTS:
        config.output.add(
            name=output, data_type=mc.TYPE_FP32, dims=[1], reshape=mc.ModelTensorReshape(shape=[])
        )
    config.dynamic_batching.SetInParent()  # batch concurrent requests up to max_batch_size
    return text_format.MessageToString(config)


def write_triton_model(
    repo: Path, name: str, model_file: Path, kind: str, max_batch: int, image_size: int, force: bool
) -> Path:
    """Write (atomically) ``repo/<name>/`` with the config and version 1 of the model; returns it."""
    repo.mkdir(parents=True, exist_ok=True)
    target = repo / model_name(name)
    with staged_directory(target, force, marker=CONFIG) as staging:
        (staging / CONFIG).write_text(triton_config(target.name, kind, max_batch, image_size))
        (staging / "1").mkdir()
        shutil.copyfile(model_file, staging / "1" / PLATFORMS[kind][1])
    return target
