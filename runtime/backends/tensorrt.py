"""TensorRT backend: an FP16 engine built on this GPU from the artifact's ONNX, cached, run on one CUDA stream.

Engines do not move between GPUs or TensorRT versions, so the first load on a machine builds one
(minutes) and caches it in ``ARTIFACT/engines/`` (or the user cache when the artifact is read-only)
under a name keyed by GPU, compute capability, TensorRT version, precision and the ONNX file's sha256.
A JSON sidecar repeats the key and holds the engine's own sha256: a tampered, truncated or foreign
engine is rebuilt, never deserialized.

Precision: TensorRT >= 10 builds a strongly typed network from ``model.fp16.onnx`` (precision comes
from the graph; TensorRT 11 has no other mode). TensorRT 8.5-9 builds from the FP32 ``model.onnx``
with ``BuilderFlag.FP16`` and keeps LayerNorm, its reductions and softmax in FP32 through precision
constraints (TensorRT 8.5 splits LayerNormalization into elementwise and reduce layers, which
lose accuracy in FP16).

Uses only the tensor-name API (TensorRT >= 8.5): ``num_io_tensors``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``. tensorrt and pycuda are imported lazily, so this
module imports on any machine.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from i2p.base.files import cache_root, sha256_file, write_bytes_atomic, write_json_atomic

from ... import kernels
from ..manifest import Manifest, ModelFile, verify_file
from ..preprocess import preprocess

log = logging.getLogger("i2p")

INPUT = "image"
OUTPUT = "logit"
SIDECAR_FORMAT = "i2p-tensorrt-engine"
PRECISIONS = ("fp16", "fp32")


class TensorRTUnavailableError(RuntimeError):
    """TensorRT, pycuda or a GPU is missing; the message says what to install."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file, build an engine, or load the one it built."""


# ----------------------------------------------------------------------------------------------------
# Availability


def _tensorrt() -> Any:
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing
        raise TensorRTUnavailableError(
            f"the TensorRT backend needs the tensorrt Python package ({e}); on Jetson use JetPack's "
            "python3-libnvinfer in a venv made with --system-site-packages, elsewhere pip install tensorrt"
        ) from e
    return trt


@lru_cache(maxsize=1)
def _logger() -> Any:
    """One TensorRT logger per process: builders and runtimes warn when given different ones."""
    trt = _tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def tensorrt_available() -> bool:
    """tensorrt and pycuda import and a CUDA GPU is visible."""
    try:
        _tensorrt()
    except TensorRTUnavailableError as e:
        log.debug("%s", e)
        return False
    return kernels.available()


def trt_version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot parse the TensorRT version {version!r}")
    return int(match.group(1)), int(match.group(2))


def trt_major(version: str) -> int:
    return trt_version_tuple(version)[0]


def engine_source(manifest: Manifest, trt_version: str) -> ModelFile:
    """The ONNX file an FP16 engine is built from: FP16 graph for strong typing (>= 10), else the FP32 one."""
    fp16, fp32 = manifest.model("fp16"), manifest.model("fp32")
    if trt_major(trt_version) >= 10:
        if fp16 is None:
            raise EngineBuildError(
                f"TensorRT {trt_version} builds strongly typed FP16 engines from model.fp16.onnx, "
                "which this artifact lacks; re-export with i2p-export --fp16"
            )
        return fp16
    model = fp32 or fp16
    if model is None:
        raise EngineBuildError("the manifest lists no ONNX model")
    return model


