"""TensorRT backend: the artifact's network as an FP16 engine built on this GPU, cached, run on one CUDA stream.

The engine comes from ``i2p.runtime.tensorrt`` (cache lookup, build); this module loads it, binds
pinned host and device buffers by the manifest's tensor names, optionally replays the serving batch
size as a CUDA graph, and preprocesses decoded images on the GPU straight into the input binding.

Uses only the tensor-name API (TensorRT >= 8.5): ``num_io_tensors``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``. tensorrt and pycuda are imported lazily, so this
module imports on any machine. An artifact with the OOD output (``manifest.ood``) builds an engine with
the ``ood`` tensor too: ``infer`` then returns [N, 2] (logit, ood), as the ONNX Runtime backend does.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from i2p import kernels

from ..manifest import Manifest, verify_file
from ..model_check import check_loadable
from ..preprocess import ResizePlan, resize_plan
from ..resample import kernel_batch, kernel_tables
from ..schema import OOD_OUTPUT
from ..tensorrt.api import (
    EngineBuildError,
    TensorRTUnavailableError,
    graphs_supported,
    logger,
    tensorrt,
)
from ..tensorrt.api import available as tensorrt_available
from ..tensorrt.cache import EngineKey, engine_cache, engine_source, lookup, timing_cache_name
from ..tensorrt.engine_build import build_engine
from ..tensorrt.graph import CudaGraph
from . import InferenceError, tensor_names

log = logging.getLogger("i2p")

# What callers of the backend need besides the class (i2p.export.engine, the Detector).
__all__ = ["EngineBuildError", "TensorRTBackend", "TensorRTUnavailableError", "tensorrt_available"]


class TensorRTBackend:
    """``infer`` float32 NCHW, ``infer_images`` decoded uint8 HWC; calls are serialized by a lock.

    ``cuda_graph_batch=N`` captures the engine for batches of exactly N (the serving batch size) in
    a CUDA graph and replays it; other sizes run normally. ``graph_captured`` says whether it did.
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
        gpu_preprocessing: bool = True,
    ) -> None:
        self._trt = tensorrt()
        if not kernels.available():
            raise TensorRTUnavailableError("the TensorRT backend needs pycuda and a CUDA GPU (none found)")
        if not 1 <= max_batch <= kernels.MAX_BATCH:
            raise ValueError(f"max_batch={max_batch} must be between 1 and {kernels.MAX_BATCH}")
        if cuda_graph_batch is not None and not 1 <= cuda_graph_batch <= max_batch:
            raise ValueError(
                f"cuda_graph_batch={cuda_graph_batch} must be between 1 and max_batch={max_batch}"
            )
        self.artifact = Path(artifact_dir)
        self.manifest = manifest
        self.spec = manifest.preprocess
        self.size = self.spec.size
        self.input_name, self.output_name = tensor_names(manifest)
        self.ood_name = OOD_OUTPUT if manifest.ood is not None else None  # also fetched when set
        self.device = device
        self.max_batch = max_batch
        self._cuda = kernels.driver()
        self._context = kernels.primary_context(device)
        self._lock = threading.Lock()
        self._graph: CudaGraph | None = None
        self._graph_exec: Any = None  # the execution context a CUDA graph replays
        self._graph_batch = cuda_graph_batch
        self._preprocessor: Any = None
        self._closed = False
        with kernels.activated(self._context):
            self.engine_path = self._ensure_engine()
            self._load()
            if cuda_graph_batch is not None:
                self._graph = self._capture(cuda_graph_batch)
        if gpu_preprocessing:
            self._preprocessor = self._gpu_preprocessor()
        self.accepts_images = self._preprocessor is not None

    @property
    def graph_captured(self) -> bool:
        return self._graph is not None

    # -- engine --------------------------------------------------------------------------------------

    def _ensure_engine(self) -> Path:
        try:
            model = engine_source(self.manifest, self._trt.__version__)
        except EngineBuildError as e:
            raise EngineBuildError(f"{self.artifact}: {e}") from None
        onnx_path = verify_file(self.artifact, self.manifest, model.path)  # sha256 against the manifest
        # a bounded graph of allowlisted ops without external data, before TensorRT parses it
        check_loadable(onnx_path)
        key = EngineKey(
            gpu=self._cuda.Device(self.device).name(),
            compute_capability=kernels.compute_capability(self.device),
            tensorrt=self._trt.__version__,
            precision="fp16",
            onnx_sha256=self.manifest.files[model.path],
            input_size=self.size,
            max_batch=self.max_batch,
            opt_batch=max(1, min(8, self.max_batch)),
        )
        cache = engine_cache()  # the runtime's own: engines are never read from or written into the artifact
        found = lookup(cache, key, self.artifact, self.manifest)
        if not found.found:
            log.info("building a TensorRT engine because %s", "; ".join(found.reasons))
            timing = cache / timing_cache_name(key)
            build_engine(
                onnx_path,
                found.path,
                key.max_batch,
                key.opt_batch,
                "fp16",
                timing,
                self.device,
                self.input_name,
            )
            found = lookup(cache, key)
            if not found.found:
                raise EngineBuildError(f"the engine just built does not verify: {'; '.join(found.reasons)}")
        self._engine_data = found.data
        return found.path

    def _load(self) -> None:
        trt, cuda = self._trt, self._cuda
        self._runtime = trt.Runtime(logger())
        # the bytes lookup() verified (read once): a file swapped after the check is never deserialized
        self._engine = self._runtime.deserialize_cuda_engine(self._engine_data)
        self._engine_data = None
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
        check_engine_io(self.engine_path, names, inputs, self.input_name, self._outputs())
        for name in names:
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(self.max_batch if d < 0 else d for d in self._engine.get_tensor_shape(name))
            self._device_buffers[name] = cuda.mem_alloc(max(1, int(np.prod(shape))) * dtype.itemsize)
            if name == self.input_name or name in self._outputs():
                self._host[name] = cuda.pagelocked_empty(shape, dtype)
        self._bind(self._exec)

    def _bind(self, execution: Any) -> None:
        for name, buffer in self._device_buffers.items():
            execution.set_tensor_address(name, int(buffer))

    def _set_batch(self, execution: Any, n: int) -> None:
        if not execution.set_input_shape(self.input_name, (n, 3, self.size, self.size)):
            raise RuntimeError(f"TensorRT rejected batch size {n} (engine profile is 1..{self.max_batch})")

    def _capture(self, batch: int) -> CudaGraph | None:
        """Capture the engine for ``batch`` images in its own execution context (the graph fixes shapes)."""
        version = self._trt.__version__
        if not graphs_supported(version):
            log.info(
                "TensorRT %s: CUDA graphs skipped (a second execution context would need its own "
                "optimization profile before TensorRT 10); batches of %d run normally",
                version,
                batch,
            )
            return None
        execution = self._engine.create_execution_context()

        def enqueue() -> None:
            if not execution.execute_async_v3(self._stream.handle):
                raise RuntimeError("execute_async_v3 returned False")

        try:
            self._bind(execution)
            self._set_batch(execution, batch)
            enqueue()  # one ordinary run first settles TensorRT's shape-dependent state
            self._stream.synchronize()
            graph = CudaGraph(self._stream.handle, enqueue)
        except Exception as e:
            log.warning("TensorRT: CUDA graph capture for batch %d failed (%s); running without it", batch, e)
            return None
        self._graph_exec = execution  # the graph replays this context's kernels: keep it alive
        return graph

    def _gpu_preprocessor(self) -> Any:
        """The kernel writing straight into the input binding, or None (with one warning) if it cannot run."""
        try:
            return kernels.GpuPreprocessor(
                self.size,
                self.spec.mean,
                self.spec.std,
                self.device,
                self.max_batch,
                self._host[self.input_name].dtype,
                stream=self._stream,
            )
        except Exception as e:
            log.warning("GPU preprocessing unavailable (%s); preprocessing on the CPU", e)
            return None

    # -- inference ----------------------------------------------------------------------------------

    def _outputs(self) -> tuple[str, ...]:
        """The tensors copied back per call: the logit, and the ood score when the artifact has it."""
        return (self.output_name, *((self.ood_name,) if self.ood_name else ()))

    def _execute(self, n: int) -> np.ndarray:
        """Run the engine on the first ``n`` rows of the input binding: their logits [n], or [n, 2] (logit,
        ood) with the OOD output."""
        if self._graph is not None and n == self._graph_batch:
            self._graph.launch(self._stream.handle)
        else:
            self._set_batch(self._exec, n)
            if not self._exec.execute_async_v3(self._stream.handle):
                raise InferenceError("TensorRT execute_async_v3 failed (see its log)")
        outs = []
        for name in self._outputs():
            out = self._host[name][:n]
            self._cuda.memcpy_dtoh_async(out, self._device_buffers[name], self._stream)
            outs.append(out)
        self._stream.synchronize()
        scores = [out.astype(np.float32).reshape(n) for out in outs]
        return scores[0] if len(scores) == 1 else np.stack(scores, axis=1)

    def _check_batch(self, n: int) -> None:
        if self._closed:
            raise RuntimeError("the TensorRT backend is closed")
        if n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds max_batch={self.max_batch} (the engine's profile)")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] with N <= max_batch -> float32 logits [N] ([N, 2] with the ood score)."""
        if batch.ndim != 4 or batch.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"expected a [N, 3, {self.size}, {self.size}] batch, got {batch.shape}")
        n = len(batch)
        if n == 0:
            return np.zeros(0, np.float32)
        with self._lock, kernels.activated(self._context):
            self._check_batch(n)
            host = self._host[self.input_name][:n]
            np.copyto(host, batch, casting="same_kind")
            self._cuda.memcpy_htod_async(self._device_buffers[self.input_name], host, self._stream)
            return self._execute(n)

    def infer_images(
        self, images: Sequence[np.ndarray], plans: Sequence[ResizePlan] | None = None
    ) -> np.ndarray:
        """Decoded uint8 HxWx3 images (N <= max_batch) -> logits [N], preprocessed on the GPU.

        ``plans`` are the images' resize plans when the caller has them (the Detector computes each
        once while decoding, on images already fitted to 16:1); without them the images are fitted
        and planned here. Only when ``accepts_images`` is true.
        """
        if self._preprocessor is None:
            raise RuntimeError("GPU preprocessing is not available on this backend (accepts_images=False)")
        images = kernels.check_images(images)
        if plans is None:
            images, tables = kernel_batch(images, self.spec)
        else:
            for i, (img, plan) in enumerate(zip(images, plans, strict=True)):
                ours = resize_plan(img.shape[1], img.shape[0], self.spec)  # this artifact's preprocessing
                if plan != ours:
                    raise ValueError(
                        f"image {i}: its resize plan is for {plan.src_w}x{plan.src_h} or another preprocessing"
                    )
            tables = [kernel_tables(plan) for plan in plans]
        if not images:
            return np.zeros(0, np.float32)
        with self._lock, kernels.activated(self._context):
            self._check_batch(len(images))
            self._preprocessor.launch(images, tables, int(self._device_buffers[self.input_name]))
            return self._execute(len(images))

    def close(self) -> None:
        """Release the graph, the preprocessor, device and pinned memory, the stream and TensorRT objects now.

        Everything is dropped with the context current, so pycuda frees it on this thread.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with kernels.activated(self._context):
                self._stream.synchronize()
                if self._graph is not None:
                    self._graph.close()
                    self._graph = None
                if self._preprocessor is not None:
                    self._preprocessor.close()
                    self._preprocessor = None
                for buffer in self._device_buffers.values():
                    buffer.free()
                for host in self._host.values():
                    kernels.free_pinned(host)
                self._device_buffers.clear()
                self._host.clear()
                self._exec = self._graph_exec = self._engine = self._runtime = None
                self._stream = None
        self.accepts_images = False


def check_engine_io(
    engine_path: Path, names: Sequence[str], inputs: Sequence[str], input_name: str, outputs: Sequence[str]
) -> None:
    """The engine must have the manifest's one input and every output the backend copies back."""
    missing = [o for o in outputs if o not in names]
    if list(inputs) != [input_name] or missing:
        raise EngineBuildError(
            f"{engine_path}: expected input {input_name!r} and outputs {list(outputs)} (from the manifest), "
            f"found {list(names)}"
        )
