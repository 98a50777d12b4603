"""``i2p-export`` end to end: checkpoint -> merged, truncated network -> ONNX FP32/FP16 -> parity -> artifact.

Everything is written into a staging directory beside the target and moved into place only after
every parity check passed, so a failed export leaves no artifact (see ``artifact.staged_directory``).
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from i2p.base.files import IMAGE_EXTENSIONS, is_image_name, sha256_file, write_json_atomic
from i2p.runtime.backends.onnxruntime import FP16_CPU_DISABLED_OPTIMIZERS
from i2p.runtime.manifest import MANIFEST, Manifest, ModelFile, TensorSpec
from i2p.runtime.preprocess import ImageError, PreprocessSpec, normalize, preprocess
from i2p.train.checkpoint import load_model
from i2p.train.metadata import CheckpointMeta
from i2p.train.model import I2PModel

from . import engine as engine_step
from .artifact import check_target, file_hashes, staged_directory
from .cpu_optimize import CPU_MODEL, CPU_ONNX, add_cpu_model
from .fp16 import DEFAULT_KEEP_FP32, check_fp16_range, convert_fp16
from .network import DeployedDetector, ExportError, check_merge, deploy, largest_weight
from .onnx_export import INPUT, OUTPUTS, check_graph, export_onnx
from .ort_run import RunnerError, RunResult, run_onnx
from .parity import DEFAULT_ATOL, Comparison, ParityReport, Tolerances

FP32_ONNX, FP16_ONNX, PARITY = "model.onnx", "model.fp16.onnx", "parity.json"
MERGE_ATOL, MERGE_PROBES = 1e-5, 4
# ONNX Runtime 1.32's CPU NchwcTransformer segfaults on FP16 graphs (onnxruntime#28392): parity tries the
# default session first and, if the runner dies, once more with that optimizer off (noted in parity.json).
ORT_ATTEMPTS: tuple[tuple[str, ...], ...] = ((), FP16_CPU_DISABLED_OPTIMIZERS)


@dataclass(frozen=True)
class ExportOptions:
    ckpt: Path
    out: Path | None = None  # default: the checkpoint's path with suffix .i2p
    fp16: bool = False
    cpu: bool = False  # also model.cpu.onnx: ONNX Runtime's fused CPU kernels (see cpu_optimize)
    backbone: Path | None = None  # where the base weights moved to (checked by sha256)
    opset: int = 17
    max_batch: int = 32
    engine: str = "auto"  # auto | yes | no
    calib_images: Path | None = None
    calib_limit: int = 256
    random_samples: int = 16
    triton: Path | None = None
    triton_backend: str = "auto"  # auto | tensorrt | onnxruntime | python (see triton.py)
    atol: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ATOL))
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32
    force: bool = False
    seed: int = 0

    @property
    def target(self) -> Path:
        return self.out if self.out is not None else self.ckpt.with_suffix(".i2p")


@dataclass(frozen=True)
class ExportResult:
    artifact: Path
    manifest: Manifest
    parity: ParityReport
    files: dict[str, int]  # artifact file -> bytes
    notes: tuple[str, ...]
    triton: Path | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": str(self.artifact),
            "files": self.files,
            "layer": self.manifest.layer,
            "num_layers": self.manifest.num_layers,
            "parity": self.parity.to_dict(),
            "notes": list(self.notes),
            "triton": str(self.triton) if self.triton else None,
            "seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class ProbeSet:
    """Inputs for the merge and parity checks: one float32 NCHW batch per named set."""

    images: dict[str, np.ndarray]

    def stacked(self) -> np.ndarray:
        return np.concatenate(list(self.images.values()))

    def split(
        self, logits: np.ndarray, probabilities: np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Outputs computed on ``stacked()``, cut back into (logits, probabilities) per set."""
        cuts = np.cumsum([len(v) for v in self.images.values()])[:-1]
        pairs = zip(np.split(logits, cuts), np.split(probabilities, cuts), strict=True)
        return dict(zip(self.images, pairs, strict=True))


