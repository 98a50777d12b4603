"""Building a TensorRT engine from the artifact's ONNX on this GPU.

Precision: TensorRT >= 10 builds a strongly typed network from ``model.fp16.onnx`` (precision comes
from the graph; TensorRT 11 has no other mode). TensorRT 8.5-9 builds from the FP32 ``model.onnx``
with ``BuilderFlag.FP16`` and keeps LayerNorm, its reductions and softmax in FP32 through precision
constraints (TensorRT 8.5 splits LayerNormalization into elementwise and reduce layers, which lose
accuracy in FP16; its parser also needs ``layernorm.decompose_layernorm`` first).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from i2p.base.files import sha256_file, write_bytes_atomic

from ... import kernels
from ..private_cache import read_own_file
from .api import EngineBuildError, logger, major, tensorrt, version_tuple
from .cache import PRECISIONS, EngineKey, write_engine
from .layernorm import decompose_layernorm

log = logging.getLogger("i2p")


def keep_fp32(network: Any, trt: Any) -> int:
    """Pin LayerNorm (one layer from TensorRT 8.6, reduce + elementwise layers in 8.5) and softmax to FP32."""
    types = {trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    if hasattr(trt.LayerType, "NORMALIZATION"):
        types.add(trt.LayerType.NORMALIZATION)
    floats = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        name = layer.name.lower()
        if not (layer.type in types or "layernorm" in name or "softmax" in name):
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not all(t.dtype in floats for t in outputs):
            continue  # shape arithmetic inside a LayerNorm subgraph stays integer
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    max_batch: int,
    opt_batch: int,
    precision: str = "fp16",
    timing_cache_path: str | os.PathLike | None = None,
    device: int = 0,
    input_name: str = "image",
) -> EngineKey:
    """Build a TensorRT engine for ``onnx_path`` on ``device``, write it and its sidecar atomically.

    The optimization profile covers batch 1..``max_batch`` for ``input_name`` (the manifest's input),
    tuned for ``opt_batch``. The timing cache, when given, is read first and saved after, so rebuilds
    (another ``max_batch``, a new export of the same network) take seconds rather than minutes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(
            f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}"
        )
    trt = tensorrt()
    onnx_path = Path(onnx_path)
    cache_path = Path(timing_cache_path) if timing_cache_path else None
    with kernels.activated(kernels.primary_context(device)):
        gpu = kernels.driver().Device(device).name()
        cc = kernels.compute_capability(device)
        builder = trt.Builder(logger())
        network, _parser = _parse(builder, onnx_path, trt)
        size = _input_size(network, onnx_path, input_name)
        config = _config(builder, network, precision, onnx_path, trt)
        profile = builder.create_optimization_profile()
        shapes = [(b, 3, size, size) for b in (1, opt_batch, max_batch)]
        profile.set_shape(input_name, *shapes)
        config.add_optimization_profile(profile)
        _use_timing_cache(config, cache_path)
        log.info(
            "building a TensorRT %s engine from %s for %s (sm_%d%d); this takes minutes",
            trt.__version__,
            onnx_path.name,
            gpu,
            *cc,
        )
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(
                f"{onnx_path}: TensorRT {trt.__version__} failed to build an engine (see its log above)"
            )
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(cache_path, config.get_timing_cache().serialize())

    key = EngineKey(gpu, cc, trt.__version__, precision, sha256_file(onnx_path), size, max_batch, opt_batch)
    write_engine(engine_path, serialized, key)
    log.info("wrote %s", engine_path)
    return key


def _parse(builder: Any, onnx_path: Path, trt: Any) -> tuple[Any, Any]:
    """(network, parser) from ONNX: explicit batch before TensorRT 10, strongly typed from 10.

    The parser owns weights the network's layers point to: the caller keeps it until the build ends.
    """
    flags = 0
    if major(trt.__version__) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    elif hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # always on (and ignored) in 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger())
    if version_tuple(trt.__version__) < (8, 6):  # no LayerNormalization importer before 8.6
        parsed = parser.parse(decompose_layernorm(onnx_path.read_bytes()))
    else:
        parsed = parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(
            f"{onnx_path}: TensorRT {trt.__version__} cannot parse this ONNX file: {errors}"
        )
    return network, parser


def _config(builder: Any, network: Any, precision: str, onnx_path: Path, trt: Any) -> Any:
    """Builder config with the precision rules of this TensorRT version (module docstring)."""
    strongly_typed = major(trt.__version__) >= 10
    if strongly_typed and precision == "fp16" and not _has_fp16(network, trt):
        raise EngineBuildError(
            f"{onnx_path}: TensorRT {trt.__version__} takes precision from the graph, and this graph has "
            "no FP16 tensors; build FP16 engines from model.fp16.onnx"
        )
    config = builder.create_builder_config()
    if not strongly_typed and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info("TensorRT %s: FP16 with %d layers kept in FP32", trt.__version__, keep_fp32(network, trt))
    return config


def _has_fp16(network: Any, trt: Any) -> bool:
    return any(
        network.get_layer(i).get_output(j).dtype == trt.float16
        for i in range(network.num_layers)
        for j in range(network.get_layer(i).num_outputs)
    )


def _use_timing_cache(config: Any, path: Path | None) -> None:
    """Attach the timing cache at ``path`` (or an empty one, if it is absent or from another GPU/version)."""
    if path is not None and path.is_file():
        try:  # only ever in the runtime's own cache (engine_cache()); read without following a link
            cache = config.create_timing_cache(read_own_file(path))
            if cache is not None and config.set_timing_cache(cache, False):
                return
        except Exception as e:  # TensorRT raises on a corrupt cache in some versions
            log.debug("%s: %s", path, e)
        log.info("%s: timing cache not usable here (other GPU or TensorRT version); starting a new one", path)
    config.set_timing_cache(config.create_timing_cache(b""), False)


def _input_size(network: Any, onnx_path: Path, input_name: str) -> int:
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [input_name]:
        raise EngineBuildError(f"{onnx_path}: expected one input named {input_name!r}, found {names}")
    shape = tuple(network.get_input(0).shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[2] < 1:
        raise EngineBuildError(f"{onnx_path}: input {input_name!r} must be [batch, 3, S, S], found {shape}")
    return int(shape[2])