# ----------------------------------------------------------------------------------------------------
# Engine cache: names, sidecars, verification


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def engine_name(gpu_name: str, cc: tuple[int, int], trt_version: str, precision: str, onnx_sha: str) -> str:
    """``{gpu-name-slug}_sm{major}{minor}_trt{version}_{precision}_{onnx-sha256[:12]}.engine``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not re.fullmatch(r"[0-9a-f]{12,64}", onnx_sha):
        raise ValueError(f"expected the ONNX file's hex sha256, got {onnx_sha!r}")
    if not re.fullmatch(r"[0-9][0-9A-Za-z.]*", trt_version):
        raise ValueError(f"unexpected TensorRT version string {trt_version!r}")
    major, minor = cc
    return f"{_slug(gpu_name)}_sm{int(major)}{int(minor)}_trt{trt_version}_{precision}_{onnx_sha[:12]}.engine"


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built for; stored in its sidecar and compared before the engine is trusted."""

    gpu: str
    compute_capability: tuple[int, int]
    tensorrt: str
    precision: str
    onnx_sha256: str
    input_size: int
    max_batch: int
    opt_batch: int

    @property
    def filename(self) -> str:
        return engine_name(self.gpu, self.compute_capability, self.tensorrt, self.precision, self.onnx_sha256)


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(engine_path).with_suffix(".json")