@dataclass
class Build:
    """What one export run knows so far; the manifest is written from it."""

    opts: ExportOptions
    meta: CheckpointMeta
    spec: PreprocessSpec
    threshold: float
    probes: ProbeSet
    reference: dict[str, tuple[np.ndarray, np.ndarray]]  # PyTorch outputs per probe set
    net: DeployedDetector | None = None
    largest_weight: tuple[str, float] = ("", 0.0)
    models: dict[str, str] = field(default_factory=dict)  # ONNX file -> precision
    notes: list[str] = field(default_factory=list)


class Progress:
    """Step lines with timings for the slow parts (stderr under --json)."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.echo(f"{what} ...")
        start = time.perf_counter()
        yield
        self.echo(f"  done in {time.perf_counter() - start:.1f} s")


def run_export(opts: ExportOptions, echo: Callable[[str], None] = print) -> ExportResult:
    start = time.perf_counter()
    progress = Progress(echo)
    target = opts.target
    _preflight(opts, target)
    model, build = _load(opts, progress)
    with progress.step(f"merging deltas, truncating at L*={model.layer}/{model.num_layers}"):
        _merge(build, model, echo)
    with staged_directory(target, opts.force) as staging:
        _write_models(build, staging, progress)
        with progress.step("parity against PyTorch (ONNX Runtime CPU)"):
            parity = ParityReport(_reference_name(), tuple(_onnx_parity(build, staging)))
        _require_parity(parity, parity.comparisons, echo)
        if opts.cpu:
            parity = _cpu_model(build, staging, parity, progress)
        manifest = _write_manifest(build, staging, parity)
        if opts.engine != "no" and engine_step.available():
            engine = tuple(_engine(build, staging, manifest, progress))
            parity = ParityReport(parity.reference, (*parity.comparisons, *engine))
            _require_parity(parity, engine, echo)
            manifest = _write_manifest(build, staging, parity)
        else:
            build.notes.append(
                "TensorRT engine: not requested (--engine no)"
                if opts.engine == "no"
                else "TensorRT engine: TensorRT is not available here; the runtime builds it on the target "
                "device on first load"
            )
    triton = None
    if opts.triton is not None:
        with progress.step(f"Triton model repository {opts.triton}"):
            triton = _triton(build, target, manifest)
    files = {
        p.relative_to(target).as_posix(): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()
    }
    return ExportResult(
        target, manifest, parity, files, tuple(build.notes), triton, time.perf_counter() - start
    )


def _preflight(opts: ExportOptions, target: Path) -> None:
    """Every check that needs no model, before the slow steps."""
    if opts.engine not in ("auto", "yes", "no"):
        raise ExportError(f"--engine must be auto, yes or no, not {opts.engine!r}")
    if opts.engine == "yes":
        engine_step.require()
    if any(v < 0 for v in opts.atol.values()):
        raise ExportError(f"tolerances must be >= 0, got {opts.atol}")
    check_target(target, opts.force)
    if opts.triton is not None:
        from .triton import check_repository  # only with --triton: it needs tritonclient

        check_repository(opts.triton, _triton_options(opts), opts.force)


def _load(opts: ExportOptions, progress: Progress) -> tuple[I2PModel, Build]:
    """The unmerged model, and its PyTorch outputs on the probe inputs (the parity reference)."""
    with progress.step(f"loading {opts.ckpt}"):
        model, meta = load_model(opts.ckpt, str(opts.backbone) if opts.backbone else None)
    if meta.threshold is None:
        raise ExportError(f"{opts.ckpt}: the checkpoint has no calibrated threshold; finish training first")
    spec = meta.preprocess
    size = model.tower.image_size
    if (spec.size, spec.size) != (size if isinstance(size, tuple) else (size, size)):
        raise ExportError(
            f"{opts.ckpt}: preprocessing makes {spec.size}x{spec.size} images but the network takes {size}"
        )
    notes: list[str] = []
    if not meta.complete:
        notes.append(
            f"warning: {opts.ckpt.name} is from an unfinished training run (its last completed epoch)"
        )
    probes = _probe_set(opts, spec, notes)
    with progress.step(f"PyTorch FP32 reference on {len(probes.stacked())} inputs (unmerged model)"):
        reference = probes.split(*_torch_outputs(model, probes.stacked(), opts.max_batch))
    return model, Build(opts, meta, spec, meta.threshold, probes, reference, notes=notes)


def _merge(build: Build, model: I2PModel, echo: Callable[[str], None]) -> None:
    """Merge in place, check merged == unmerged on a few inputs, and check the weights fit FP16."""
    net = deploy(model)
    images = build.probes.stacked()[:MERGE_PROBES]
    reference = np.concatenate([lo for lo, _ in build.reference.values()])[:MERGE_PROBES]
    err = check_merge(net, torch.from_numpy(images), torch.from_numpy(reference), MERGE_ATOL)
    build.net, build.largest_weight = net, largest_weight(net)
    name, value = build.largest_weight
    build.notes.append(f"merged == unmerged: max |Δlogit| {err:.2g} (limit {MERGE_ATOL:g})")
    build.notes.append(f"largest |weight| after merging: {value:.6g} ({name})")
    if build.opts.fp16 and (warning := check_fp16_range(name, value)):
        build.notes.append(f"warning: {warning}")
        echo(f"warning: {warning}")


def _probe_set(opts: ExportOptions, spec: PreprocessSpec, notes: list[str]) -> ProbeSet:
    """Random images (uniform pixels, preprocessed like real ones) and, optionally, real images."""
    rng = np.random.default_rng(opts.seed)
    pixels = rng.integers(0, 256, size=(opts.random_samples, spec.size, spec.size, 3), dtype=np.uint8)
    images = {"random": np.stack([normalize(p, spec) for p in pixels])}
    if opts.calib_images is not None:
        images["calib-images"] = _calib_images(opts.calib_images, opts.calib_limit, spec, notes)
    return ProbeSet(images)


def _calib_images(folder: Path, limit: int, spec: PreprocessSpec, notes: list[str]) -> np.ndarray:
    if not folder.is_dir():
        raise ExportError(f"{folder}: --calib-images must be a folder of images")
    files = sorted(p for p in folder.rglob("*") if is_image_name(p) and p.is_file())
    if not files:
        raise ExportError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) for --calib-images")
    if len(files) > limit:  # an even spread over the sorted list covers every sub-folder (class, generator)
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    batch, skipped = [], []
    for f in files:
        try:
            batch.append(preprocess(f, spec))
        except ImageError as e:
            skipped.append(str(e))
    if skipped:
        notes.append(f"--calib-images: skipped {len(skipped)} unreadable images, e.g. {skipped[0]}")
    if not batch:
        raise ExportError(f"{folder}: none of the {len(files)} calibration images could be read")
    return np.stack(batch)


@torch.no_grad()
def _torch_outputs(model: I2PModel, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    logits = torch.cat([model(torch.from_numpy(images[i : i + batch])) for i in range(0, len(images), batch)])
    return logits.numpy(), torch.sigmoid(logits).numpy()


def _write_models(build: Build, staging: Path, progress: Progress) -> None:
    """model.onnx (checked for structure) and, with --fp16, model.fp16.onnx."""
    opts, net = build.opts, build.net
    with progress.step(f"ONNX export (opset {opts.opset}, dynamic batch)"):
        export_onnx(net, staging / FP32_ONNX, opts.opset)
        summary = check_graph(staging / FP32_ONNX, net.layer)
    build.notes.append(
        f"graph: {summary.blocks} transformer blocks, {summary.linear_maps} linear maps, no adapter ops"
    )
    build.models[FP32_ONNX] = "fp32"
    if opts.fp16:
        kept = ", ".join(opts.keep_fp32) or "none"
        with progress.step(f"FP16 conversion (float32 I/O; kept in FP32: {kept})"):
            convert_fp16(staging / FP32_ONNX, staging / FP16_ONNX, opts.keep_fp32)
        build.models[FP16_ONNX] = "fp16"


def _onnx_parity(build: Build, staging: Path) -> Iterator[Comparison]:
    """Every ONNX file under ONNX Runtime CPU, per probe set; an FP16 model it cannot run is recorded."""
    for file, precision in build.models.items():
        try:
            result, note = _run_ort(staging / file, build.probes.stacked(), build.opts.max_batch)
        except RunnerError as e:
            if precision == "fp32":
                raise ExportError(f"{file}: ONNX Runtime CPU cannot run the FP32 model: {e}") from e
            for name, images in build.probes.images.items():
                yield Comparison.not_run(
                    model=file,
                    precision=precision,
                    inputs=name,
                    samples=len(images),
                    reason=f"ONNX Runtime CPU cannot run it here: {e}",
                    threshold=build.threshold,
                    tolerances=Tolerances(build.opts.atol[precision]),
                )
            continue
        yield from _compare(build, file, precision, result, note)


def _cpu_model(build: Build, staging: Path, parity: ParityReport, progress: Progress) -> ParityReport:
    """model.cpu.onnx, kept only if it passes the same parity check as model.onnx (else a note says why)."""

    def check(path: Path) -> list[Comparison]:
        return list(
            _compare(build, CPU_ONNX, "fp32", *_run_ort(path, build.probes.stacked(), build.opts.max_batch))
        )

    with progress.step(f"{CPU_ONNX}: ONNX Runtime CPU fusions, parity against PyTorch"):
        kept, note = add_cpu_model(staging / FP32_ONNX, build.net.blocks[0].attn.num_heads, check)
    build.notes.append(note)
    if kept:
        build.models[CPU_ONNX] = "fp32"
    return ParityReport(parity.reference, (*parity.comparisons, *kept))


def _compare(build: Build, file: str, precision: str, result: RunResult, note: str) -> Iterator[Comparison]:
    outputs = build.probes.split(result.logits, result.probabilities)
    for name in build.probes.images:
        yield Comparison.measure(
            model=file,
            precision=precision,
            inputs=name,
            runner=result.runner,
            reference=build.reference[name],
            candidate=outputs[name],
            threshold=build.threshold,
            tolerances=Tolerances(build.opts.atol[precision]),
            note=note,
        )


def _run_ort(model: Path, images: np.ndarray, batch: int) -> tuple[RunResult, str]:
    """Run with default session options; if ONNX Runtime crashes, retry with the known-bad optimizer off."""
    failures = []
    for disabled in ORT_ATTEMPTS:
        try:
            result = run_onnx(model, images, batch, disabled)
        except RunnerError as e:
            failures.append(
                f"{' and '.join(disabled) + ' disabled' if disabled else 'default session options'}: {e}"
            )
            continue
        note = (
            f"{failures[0]}; rerun with {', '.join(disabled)} disabled (onnxruntime#28392)"
            if failures
            else ""
        )
        return result, note
    raise RunnerError("; ".join(failures))


def _reference_name() -> str:
    return f"PyTorch {torch.__version__} FP32 on CPU: the checkpoint's model before merging"


def _require_parity(parity: ParityReport, new: Sequence[Comparison], echo: Callable[[str], None]) -> None:
    """Print the ``new`` comparisons; ExportError (staging is discarded) if any comparison failed."""
    echo("\n".join([f"reference: {parity.reference}", *(c.report() for c in new)]))
    if not parity.passed:
        raise ExportError(
            "parity outside tolerances; no artifact written:\n"
            + "\n".join(c.report() for c in parity.failures())
        )


def _engine(build: Build, staging: Path, manifest: Manifest, progress: Progress) -> Iterator[Comparison]:
    """Build the TensorRT engine with the runtime's backend; yields its comparisons with PyTorch.

    With ``--engine auto`` a build failure (e.g. TensorRT >= 10 without --fp16) is a note, not an error.
    """
    try:
        with progress.step(f"TensorRT engine (batch 1..{build.opts.max_batch}) by the runtime's backend"):
            backend = engine_step.build(staging, manifest, build.opts.max_batch)
    except ExportError as e:
        if build.opts.engine == "yes":
            raise
        build.notes.append(f"{e}; not built")
        return
    try:
        images, batch = build.probes.stacked(), build.opts.max_batch
        logits = np.concatenate([backend.infer(images[i : i + batch]) for i in range(0, len(images), batch)])
        engine = Path(backend.engine_path)
    finally:
        backend.close()
    probabilities = (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    result = RunResult(logits, probabilities, f"i2p.runtime TensorRTBackend ({backend.precision})")
    file = engine.relative_to(staging).as_posix() if engine.is_relative_to(staging) else str(engine)
    note = "the backend returns logits only; probability = sigmoid(logit) on the host"
    build.notes.append(f"TensorRT engine: {file}")
    yield from _compare(build, file, "fp16", result, note)


def _write_manifest(build: Build, staging: Path, parity: ParityReport) -> Manifest:
    write_json_atomic(staging / PARITY, parity.to_dict())
    manifest = _manifest(build, staging, parity)
    write_json_atomic(staging / MANIFEST, manifest.to_json())
    return manifest


def _manifest(build: Build, staging: Path, parity: ParityReport) -> Manifest:
    opts, meta, net = build.opts, build.meta, build.net
    size = net.image_size
    name, value = build.largest_weight
    extra: dict[str, Any] = {
        "checkpoint": {"file": opts.ckpt.name, "sha256": sha256_file(opts.ckpt)},
        "backbone_weights": {
            "pretrained": meta.backbone.pretrained,
            "sha256": meta.backbone.sha256,
        },
        "baseline": meta.baseline,
        "metrics": meta.metrics,
        "compute_kept": f"{net.layer}/{net.num_layers} transformer blocks",
        "opset": opts.opset,
        "max_batch": opts.max_batch,
        "largest_abs_weight": {"name": name, "value": value},
        "parity": parity.summary(),
    }
    if opts.fp16:
        extra["fp16"] = {
            "file": FP16_ONNX,
            "io_dtype": "float32",
            "compute_dtype": "float16",
            "kept_in_fp32": list(opts.keep_fp32),
        }
    return Manifest(
        name=opts.target.stem,
        backbone=meta.backbone.model,
        layer=net.layer,
        num_layers=net.num_layers,
        threshold=build.threshold,
        preprocess=build.spec,
        inputs=(TensorSpec(INPUT, "float32", ("batch", 3, size, size)),),
        outputs=tuple(TensorSpec(o, "float32", ("batch",)) for o in OUTPUTS),
        models=tuple(
            CPU_MODEL if file == CPU_ONNX else ModelFile(file, precision)
            for file, precision in build.models.items()
        ),
        files=file_hashes(staging),
        tools=_tool_versions(),
        extra=extra,
    )


def _tool_versions() -> dict[str, str]:
    tools = {"python": platform.python_version()}
    for dist in ("i2p-detector", "torch", "open_clip_torch", "onnx", "onnxruntime", "tensorrt"):
        try:
            tools[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return tools


def _triton_options(opts: ExportOptions) -> Any:
    from .triton import TritonOptions

    return TritonOptions(backend=opts.triton_backend, max_batch=opts.max_batch)


def _triton(build: Build, artifact: Path, manifest: Manifest) -> Path:
    """The ensemble repository; triton.py picks the network file (TensorRT plan if built, FP16 ONNX, ...)."""
    from .triton import write_repository

    opts = build.opts
    ensemble, notes = write_repository(opts.triton, artifact, manifest, _triton_options(opts), opts.force)
    build.notes.extend(notes)
    return ensemble
