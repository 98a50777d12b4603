"""ONNX Runtime backend: the one that runs anywhere (CPU EP), and on NVIDIA GPUs via the CUDA/TensorRT EPs."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..manifest import ArtifactError
from ..model_check import check_loadable
from ..model_files import CPU_FUSED_FORMAT as CPU_FUSED_FORMAT  # where older callers import it from
from ..model_files import images_per_call  # the catalogue says which files run one image per call
from ..private_cache import UntrustedCacheError, private_dir
from . import InferenceError, checked_logits

log = logging.getLogger("i2p")

TENSORRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
GPU_EPS = (TENSORRT_EP, CUDA_EP)

# What InferenceSession accepts: a provider name, or (name, options).
Provider = str | tuple[str, dict[str, Any]]


def provider_name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


def auto_providers(
    device: int = 0,
    precision: str = "fp32",
    available: list[str] | None = None,
    engine_cache: Path | None = None,
    input_shape: tuple[str, int, int, int, int] | None = None,
) -> list[Provider]:
    """Best providers first: TensorRT EP, CUDA EP, then the CPU EP every build has.

    ``input_shape`` = (input name, max batch, channels, height, width) gives the TensorRT EP one
    optimization profile (batch 1..max) instead of a rebuild per new batch size, so it is required
    whenever the TensorRT EP is available; ``engine_cache`` is where it keeps its engines (key it by
    the model's sha256).
    """
    available = ort.get_available_providers() if available is None else available
    providers: list[Provider] = []
    if TENSORRT_EP in available:
        if input_shape is None:
            raise ValueError(
                "the TensorRT execution provider is available: pass input_shape=(name, max_batch, 3, S, S) "
                "so that it builds one engine for batches 1..max_batch instead of one per batch size"
            )
        opts: dict[str, Any] = {"device_id": device, "trt_fp16_enable": precision == "fp16"}
        if engine_cache is not None:
            try:  # the EP deserializes what it finds there: only a directory of this user's, no links
                private_dir(engine_cache)
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(engine_cache))
            except UntrustedCacheError as e:
                log.warning("i2p: not caching TensorRT EP engines: %s", e)
        name, max_batch, *chw = input_shape
        dims = "x".join(str(d) for d in chw)
        opts.update(
            trt_profile_min_shapes=f"{name}:1x{dims}",
            trt_profile_opt_shapes=f"{name}:{max_batch}x{dims}",
            trt_profile_max_shapes=f"{name}:{max_batch}x{dims}",
        )
        providers.append((TENSORRT_EP, opts))
    if CUDA_EP in available:
        providers.append((CUDA_EP, {"device_id": device}))
    providers.append(CPU_EP)
    return providers


# ONNX Runtime's CPU NchwcTransformer segfaults on FP16 graphs (onnxruntime#28392, seen with 1.32): the
# FP16 model on the CPU provider runs with it disabled. Export's parity run uses the same list.
FP16_CPU_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def model_input_shape(model_path: str | os.PathLike, max_batch: int) -> tuple[str, int, int, int, int]:
    """(name, max_batch, C, H, W) of the model's image input, read with a CPU session that optimizes nothing."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(os.fspath(model_path), sess_options=opts, providers=[CPU_EP])
    first = session.get_inputs()[0]
    _, *chw = first.shape
    if len(chw) != 3 or not all(isinstance(d, int) for d in chw):
        raise RuntimeError(f"{model_path}: input {first.name!r} is {first.shape}, expected [batch, C, H, W]")
    return (first.name, max_batch, *chw)


# The most a session load may take (ONNX Runtime's graph optimizations and constant folding run then): a
# file within the model_check caps loads in seconds; the TensorRT EP builds its engine at load (minutes).
LOAD_SECONDS = 120.0
GPU_LOAD_SECONDS = 1800.0


def _load_session(
    model_path: str | os.PathLike, opts: Any, providers: list[Provider], disabled: list[str], seconds: float
) -> ort.InferenceSession:
    """An InferenceSession, or ArtifactError if loading takes more than ``seconds``.

    The load runs in a daemon thread (ONNX Runtime releases the GIL while it loads) that cannot be
    stopped: after a timeout it finishes or fails in the background and its session is dropped, but the
    caller is free at once.
    """
    result: dict[str, Any] = {}

    def load() -> None:
        try:
            result["session"] = ort.InferenceSession(
                os.fspath(model_path), sess_options=opts, providers=providers, disabled_optimizers=disabled
            )
        except Exception as e:  # ORT raises its own pybind exception types
            result["error"] = e

    thread = threading.Thread(target=load, name=f"i2p-load-{Path(model_path).name}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise ArtifactError(
            f"{model_path}: ONNX Runtime took more than {seconds:g} s to load this model; refusing it"
        )
    if "error" in result:
        e = result["error"]
        raise RuntimeError(f"{model_path}: ONNX Runtime cannot load this model ({e})") from e
    return result["session"]


class OnnxRuntimeBackend:
    """One InferenceSession; ``infer`` may be called from several threads at once (``run`` is thread-safe).

    ``providers=None`` picks them with ``auto_providers``; where the TensorRT EP is available its
    optimization profile covers batch 1..``max_batch`` of the model's own input shape.
    """

    accepts_images = False  # preprocessing happens on the host, before infer
    max_batch = None  # ONNX Runtime takes any batch size

    def __init__(
        self,
        model_path: str | os.PathLike,
        providers: list[Provider] | None = None,
        device: int = 0,
        threads: int | None = None,
        *,
        precision: str = "fp32",
        output_name: str | None = None,
        ood_name: str | None = None,
        max_batch: int = 32,
        load_seconds: float | None = None,
    ) -> None:
        check_loadable(model_path)  # bounded graph, allowlisted ops, no external data: before ORT parses it
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT's placement warnings are expected and not actionable
        if threads is not None:
            opts.intra_op_num_threads = threads
        if providers is None:
            shape = None
            if TENSORRT_EP in ort.get_available_providers():
                shape = model_input_shape(model_path, max_batch)
            providers = auto_providers(device, precision, input_shape=shape)
        on_cpu = provider_name(providers[0]) == CPU_EP
        disabled = list(FP16_CPU_DISABLED_OPTIMIZERS) if precision == "fp16" and on_cpu else []
        seconds = LOAD_SECONDS if load_seconds is None else load_seconds
        if not on_cpu and load_seconds is None:
            seconds = GPU_LOAD_SECONDS
        self.session = _load_session(model_path, opts, providers, disabled, seconds)
        self.model_path = Path(model_path)
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime[{self.providers[0]}]"
        self.precision = precision
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = outputs[0] if output_name is None else output_name
        if self.output_name not in outputs:
            raise RuntimeError(
                f"{model_path}: the model has no {self.output_name!r} output (outputs: {outputs})"
            )
        if ood_name is not None and ood_name not in outputs:
            raise RuntimeError(f"{model_path}: the model has no {ood_name!r} output (outputs: {outputs})")
        self.ood_name = ood_name  # also fetched: infer returns [N, 2] (logit, ood)
        wanted = [provider_name(p) for p in providers]
        if self.providers[0] != wanted[0]:
            log.warning("ONNX Runtime could not use %s; running on %s", wanted[0], self.providers[0])

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] in GPU_EPS

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] -> float32 logits [N]; one image per session call for INT8 models."""
        step = images_per_call(self.precision, len(batch))
        if step >= len(batch):
            return self._run(batch)
        return np.concatenate([self._run(batch[i : i + step]) for i in range(0, len(batch), step)])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        names = [self.output_name, *((self.ood_name,) if self.ood_name else ())]
        try:
            outputs = self.session.run(names, {self.input_name: batch})
        except Exception as e:  # ORT's own exception types: an allocation it cannot make, a kernel error
            raise InferenceError(f"ONNX Runtime failed on {self.model_path.name} ({e})") from e
        logits = checked_logits(outputs[0], len(batch))
        return (
            logits if self.ood_name is None else np.stack([logits, checked_logits(outputs[1], len(batch))], 1)
        )

    def infer_images(self, images: object, plans: object = None) -> np.ndarray:
        raise RuntimeError("ONNX Runtime takes preprocessed batches (accepts_images=False); use infer")

    def close(self) -> None:
        """Nothing to release early: the session's memory goes with the object."""