def write_engine(engine_path: str | os.PathLike, data: Any, key: EngineKey) -> str:
    """Write the engine, then its sidecar, each atomically; return the engine's sha256."""
    path = Path(engine_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    digest = sha256_file(path)
    write_json_atomic(sidecar_path(path), {"format": SIDECAR_FORMAT, **asdict(key), "sha256": digest})
    return digest


def engine_mismatch(engine_path: str | os.PathLike, key: EngineKey) -> str | None:
    """None if the engine at ``engine_path`` was built for ``key`` and is intact, else why not.

    An engine built for a larger ``max_batch`` serves a smaller one; ``opt_batch`` only tunes speed.
    """
    path = Path(engine_path)
    side = sidecar_path(path)
    if not path.is_file():
        return "no engine built yet"
    if not side.is_file():
        return f"{side.name} is missing"
    try:
        meta = json.loads(side.read_text())
        built = EngineKey(
            **{
                **{f: meta[f] for f in EngineKey.__dataclass_fields__},
                "compute_capability": tuple(meta["compute_capability"]),
            }
        )
        expected_sha = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{side.name} is unreadable ({e})"
    if meta.get("format") != SIDECAR_FORMAT:
        return f"{side.name} is not an i2p engine sidecar"
    for field in ("gpu", "compute_capability", "tensorrt", "precision", "onnx_sha256", "input_size"):
        if getattr(built, field) != getattr(key, field):
            return (
                f"it was built for {field}={getattr(built, field)!r}, this one needs {getattr(key, field)!r}"
            )
    if built.max_batch < key.max_batch:
        return f"it was built for max_batch={built.max_batch}, {key.max_batch} is needed"
    if sha256_file(path) != expected_sha:
        return f"{path.name} does not match the sha256 in {side.name} (modified or truncated)"
    return None


# ----------------------------------------------------------------------------------------------------
# Building


def _keep_fp32(network: Any, trt: Any) -> int:
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
) -> EngineKey:
    """Build a TensorRT engine for ``onnx_path`` on ``device``, write it and its sidecar atomically.

    The optimization profile covers batch 1..``max_batch`` for input ``"image"``, tuned for
    ``opt_batch``. The timing cache, when given, is read first and saved after, so rebuilds
    (another ``max_batch``, a new export of the same network) take seconds rather than minutes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(
            f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}"
        )
    trt = _tensorrt()
    onnx_path = Path(onnx_path)
    major = trt_major(trt.__version__)
    context = kernels.primary_context(device)
    with kernels.activated(context):
        gpu = kernels.driver().Device(device).name()
        cc = kernels.compute_capability(device)
        logger = _logger()
        builder = trt.Builder(logger)
        flags = 0
        if major < 10:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        elif hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # always on (and ignored) in 11
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if trt_version_tuple(trt.__version__) < (8, 6):  # no LayerNormalization importer before 8.6
            parsed = parser.parse(decompose_layernorm(onnx_path.read_bytes()))
        else:
            parsed = parser.parse_from_file(str(onnx_path))
        if not parsed:
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(
                f"{onnx_path}: TensorRT {trt.__version__} cannot parse this ONNX file: {errors}"
            )
        size = _input_size(network, onnx_path)

        if major >= 10 and precision == "fp16" and not _has_fp16(network, trt):
            raise EngineBuildError(
                f"{onnx_path}: TensorRT {trt.__version__} takes precision from the graph, and this graph has "
                "no FP16 tensors; build FP16 engines from model.fp16.onnx"
            )
        config = builder.create_builder_config()
        if major < 10 and precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            log.info(
                "TensorRT %s: FP16 with %d layers kept in FP32", trt.__version__, _keep_fp32(network, trt)
            )
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT, (1, 3, size, size), (opt_batch, 3, size, size), (max_batch, 3, size, size))
        config.add_optimization_profile(profile)
        cache_path = Path(timing_cache_path) if timing_cache_path else None
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


def decompose_layernorm(model_bytes: bytes) -> bytes:
    """Rewrite ONNX LayerNormalization (last axis) into ReduceMean/Sub/Mul/Add/Sqrt/Div for TensorRT 8.5.

    TensorRT 8.5's ONNX parser has no LayerNormalization importer (8.6 added one). The new nodes are
    named ``<node>/LayerNorm/<step>`` so that ``_keep_fp32`` finds them. Needs the ``onnx`` package.
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:
        raise EngineBuildError(
            "TensorRT < 8.6 cannot parse ONNX LayerNormalization; pip install onnx so that i2p can "
            "rewrite it into elementary ops"
        ) from e
    model = onnx.load_from_string(model_bytes)
    if any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in model.opset_import):
        raise EngineBuildError(
            "LayerNormalization rewrite supports opset 17 (ReduceMean axes as an attribute)"
        )
    graph = model.graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "LayerNormalization":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            attrs.get("axis", -1) != -1
            or attrs.get("stash_type", 1) != 1
            or len([o for o in node.output if o]) != 1
        ):
            raise EngineBuildError(
                f"LayerNormalization {node.name!r}: only axis=-1 with one output can be rewritten"
            )
        x, scale, bias = (list(node.input) + [""])[:3]
        p = f"{node.name or node.output[0]}/LayerNorm"
        eps = numpy_helper.from_array(
            np.asarray(attrs.get("epsilon", 1e-5), helper.tensor_dtype_to_np_dtype(dtypes.get(scale, 1))),
            f"{p}/epsilon",
        )
        graph.initializer.append(eps)
        y = node.output[0]
        nodes += [
            helper.make_node("ReduceMean", [x], [f"{p}/mean"], f"{p}/mean", axes=[-1], keepdims=1),
            helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/centered"], f"{p}/centered"),
            helper.make_node("Mul", [f"{p}/centered", f"{p}/centered"], [f"{p}/squared"], f"{p}/squared"),
            helper.make_node("ReduceMean", [f"{p}/squared"], [f"{p}/var"], f"{p}/var", axes=[-1], keepdims=1),
            helper.make_node("Add", [f"{p}/var", eps.name], [f"{p}/var_eps"], f"{p}/var_eps"),
            helper.make_node("Sqrt", [f"{p}/var_eps"], [f"{p}/std"], f"{p}/std"),
            helper.make_node("Div", [f"{p}/centered", f"{p}/std"], [f"{p}/normed"], f"{p}/normed"),
            helper.make_node("Mul", [f"{p}/normed", scale], [f"{p}/scaled" if bias else y], f"{p}/scaled"),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [f"{p}/scaled", bias], [y], f"{p}/shifted"))
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString()


def _has_fp16(network: Any, trt: Any) -> bool:
    return any(
        network.get_layer(i).get_output(j).dtype == trt.float16
        for i in range(network.num_layers)
        for j in range(network.get_layer(i).num_outputs)
    )


