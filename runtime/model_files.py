"""The catalogue of model files: every network file an artifact can hold, one typed row each.

Export writes a file only as a row here describes it, the manifest accepts a model entry only if it
matches a row, and the Detector picks among the artifact's files by the rows' preference order (like
ultralytics' ``export_formats()``, read by both its exporter and its ``AutoBackend``). A new kind of
model file is one new row, and every reader sees it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ONNX = "onnx"  # portable ONNX: runs on every ONNX Runtime provider, and TensorRT builds engines from it
CPU_FUSED_FORMAT = "onnx-ort-fused"  # ONNX Runtime's contrib CPU kernels: CPU only, never a TensorRT input
ENGINE_FORMAT = "tensorrt-engine"  # built per GPU and TensorRT version; a cache, not listed in the manifest
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class ModelFile:
    """One network file as the manifest lists it."""

    path: str  # relative to the artifact directory
    precision: str  # "fp32" | "fp16" | "int8"
    format: str = ONNX


@dataclass(frozen=True)
class FileKind:
    """One row of the catalogue: what a model file is, who makes it, what it must pass, who picks it."""

    file: str  # its name in the artifact (engines: the pattern of the keyed name under engines/)
    precision: str
    format: str
    device: str  # where it runs: "any", "cpu" (contrib kernels), "gpu"
    images_per_call: int | None  # the most images one session call takes; None: the whole batch
    produced_by: str  # the export step (module) that writes it
    gate: str  # what it must pass to be kept
    required: bool  # the export fails without it; otherwise a failed gate drops it with a note
    backend: str  # "onnxruntime" | "tensorrt"
    # Preference order of the Detector (0 first; None: never picked automatically there). "cpu": ONNX
    # Runtime without a GPU provider; "gpu": with one (and any explicit precision='fp16').
    rank: tuple[tuple[str, int], ...] = ()

    @property
    def entry(self) -> ModelFile:
        """Its manifest entry."""
        return ModelFile(self.file, self.precision, self.format)

    @property
    def in_manifest(self) -> bool:
        return self.format != ENGINE_FORMAT

    def preference(self, device: str) -> int | None:
        return dict(self.rank).get(device)


PARITY = "parity with the PyTorch model on the probe inputs (parity.json)"
FP32 = FileKind(
    file="model.onnx",
    precision="fp32",
    format=ONNX,
    device="any",
    images_per_call=None,
    produced_by="onnx_export",
    gate=PARITY,
    required=True,
    backend="onnxruntime",
    rank=(("cpu", 2), ("gpu", 1)),
)
FP16 = FileKind(
    file="model.fp16.onnx",
    precision="fp16",
    format=ONNX,
    device="any",
    images_per_call=None,
    produced_by="fp16 (--fp16)",
    gate=PARITY,
    required=True,
    backend="onnxruntime",
    rank=(("gpu", 0),),
)
CPU = FileKind(
    file="model.cpu.onnx",
    precision="fp32",
    format=CPU_FUSED_FORMAT,
    device="cpu",
    images_per_call=None,
    produced_by="cpu_optimize",
    gate=PARITY,
    required=False,
    backend="onnxruntime",
    rank=(("cpu", 1),),
)
# Dynamic INT8 quantizes each op's input with one scale per call: in a batch, the image with the widest
# activations would set the step for all, and an image's score would depend on its batch-mates (up to
# 1.37 logit on the real ViT-B/16 at batch 8). So it runs, and is gated, one image per call.
INT8 = FileKind(
    file="model.int8.onnx",
    precision="int8",
    format=CPU_FUSED_FORMAT,
    device="cpu",
    images_per_call=1,
    produced_by="quantize (--calib-images)",
    gate="decisions on the calibration images (quantize.gate)",
    required=False,
    backend="onnxruntime",
    rank=(("cpu", 0),),
)
ENGINE_FP16 = FileKind(
    file="engines/*_fp16_*.engine",
    precision="fp16",
    format=ENGINE_FORMAT,
    device="gpu",
    images_per_call=None,
    produced_by="engine (built by runtime.tensorrt.engine_build, at export or first load)",
    gate=PARITY,
    required=False,
    backend="tensorrt",
)
ENGINE_FP32 = FileKind(  # built only when asked for (build_engine(precision="fp32")); never picked
    file="engines/*_fp32_*.engine",
    precision="fp32",
    format=ENGINE_FORMAT,
    device="gpu",
    images_per_call=None,
    produced_by="runtime.tensorrt.engine_build",
    gate="none",
    required=False,
    backend="tensorrt",
)

CATALOGUE: tuple[FileKind, ...] = (FP32, FP16, CPU, INT8, ENGINE_FP16, ENGINE_FP32)
MANIFEST_KINDS = tuple(k for k in CATALOGUE if k.in_manifest)
PRECISIONS = tuple(dict.fromkeys(k.precision for k in MANIFEST_KINDS))  # ("fp32", "fp16", "int8")
ENGINE_PRECISIONS = tuple(k.precision for k in CATALOGUE if k.format == ENGINE_FORMAT)


def kind_of(model: ModelFile) -> FileKind | None:
    """The catalogue row of a manifest entry (matched by precision and format), None if there is none."""
    return next(
        (k for k in MANIFEST_KINDS if (k.precision, k.format) == (model.precision, model.format)), None
    )


def images_per_call(precision: str, batch: int) -> int:
    """How many images one session call of a ``precision`` model may take when batches of ``batch`` come."""
    limits = [k.images_per_call for k in MANIFEST_KINDS if k.precision == precision and k.images_per_call]
    return min([batch, *limits])


# Where an artifact is deployed (``i2p-export --targets``): each loads its device's first choice.
TARGETS = ("cpu", "gpu", "jetson", "triton")


def for_targets(
    kept: Sequence[FileKind], targets: Iterable[str], triton_backend: str = "auto"
) -> tuple[FileKind, ...]:
    """The ``kept`` files some target loads: the Detector's first choice on the CPU (``cpu``) or a GPU
    (``gpu``, ``jetson``: ONNX Runtime's and TensorRT's source, FP16 when exported), and for ``triton``
    that network (FP32 for its Python backend, which runs the runtime on the server's CPU). Every target
    at once (the default) keeps every file, the fallbacks too (FP32 where ONNX Runtime lacks a fused op)."""
    if set(targets) >= set(TARGETS):
        return tuple(kept)
    needed: set[FileKind] = set()
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; the targets are {', '.join(TARGETS)}")
        device = "cpu" if target == "cpu" or (target == "triton" and triton_backend == "python") else "gpu"
        precision = "fp32" if target == "triton" and triton_backend == "python" else None
        ranked = sorted(
            (k for k in kept if k.preference(device) is not None and precision in (None, k.precision)),
            key=lambda k: k.preference(device),
        )
        needed.update(ranked[:1])
    return tuple(k for k in kept if k in needed or not k.in_manifest)


def choose(models: Iterable[ModelFile], device: str, precision: str | None = None) -> list[ModelFile]:
    """The listed models that ONNX Runtime runs on ``device``, preferred first; ``precision`` keeps one."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    ranked = []
    for model in models:
        kind = kind_of(model)
        rank = kind.preference(device) if kind is not None else None
        if rank is not None and precision in (None, model.precision):
            ranked.append((rank, model))
    return [m for _, m in sorted(ranked, key=lambda r: r[0])]
