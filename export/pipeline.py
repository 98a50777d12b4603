"""``i2p-export`` end to end: checkpoint -> merged, truncated network -> ONNX FP32/FP16 -> parity -> artifact.

Everything is written into a staging directory beside the target and moved into place only after
every parity check passed, so a failed export leaves no artifact (see ``artifact.staged_directory``).
Each model step is produce → check → keep over a row of the model-file catalogue and returns what it
made (``Produced``): ``build`` (the network, FP32/FP16 ONNX), ``parity_runs`` (their parity),
``optional_models`` (CPU, INT8, TensorRT engine), then ``manifest`` lists what was kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from i2p.runtime.manifest import Manifest
from i2p.runtime.model_files import for_targets

from . import engine as engine_step
from . import manifest_writer as manifest_step
from . import optional_models
from .artifact import check_target, file_hashes, staged_directory
from .build import Build, Progress, load, merge, write_models
from .network import ExportError
from .options import ENGINE_CHOICES, ExportOptions
from .parity import ParityReport
from .parity_runs import onnx_parity, reference_name, require_parity
from .produced import Produced

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
    reference = reference_name()
    with staged_directory(target, opts.force) as staging:
        made = _shipped(_model_files(build, staging, progress, echo, reference), staging, opts)
        hashes = file_hashes(staging)  # the network files are final from here on
        made += _engine(build, staging, progress, echo, reference, made, hashes)
        parity = made.parity(reference)
        manifest = manifest_step.write(build, made.kept, staging, hashes, parity)
    notes = (*build.notes, *made.notes)
    triton = None
    if opts.triton is not None:
        with progress.step(f"Triton model repository {opts.triton}"):
            triton, triton_notes = _triton(build, target, manifest)
        notes = (*notes, *triton_notes)
    files = {
        p.relative_to(target).as_posix(): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()
    }
    return ExportResult(target, manifest, parity, files, notes, triton, time.perf_counter() - start)


def _model_files(
    build: Build, staging: Path, progress: Progress, echo: Callable[[str], None], reference: str
) -> Produced:
    """The ONNX files every export keeps, each checked against PyTorch; the fused CPU and INT8 files if they pass."""
    made = write_models(build, staging, progress)
    with progress.step("parity against PyTorch (ONNX Runtime CPU)"):
        made += Produced(comparisons=tuple(onnx_parity(build, staging, made.kept)))
    require_parity(made.parity(reference), made.comparisons, echo)
    if build.opts.cpu:
        made += optional_models.cpu_model(build, staging, progress)
    if build.opts.int8:
        made += optional_models.int8_model(build, staging, progress, made.kept)
    return made


def _shipped(made: Produced, staging: Path, opts: ExportOptions) -> Produced:
    """Only the files ``--targets`` load stay in the artifact; every file was checked before it left."""
    kept = for_targets(made.kept, opts.targets, opts.triton_backend)
    left = [k for k in made.kept if k not in kept]
    if not left:
        return made
    for kind in left:
        (staging / kind.file).unlink()
    names = {k.file for k in kept}
    note = (
        f"--targets {','.join(opts.targets)}: {', '.join(k.file for k in left)} checked, then left out "
        "(no target of this artifact loads them)"
    )
    comparisons = tuple(c for c in made.comparisons if c.model in names)
    return Produced(kept, comparisons, made.rejected, (*made.notes, note))


def _engine(
    build: Build,
    staging: Path,
    progress: Progress,
    echo: Callable[[str], None],
    reference: str,
    made: Produced,
    hashes: dict[str, str],
) -> Produced:
    """The TensorRT engine where TensorRT is here and it was not declined; its comparisons must pass."""
    opts = build.opts
    if not {"gpu", "jetson", "triton"} & set(opts.targets):
        return Produced(notes=("TensorRT engine: not built (no GPU target in --targets)",))
    if opts.engine == "no" or not engine_step.available():
        return Produced(
            notes=(
                "TensorRT engine: not requested (--engine no)"
                if opts.engine == "no"
                else "TensorRT engine: TensorRT is not available here; the runtime builds it on the target "
                "device on first load",
            )
        )
    # the engine step loads the staged artifact, so it gets the manifest in memory
    staged = manifest_step.describe(build, made.kept, hashes, made.parity(reference))
    engine = optional_models.engine(build, staging, staged, progress)
    require_parity((made + engine).parity(reference), engine.comparisons, echo)
    return engine


def _preflight(opts: ExportOptions, target: Path) -> None:
    """Every check that needs no model, before the slow steps."""
    if opts.engine not in ENGINE_CHOICES:
        raise ExportError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, not {opts.engine!r}")
    if opts.engine == "yes":
        engine_step.require()
    if any(v < 0 for v in opts.atol.values()):
        raise ExportError(f"tolerances must be >= 0, got {opts.atol}")
    check_target(target, opts.force)
    if opts.triton is not None and "triton" not in opts.targets:
        raise ExportError(
            f"--triton writes a Triton repository: add triton to --targets ({','.join(opts.targets)})"
        )
    if opts.triton is not None:
        from .triton import check_repository  # only with --triton: it needs tritonclient

        check_repository(opts.triton, _triton_options(opts), opts.force)


def _triton_options(opts: ExportOptions) -> Any:
    from .triton import TritonOptions

    return TritonOptions(backend=opts.triton_backend, max_batch=opts.max_batch)


def _triton(build: Build, artifact: Path, manifest: Manifest) -> tuple[Path, list[str]]:
    """The ensemble repository and its notes; triton.py picks the network file (TensorRT plan, FP16 ONNX, ...)."""
    from .triton import write_repository

    opts = build.opts
    return write_repository(opts.triton, artifact, manifest, _triton_options(opts), opts.force)