def _use_timing_cache(config: Any, path: Path | None) -> None:
    """Attach the timing cache at ``path`` (or an empty one, if it is absent or from another GPU/version)."""
    if path is not None and path.is_file():
        try:
            cache = config.create_timing_cache(path.read_bytes())
            if cache is not None and config.set_timing_cache(cache, False):
                return
        except Exception as e:  # TensorRT raises on a corrupt cache in some versions
            log.debug("%s: %s", path, e)
        log.info("%s: timing cache not usable here (other GPU or TensorRT version); starting a new one", path)
    config.set_timing_cache(config.create_timing_cache(b""), False)


def _input_size(network: Any, onnx_path: Path) -> int:
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [INPUT]:
        raise EngineBuildError(f"{onnx_path}: expected one input named {INPUT!r}, found {names}")
    shape = tuple(network.get_input(0).shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[2] < 1:
        raise EngineBuildError(f"{onnx_path}: input {INPUT!r} must be [batch, 3, S, S], found {shape}")
    return int(shape[2])


# ----------------------------------------------------------------------------------------------------
# CUDA graphs (pycuda has no graph API: the driver API through ctypes)


class _CudaGraph:
    """Work enqueued on a stream, captured once and replayed with a single launch."""

    THREAD_LOCAL = 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: other threads' CUDA calls stay legal

    def __init__(self, stream_handle: int, enqueue: Callable[[], None]) -> None:
        self._lib = ctypes.CDLL("libcuda.so.1")
        stream = ctypes.c_void_p(stream_handle)
        self._graph, self._exec = ctypes.c_void_p(), ctypes.c_void_p()
        self._check("cuStreamBeginCapture_v2", self._lib.cuStreamBeginCapture_v2(stream, self.THREAD_LOCAL))
        try:
            enqueue()
        finally:
            ended = self._lib.cuStreamEndCapture(stream, ctypes.byref(self._graph))
        self._check("cuStreamEndCapture", ended)
        self._check(
            "cuGraphInstantiateWithFlags",
            self._lib.cuGraphInstantiateWithFlags(
                ctypes.byref(self._exec), self._graph, ctypes.c_ulonglong(0)
            ),
        )

    def _check(self, call: str, status: int) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(status, ctypes.byref(name))
            raise RuntimeError(f"{call} failed: {(name.value or b'?').decode()} ({status})")

    def launch(self, stream_handle: int) -> None:
        self._check("cuGraphLaunch", self._lib.cuGraphLaunch(self._exec, ctypes.c_void_p(stream_handle)))

    def close(self) -> None:
        if self._exec.value:
            self._lib.cuGraphExecDestroy(self._exec)
        if self._graph.value:
            self._lib.cuGraphDestroy(self._graph)
        self._graph, self._exec = ctypes.c_void_p(), ctypes.c_void_p()


# ----------------------------------------------------------------------------------------------------
# The backend


class TensorRTBackend:
    """An artifact's network as a TensorRT engine: ``infer`` float32 NCHW, ``infer_images`` uint8 HWC.

    Host buffers are pinned, copies are asynchronous on one stream, calls are serialized by a lock.
    ``cuda_graph_batch=N`` captures the engine for batches of exactly N (the serving batch size) in
    a CUDA graph and replays it; other sizes run normally.
    """

    name = "tensorrt"
    precision = "fp16"

    def __init__(
        self,
        artifact_dir: str | os.PathLike,
        manifest: Manifest,
        device: int = 0,
        max_batch: int = 32,
        cuda_graph_batch: int | None = None,
    ) -> None:
        self._trt = _tensorrt()
        if not kernels.available():
            raise TensorRTUnavailableError("the TensorRT backend needs pycuda and a CUDA GPU (none found)")
        if cuda_graph_batch is not None and not 1 <= cuda_graph_batch <= max_batch:
            raise ValueError(
                f"cuda_graph_batch={cuda_graph_batch} must be between 1 and max_batch={max_batch}"
            )
        self.artifact = Path(artifact_dir)
        self.manifest = manifest
        self.spec = manifest.preprocess
        self.size = self.spec.size
        self.device = device
        self.max_batch = max_batch
        self._cuda = kernels.driver()
        self._context = kernels.primary_context(device)
        self._lock = threading.Lock()
        self._preprocessor: Any = None
        self._gpu_preprocessing: bool | None = None  # decided at the first infer_images
        self._graph: _CudaGraph | None = None
        self._graph_exec: Any = None  # the execution context a CUDA graph replays
        self._graph_batch = cuda_graph_batch
        with kernels.activated(self._context):
            self.engine_path = self._ensure_engine()
            self._load()
            if cuda_graph_batch is not None:
                self._graph = self._capture(cuda_graph_batch)

    # -- engine --------------------------------------------------------------------------------------

    def _engine_dirs(self) -> list[Path]:
        """Where engines are looked for, in order; the first writable one is where a new one is built."""
        return [self.artifact / "engines", cache_root() / "engines"]

    def _ensure_engine(self) -> Path:
        try:
            model = engine_source(self.manifest, self._trt.__version__)
        except EngineBuildError as e:
            raise EngineBuildError(f"{self.artifact}: {e}") from None
        onnx_path = verify_file(self.artifact, self.manifest, model.path)  # sha256 against the manifest
        gpu = self._cuda.Device(self.device).name()
        key = EngineKey(
            gpu=gpu,
            compute_capability=kernels.compute_capability(self.device),
            tensorrt=self._trt.__version__,
            precision="fp16",
            onnx_sha256=self.manifest.files[model.path],
            input_size=self.size,
            max_batch=self.max_batch,
            opt_batch=max(1, min(8, self.max_batch)),
        )
        reasons = []
        for directory in self._engine_dirs():
            candidate = directory / key.filename
            reason = engine_mismatch(candidate, key)
            if reason is None:
                return candidate
            reasons.append(f"{candidate}: {reason}")
        target = next((d for d in self._engine_dirs() if _writable(d)), None)
        if target is None:
            raise EngineBuildError(
                f"no writable place for a TensorRT engine: {[str(d) for d in self._engine_dirs()]}"
            )
        log.info("building a TensorRT engine because %s", "; ".join(reasons))
        path = target / key.filename
        timing = (
            target
            / f"timing_{_slug(gpu)}_sm{key.compute_capability[0]}{key.compute_capability[1]}_trt{key.tensorrt}.cache"
        )
        build_engine(onnx_path, path, key.max_batch, key.opt_batch, "fp16", timing, self.device)
        return path

    def _load(self) -> None:
        trt, cuda = self._trt, self._cuda
        self._runtime = trt.Runtime(_logger())
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise EngineBuildError(
                f"{self.engine_path}: TensorRT {trt.__version__} could not load this engine; "
                "delete it (and its .json) to rebuild"
            )
        self._exec = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._device_buffers: dict[str, Any] = {}
        self._host: dict[str, np.ndarray] = {}
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT] or OUTPUT not in names:
            raise EngineBuildError(
                f"{self.engine_path}: expected input {INPUT!r} and output {OUTPUT!r}, found {names}"
            )
        for name in names:
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(self.max_batch if d < 0 else d for d in self._engine.get_tensor_shape(name))
            self._device_buffers[name] = cuda.mem_alloc(max(1, int(np.prod(shape))) * dtype.itemsize)
            if name in (INPUT, OUTPUT):
                self._host[name] = cuda.pagelocked_empty(shape, dtype)
        self._bind(self._exec)

    def _bind(self, execution: Any) -> None:
        for name, buffer in self._device_buffers.items():
            execution.set_tensor_address(name, int(buffer))

    def _capture(self, batch: int) -> _CudaGraph | None:
        """Capture the engine for ``batch`` images in its own execution context (the graph fixes shapes)."""
        execution = self._engine.create_execution_context()
        self._bind(execution)
        execution.set_input_shape(INPUT, (batch, 3, self.size, self.size))

        def enqueue() -> None:
            if not execution.execute_async_v3(self._stream.handle):
                raise RuntimeError("execute_async_v3 returned False")

        try:
            enqueue()  # one ordinary run first settles TensorRT's shape-dependent state
            self._stream.synchronize()
            graph = _CudaGraph(self._stream.handle, enqueue)
        except Exception as e:
            log.warning("TensorRT: CUDA graph capture for batch %d failed (%s); running without it", batch, e)
            return None
        self._graph_exec = execution  # the graph replays this context's kernels: keep it alive
        return graph

    # -- inference ----------------------------------------------------------------------------------

    def _execute(self, n: int) -> np.ndarray:
        """Run the engine on the first ``n`` rows of the input binding and return their logits."""
        if self._graph is not None and n == self._graph_batch:
            self._graph.launch(self._stream.handle)
        else:
            if not self._exec.set_input_shape(INPUT, (n, 3, self.size, self.size)):
                raise RuntimeError(
                    f"TensorRT rejected batch size {n} (engine profile is 1..{self.max_batch})"
                )
            if not self._exec.execute_async_v3(self._stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        out = self._host[OUTPUT][:n]
        self._cuda.memcpy_dtoh_async(out, self._device_buffers[OUTPUT], self._stream)
        self._stream.synchronize()
        return out.astype(np.float32).reshape(n)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] -> float32 logits [N]."""
        if batch.ndim != 4 or batch.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"expected a [N, 3, {self.size}, {self.size}] batch, got {batch.shape}")
        parts = []
        for start in range(0, len(batch), self.max_batch):
            chunk = batch[start : start + self.max_batch]
            n = len(chunk)
            with self._lock, kernels.activated(self._context):
                host = self._host[INPUT][:n]
                np.copyto(host, chunk, casting="same_kind")
                self._cuda.memcpy_htod_async(self._device_buffers[INPUT], host, self._stream)
                parts.append(self._execute(n))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def infer_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded uint8 HxWx3 images -> logits [N], preprocessed on the GPU straight into the input binding.

        Falls back to CPU preprocessing (with one warning) when the kernel cannot be compiled here.
        """
        images = kernels.check_images(images)
        preprocessor = self._gpu_preprocessor()
        if preprocessor is None:
            return self.infer(
                np.stack([preprocess(img, self.spec) for img in images])
                if images
                else np.zeros((0, 3, self.size, self.size), np.float32)
            )
        parts = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            with self._lock, kernels.activated(self._context):
                preprocessor.launch(chunk, int(self._device_buffers[INPUT]))
                parts.append(self._execute(len(chunk)))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _gpu_preprocessor(self) -> Any:
        with self._lock:
            if self._gpu_preprocessing is None:
                try:
                    self._preprocessor = kernels.GpuPreprocessor(
                        self.spec, self.device, self.max_batch, self._host[INPUT].dtype, stream=self._stream
                    )
                    self._gpu_preprocessing = True
                except Exception as e:
                    log.warning("GPU preprocessing unavailable (%s); preprocessing on the CPU", e)
                    self._gpu_preprocessing = False
            return self._preprocessor

    def close(self) -> None:
        """Release device memory and TensorRT objects now."""
        with self._lock, kernels.activated(self._context):
            self._stream.synchronize()
            if self._graph is not None:
                self._graph.close()
                self._graph = None
            if self._preprocessor is not None:
                self._preprocessor.close()
            for buffer in self._device_buffers.values():
                buffer.free()
            self._device_buffers.clear()
            self._exec = self._graph_exec = self._engine = self._runtime = None


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)
