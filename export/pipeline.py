"""``i2p-export`` end to end: checkpoint -> merged, truncated network -> ONNX FP32/FP16 -> parity -> artifact.

Everything is written into a staging directory beside the target and moved into place only after
every parity check passed, so a failed export leaves no artifact (see ``artifact.staged_directory``).
The steps live in ``build`` (network files), ``checks`` (parity), ``manifest`` (manifest.json).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from i2p.runtime.manifest import Manifest

from . import checks
from . import engine as engine_step
from . import manifest as manifest_step
from .artifact import check_target, file_hashes, staged_directory
from .build import Build, Progress, load, merge, write_models
from .network import ExportError
from .options import ENGINE_CHOICES, ExportOptions
from .parity import ParityReport

__all__ = ["ExportOptions", "ExportResult", "run_export"]


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


def run_export(opts: ExportOptions, echo: Callable[[str], None] = print) -> ExportResult:
    start = time.perf_counter()
    progress = Progress(echo)
    target = opts.target
    _preflight(opts, target)
    model, build = load(opts, progress)
    with progress.step(f"merging deltas, truncating at L*={model.layer}/{model.num_layers}"):
        merge(build, model, echo)
    with staged_directory(target, opts.force) as staging:
        parity = _models_and_parity(build, staging, progress, echo)
        hashes = file_hashes(staging)  # the network files are final from here on
        if opts.engine != "no" and engine_step.available():
            # the engine step loads the staged artifact, so it gets the manifest in memory
            staged = manifest_step.describe(build, hashes, parity)
            engine = tuple(checks.engine(build, staging, staged, progress))
            parity = ParityReport(parity.reference, (*parity.comparisons, *engine), parity.rejected)
            checks.require_parity(parity, engine, echo)
        else:
            build.notes.append(
                "TensorRT engine: not requested (--engine no)"
                if opts.engine == "no"
                else "TensorRT engine: TensorRT is not available here; the runtime builds it on the target "
                "device on first load"
            )
        manifest = manifest_step.write(build, staging, hashes, parity)
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


def _models_and_parity(
    build: Build, staging: Path, progress: Progress, echo: Callable[[str], None]
) -> ParityReport:
    """The ONNX files, each checked against PyTorch; the fused CPU model and its INT8 copy if they pass too."""
    write_models(build, staging, progress)
    with progress.step("parity against PyTorch (ONNX Runtime CPU)"):
        parity = ParityReport(checks.reference_name(), tuple(checks.onnx_parity(build, staging)))
    checks.require_parity(parity, parity.comparisons, echo)
    if build.opts.cpu:
        parity = checks.cpu_model(build, staging, parity, progress)
    if build.opts.int8:
        parity = checks.int8_model(build, staging, parity, progress)
    return parity


def _preflight(opts: ExportOptions, target: Path) -> None:
    """Every check that needs no model, before the slow steps."""
    if opts.engine not in ENGINE_CHOICES:
        raise ExportError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, not {opts.engine!r}")
    if opts.engine == "yes":
        engine_step.require()
    if any(v < 0 for v in opts.atol.values()):
        raise ExportError(f"tolerances must be >= 0, got {opts.atol}")
    check_target(target, opts.force)
    if opts.triton is not None:
        from .triton import check_repository  # only with --triton: it needs tritonclient

        check_repository(opts.triton, _triton_options(opts), opts.force)


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
