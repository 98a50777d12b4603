"""``Detector``: an exported artifact behind a small API that never lets one bad image fail a batch.

Loading checks the manifest and the sha256 of the network file before anything is parsed, then picks
the fastest backend present: TensorRT (engine cached per GPU), else ONNX Runtime with its best
providers: the FP16 model on a GPU; on the CPU the fastest model the artifact holds (the preference
order of ``model_files.CATALOGUE``: ``model.int8.onnx``, else the fused FP32 ``model.cpu.onnx``, else
``model.onnx``; ``precision="fp32"`` skips INT8).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from i2p.base.files import sha256_file

from . import schema
from .backends import Backend, InferenceError, checked_scores, tensor_names
from .manifest import (
    MANIFEST,
    PRECISIONS,
    ArtifactError,
    check_session_io,
    read_manifest,
    verify_file,
)
from .memory import decode_memory_bytes
from .model_check import check_model_files
from .preprocess import ImageError, ImageInput, ResizePlan, decode, describe, preprocess, resize_plan
from .streaming import ScorerInfo, stream_predictions

log = logging.getLogger("i2p")

BACKENDS = ("auto", "tensorrt", "onnxruntime")
_SINGLE = (str, os.PathLike, bytes, Image.Image, np.ndarray)
NON_FINITE = "the network returned a non-finite output"  # the error of a NaN or infinite logit

DEFAULT_WORKERS = 2  # decoding threads of predict_stream


class BackendUnavailableError(RuntimeError):
    """The backend that was asked for cannot run on this machine."""


@dataclass(frozen=True)
class Prediction:
    """The result for one input: a probability and a label, or the reason there is none."""

    source: str  # the path, or a short description of an in-memory input
    probability: float | None  # that the image is generated
    is_fake: bool | None  # probability >= the detector's threshold
    error: str | None = None
    # The network's out-of-distribution score (``schema.OodSpec``), and whether it is above the artifact's
    # threshold (the validation images' 95th percentile): an uncertain verdict is one to send to a person.
    # None when the artifact has no OOD output (exported before it) or the backend does not return it.
    ood: float | None = None
    uncertain: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str | None:
        return None if self.is_fake is None else ("fake" if self.is_fake else "real")


@dataclass(frozen=True)
class Prepared:
    """One decoded input, ready to batch: model input, or the error that replaced it."""

    source: str
    data: np.ndarray | None  # float32 CHW, or uint8 HWC for backends that preprocess on the GPU
    error: str | None = None
    plan: ResizePlan | None = None  # with uint8 HWC data: its resize plan, computed once here


class Detector:
    """An i2p artifact ready to score images; safe to share between threads."""

    def __init__(
        self,
        path: str | os.PathLike,
        backend: str = "auto",
        device: int = 0,
        batch_size: int = 32,
        precision: str | None = None,
        threads: int | None = None,
        threshold: float | None = None,
        gpu_preprocessing: bool = True,
        operating_point: str | None = None,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"Detector(path) takes the artifact directory (str or Path), got {type(path).__name__}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
        if precision not in (None, *PRECISIONS):
            raise ValueError(f"precision={precision!r}: choose None (automatic), 'fp32', 'fp16' or 'int8'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        decode_memory_bytes()  # a bad I2P_DECODE_MEMORY_MB is refused here, not at the first image
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.models:
            raise ArtifactError(f"{self.path}: the manifest lists no model files; re-export the artifact")
        self.spec = self.manifest.preprocess
        self._check_io()
        check_model_files(self.path, self.manifest)  # every model file: bounded graph and the I/O contract
        self._logit_name = tensor_names(self.manifest)[1]
        ood = self.manifest.ood
        self._ood_name = schema.OOD_OUTPUT if ood is not None else None
        self.ood_threshold = ood.threshold if ood is not None else None  # above it: Prediction.uncertain
        if threshold is not None:  # a SchemaError (ValueError) for NaN or outside [0, 1]
            threshold = schema.probability(float(threshold), "threshold")
        if threshold is not None and operating_point is not None:
            raise ValueError("pass threshold= or operating_point=, not both")
        if operating_point is not None:  # a named threshold of the manifest ("balanced", "fpr_1pct", ...)
            threshold = self.manifest.point_threshold(operating_point)
        self.threshold = self.manifest.threshold if threshold is None else float(threshold)
        self.batch_size = batch_size
        self.backend: Backend = self._open_backend(backend, device, precision, threads, gpu_preprocessing)
        check_session_io(self.path, self.manifest, getattr(self.backend, "session", None))
        self._gpu_preprocess = self.backend.accepts_images
        self._step = min(batch_size, self.backend.max_batch or batch_size)  # images per backend call
        log.info(
            "i2p: %s loaded on %s, precision %s%s",
            self.path,
            self.backend.name,
            self.backend.precision,
            ", GPU preprocessing" if self._gpu_preprocess else "",
        )

    def __repr__(self) -> str:
        return f"Detector({str(self.path)!r}, backend={self.backend.name!r}, precision={self.backend.precision!r})"

    # -- loading -----------------------------------------------------------------------------------

    def _check_io(self) -> None:
        """The manifest must describe the network this runtime drives: image [N, 3, S, S] in, logit out."""
        size = self.spec.size
        inputs, outputs = self.manifest.inputs, [t.name for t in self.manifest.outputs]
        if len(inputs) != 1 or tuple(inputs[0].shape[1:]) != (3, size, size) or "logit" not in outputs:
            raise ArtifactError(
                f"{self.path}: the manifest describes inputs {[(t.name, t.shape) for t in inputs]} and outputs "
                f"{outputs}; this runtime needs one [batch, 3, {size}, {size}] input and a 'logit' output"
            )

    def _open_backend(
        self, backend: str, device: int, precision: str | None, threads: int | None, gpu_preprocessing: bool
    ) -> Backend:
        """TensorRT when asked for or present (``gpu_preprocessing``: resize on the GPU), else ONNX Runtime."""
        if backend == "tensorrt" and precision in ("fp32", "int8"):
            raise ValueError(
                "the TensorRT backend runs FP16 engines; use backend='onnxruntime' for fp32 or int8"
            )
        if backend != "onnxruntime" and precision not in ("fp32", "int8"):
            trt = _tensorrt_module()
            if trt is None and backend == "tensorrt":
                raise BackendUnavailableError(
                    "backend='tensorrt' needs an NVIDIA GPU with the tensorrt and pycuda packages "
                    "(pip install 'i2p-detector[gpu]', or JetPack's python3-libnvinfer); "
                    "use backend='auto' or 'onnxruntime' to run without it"
                )
            if trt is not None:
                try:
                    return trt.TensorRTBackend(
                        self.path,
                        self.manifest,
                        device,
                        self.batch_size,
                        gpu_preprocessing=gpu_preprocessing,
                    )
                except ArtifactError:
                    raise
                except Exception as e:
                    if backend == "tensorrt":
                        raise
                    log.warning("i2p: TensorRT backend failed (%s); falling back to ONNX Runtime", e)
        return self._open_onnxruntime(device, precision, threads)

    def _open_onnxruntime(self, device: int, precision: str | None, threads: int | None) -> Backend:
        import onnxruntime as ort

        from i2p.base.files import cache_root

        from .backends.onnxruntime import GPU_EPS, OnnxRuntimeBackend, auto_providers

        available = ort.get_available_providers()
        gpu = any(p in available for p in GPU_EPS)
        if precision == "int8" or (not gpu and precision != "fp16"):
            return self._open_cpu(device, precision, threads)
        candidates = self.manifest.choose("gpu", precision)  # the catalogue's order: FP16, then FP32
        if not candidates:
            have = ", ".join(m.precision for m in self.manifest.models)
            raise ArtifactError(
                f"{self.path}: no {precision or 'fp32'} model in this artifact (it has: {have}); "
                f"pass precision={have.split(', ')[0]!r} or re-export (i2p-export --fp16 adds the fp16 model)"
            )
        model = candidates[0]
        chosen = model.precision
        path = verify_file(self.path, self.manifest, model.path)
        size = self.spec.size
        providers = auto_providers(
            device,
            chosen,
            available,
            engine_cache=cache_root() / "ort-trt" / self.manifest.files[model.path][:16] if gpu else None,
            input_shape=(self.manifest.inputs[0].name, self.batch_size, 3, size, size),
        )
        backend = OnnxRuntimeBackend(
            path,
            providers,
            device,
            threads,
            precision=chosen,
            output_name=self._logit_name,
            ood_name=self._ood_name,
        )
        if precision is None and chosen == "fp16" and not backend.on_gpu:
            log.warning("i2p: no GPU provider could start; using the fastest CPU model instead")
            return self._open_cpu(device, None, threads)
        return backend

    def _open_cpu(self, device: int, precision: str | None, threads: int | None) -> Backend:
        """The fastest CPU model of the artifact (the catalogue's order); one ONNX Runtime cannot load is skipped."""
        from .backends.onnxruntime import CPU_EP, OnnxRuntimeBackend

        candidates = self.manifest.choose("cpu", precision)
        if not candidates:
            have = ", ".join(f"{m.precision} ({m.path})" for m in self.manifest.models)
            raise ArtifactError(
                f"{self.path}: no {precision or 'fp32'} CPU model in this artifact (it has: {have}); "
                "re-export it (i2p-export writes the CPU models by default; INT8 needs --calib-images)"
            )
        for i, m in enumerate(candidates):
            path = verify_file(self.path, self.manifest, m.path)
            try:
                return OnnxRuntimeBackend(
                    path,
                    [CPU_EP],
                    device,
                    threads,
                    precision=m.precision,
                    output_name=self._logit_name,
                    ood_name=self._ood_name,
                )
            except RuntimeError as e:  # e.g. an older ONNX Runtime without one of its contrib ops
                if i == len(candidates) - 1:
                    raise
                log.warning("i2p: %s does not load here (%s); trying %s", m.path, e, candidates[i + 1].path)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Release the backend's device resources now rather than at garbage collection."""
        self.backend.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference ---------------------------------------------------------------------------------

    @functools.cached_property
    def scorer(self) -> ScorerInfo:
        """Who scores here: the backend, its precision, and the sha256 of the manifest (which hashes every
        file the runtime loads), as output rows record it."""
        manifest_sha = sha256_file(self.path / MANIFEST)
        return ScorerInfo(self.backend.name, self.backend.precision, f"sha256:{manifest_sha}")

    def predict_stream(
        self, sources: Iterable[ImageInput], workers: int | None = None
    ) -> Iterator[Prediction]:
        """Predictions in source order for a stream of any length, decoding on ``workers`` threads (2)."""
        return stream_predictions(self, sources, DEFAULT_WORKERS if workers is None else workers)

    def predict(self, inputs: Sequence[ImageInput] | ImageInput) -> list[Prediction]:
        """One Prediction per input (paths, bytes, PIL images, uint8 HxWx3 arrays), in order.

        An image that cannot be decoded gets a Prediction with ``error`` set; inputs of a type this
        method cannot read raise TypeError before any work is done.
        """
        items = [inputs] if isinstance(inputs, _SINGLE) else _as_list(inputs)
        for i, item in enumerate(items):
            _check_input(item, i)
        results: list[Prediction] = []
        for chunk in _chunks(items, self._step):  # decoded a chunk at a time: memory stays bounded
            results.extend(self._score([self.prepare(x) for x in chunk]))
        return results

    def prepare(self, src: ImageInput) -> Prepared:
        """Decode and preprocess one input (the part worth running in worker threads)."""
        source = describe(src)
        try:
            # GPU preprocessing gets the decoded image, with the same limits and aspect crop as the CPU path.
            if not self._gpu_preprocess:
                return Prepared(source, preprocess(src, self.spec))
            img = decode(src, self.spec)
            return Prepared(source, np.asarray(img), plan=resize_plan(img.width, img.height, self.spec))
        except ImageError as e:
            return Prepared(source, None, str(e))

    def predict_prepared(self, items: Sequence[Prepared]) -> list[Prediction]:
        """Run the network on the prepared inputs that decoded; the rest keep their errors."""
        return [r for chunk in _chunks(items, self._step) for r in self._score(chunk)]

    def _score(self, items: Sequence[Prepared]) -> list[Prediction]:
        """One backend call for at most ``_step`` prepared inputs."""
        good = [p for p in items if p.error is None]
        try:
            if not good:
                logits = np.zeros(0, np.float32)
            elif self._gpu_preprocess:
                logits = self.backend.infer_images([p.data for p in good], [p.plan for p in good])
            else:
                logits = self.backend.infer(np.stack([p.data for p in good]))
            logits, ood = checked_scores(logits, len(good))
        except InferenceError as e:  # the network failed on this call: its images get the error, not the run
            return [Prediction(p.source, None, None, p.error or f"{p.source}: {e}") for p in items]
        probs = iter(sigmoid(logits))
        oods = iter(ood if ood is not None else [None] * len(good))
        return [
            self._result(p.source, next(probs), next(oods))
            if p.error is None
            else Prediction(p.source, None, None, p.error)
            for p in items
        ]

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities [N] for an already preprocessed float [N, 3, S, S] batch.

        InferenceError if the network fails on it (``predict`` makes that an error row per image).
        """
        size = self.spec.size
        if not isinstance(batch, np.ndarray):
            raise TypeError(
                f"predict_batch takes a numpy array, got {type(batch).__name__}; use predict() for images"
            )
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size) or batch.dtype.kind != "f":
            raise ValueError(
                f"predict_batch expects float32 [N, 3, {size}, {size}] normalized as the manifest says, "
                f"got {batch.dtype} {batch.shape}; use predict() for raw images"
            )
        batch = batch.astype(np.float32, copy=False)
        parts = [
            sigmoid(checked_scores(self.backend.infer(np.ascontiguousarray(chunk)), len(chunk))[0])
            for chunk in _chunks(batch, self._step)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _result(self, source: str, probability: np.float32, ood: np.float32 | None = None) -> Prediction:
        if not np.isfinite(probability) or (ood is not None and not np.isfinite(ood)):
            return Prediction(source, None, None, f"{source}: {NON_FINITE}")
        p = float(probability)
        if ood is None or self.ood_threshold is None:
            return Prediction(source, p, p >= self.threshold)
        return Prediction(
            source, p, p >= self.threshold, ood=float(ood), uncertain=float(ood) > self.ood_threshold
        )


def _chunks(items: Sequence[Any], step: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), step):
        yield items[start : start + step]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function, computed in float64."""
    with np.errstate(invalid="ignore"):  # NaN stays NaN, and becomes an error row
        return np.exp(-np.logaddexp(0.0, -logits.astype(np.float64))).astype(np.float32)


def _as_list(inputs: Iterable[ImageInput]) -> list[ImageInput]:
    try:
        return list(inputs)
    except TypeError:
        raise TypeError(
            f"predict() takes an image or a sequence of images (paths, bytes, PIL images, uint8 arrays), "
            f"got {type(inputs).__name__}"
        ) from None


def _check_input(item: object, index: int) -> None:
    if not isinstance(item, _SINGLE):
        raise TypeError(
            f"input {index} is a {type(item).__name__}; expected a path, bytes, a PIL image or a uint8 HxWx3 array"
        )
    if isinstance(item, np.ndarray) and item.ndim == 4:
        raise TypeError(
            f"input {index} is a 4-D array {item.shape}; use predict_batch() for preprocessed batches"
        )


def _tensorrt_module() -> ModuleType | None:
    """The TensorRT backend module when TensorRT can run here, else None (imported only then)."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        from .backends import tensorrt as trt_backend
    except ImportError as e:
        log.warning("i2p: tensorrt is installed but its backend cannot load (%s)", e)
        return None
    return trt_backend if trt_backend.tensorrt_available() else None
