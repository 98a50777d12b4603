"""Parity at export time: every produced model run here and compared with the PyTorch reference.

ONNX files run under ONNX Runtime CPU in a child process (``ort_run``: a crashing session cannot take
the export down); the TensorRT engine, where one is built, runs through the runtime's own backend.
Any failed comparison stops the export before the staged artifact is moved into place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from i2p.runtime.backends.onnxruntime import FP16_CPU_DISABLED_OPTIMIZERS
from i2p.runtime.detector import sigmoid
from i2p.runtime.manifest import Manifest
from i2p.runtime.model_files import images_per_call

from . import engine as engine_step
from .build import FP32_ONNX, Build, Progress
from .cpu_optimize import CPU_ONNX, add_cpu_model
from .network import ExportError
from .ort_run import RunnerError, RunResult, run_onnx
from .parity import Comparison, ParityReport, Tolerances
from .probes import CALIB
from .quantize import INT8_ONNX, Calibration, add_int8_model

# ONNX Runtime 1.32's CPU NchwcTransformer segfaults on FP16 graphs (onnxruntime#28392): parity tries the
# default session first and, if the runner dies, once more with that optimizer off (noted in parity.json).
ORT_ATTEMPTS: tuple[tuple[str, ...], ...] = ((), FP16_CPU_DISABLED_OPTIMIZERS)


def reference_name() -> str:
    return f"PyTorch {torch.__version__} FP32 on CPU: the checkpoint's model before merging"


def onnx_parity(build: Build, staging: Path) -> Iterator[Comparison]:
    """Every ONNX file under ONNX Runtime CPU, per probe set; an FP16 model it cannot run is recorded."""
    for file, precision in build.models.items():
        try:
            result, note = run_ort(staging / file, build.probes.stacked(), build.opts.max_batch)
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
        yield from compare(build, file, precision, result, note)


def cpu_model(build: Build, staging: Path, parity: ParityReport, progress: Progress) -> ParityReport:
    """model.cpu.onnx, kept only if it passes the same parity check as model.onnx (else a note says why)."""

    def check(path: Path) -> list[Comparison]:
        return list(
            compare(build, CPU_ONNX, "fp32", *run_ort(path, build.probes.stacked(), build.opts.max_batch))
        )

    with progress.step(f"{CPU_ONNX}: ONNX Runtime CPU fusions, parity against PyTorch"):
        kept, note = add_cpu_model(staging / FP32_ONNX, build.net.blocks[0].attn.num_heads, check)
    build.notes.append(note)
    if kept:
        build.models[CPU_ONNX] = "fp32"
    return ParityReport(parity.reference, (*parity.comparisons, *kept))


def int8_model(build: Build, staging: Path, parity: ParityReport, progress: Progress) -> ParityReport:
    """model.int8.onnx from the CPU FP32 model, kept only if its decisions on --calib-images pass the gate.

    The gate runs on real images only: uniform-noise probes say nothing about the decisions a detector
    makes. Without --calib-images no INT8 file is written (the note says so).
    """
    images = build.probes.images.get(CALIB)
    if images is None:
        build.notes.append(f"{INT8_ONNX}: not built (its decision check needs real images: --calib-images)")
        return parity
    src = CPU_ONNX if CPU_ONNX in build.models else FP32_ONNX

    def check(path: Path) -> Comparison:
        result, note = run_ort(path, images, images_per_call("int8", build.opts.max_batch))
        return Comparison.measure(
            model=INT8_ONNX,
            precision="int8",
            inputs=CALIB,
            runner=result.runner,
            reference=build.reference[CALIB],
            candidate=(result.logits, result.probabilities),
            threshold=build.threshold,
            tolerances=Tolerances(build.opts.atol["int8"]),
            note=note,
        )

    calib = Calibration(images, build.reference[CALIB][0])
    with progress.step(
        f"{INT8_ONNX}: smoothed dynamic INT8 of {src}, decisions on {len(images)} calibration images"
    ):
        decision = add_int8_model(staging / src, check, calib)
    build.notes.append(decision.note)
    if not decision.kept:
        return ParityReport(parity.reference, parity.comparisons, (*parity.rejected, *decision.comparisons))
    build.models[INT8_ONNX] = "int8"
    return ParityReport(parity.reference, (*parity.comparisons, *decision.comparisons), parity.rejected)


def compare(build: Build, file: str, precision: str, result: RunResult, note: str) -> Iterator[Comparison]:
    """One comparison per probe set of ``result`` (computed on all probes) against the reference."""
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


def run_ort(model: Path, images: np.ndarray, batch: int) -> tuple[RunResult, str]:
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


def require_parity(parity: ParityReport, new: Sequence[Comparison], echo: Callable[[str], None]) -> None:
    """Print the ``new`` comparisons; ExportError (staging is discarded) if any comparison failed."""
    echo(ParityReport(parity.reference, tuple(new)).report())
    if not parity.passed:
        raise ExportError(
            "parity outside tolerances; no artifact written:\n"
            + "\n".join(c.report() for c in parity.failures())
        )


def engine(build: Build, staging: Path, manifest: Manifest, progress: Progress) -> Iterator[Comparison]:
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
        path = Path(backend.engine_path)
    finally:
        backend.close()
    result = RunResult(logits, sigmoid(logits), f"i2p.runtime TensorRTBackend ({backend.precision})")
    file = path.relative_to(staging).as_posix() if path.is_relative_to(staging) else str(path)
    note = "the backend returns logits only; probability = sigmoid(logit) on the host"
    build.notes.append(f"TensorRT engine: {file}")
    yield from compare(build, file, "fp16", result, note)
