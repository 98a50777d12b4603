"""The optional model files, each *produce → check → keep* over its catalogue row.

``model.cpu.onnx`` (ONNX Runtime's fused CPU kernels) and ``model.int8.onnx`` (smoothed dynamic INT8)
are speed-ups: a file that fails its gate is removed and a note says why, the export goes on. The
TensorRT engine is built by the runtime's own backend where TensorRT is present. Each step returns a
``Produced``; nothing here writes into the shared ``Build``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from i2p.runtime.detector import sigmoid
from i2p.runtime.manifest import Manifest
from i2p.runtime.model_files import CPU, FP32, INT8, FileKind, images_per_call

from . import engine as engine_step
from .build import Build, Progress
from .cpu_optimize import add_cpu_model
from .network import ExportError
from .ort_run import RunResult
from .parity import Comparison
from .parity_inputs import CALIB
from .parity_runs import compare, ood_pair, run_ort, tolerances
from .produced import Produced
from .quantize import Calibration, add_int8_model


def cpu_model(build: Build, staging: Path, progress: Progress) -> Produced:
    """model.cpu.onnx, kept only if it passes the same parity check as model.onnx (else a note says why)."""

    def check(path: Path) -> list[Comparison]:
        return list(
            compare(
                build, CPU.file, CPU.precision, *run_ort(path, build.probes.stacked(), build.opts.max_batch)
            )
        )

    with progress.step(f"{CPU.file}: ONNX Runtime CPU fusions, parity against PyTorch"):
        kept, note = add_cpu_model(staging / FP32.file, build.net.blocks[0].attn.num_heads, check)
    return Produced(kept=(CPU,) if kept else (), comparisons=tuple(kept), notes=(note,))


def int8_model(build: Build, staging: Path, progress: Progress, kept: Sequence[FileKind]) -> Produced:
    """model.int8.onnx from the CPU FP32 model, kept only if its decisions on --calib-images pass the gate.

    The gate runs on real images only: uniform-noise probes say nothing about the decisions a detector
    makes. Without --calib-images no INT8 file is written (the note says so).
    """
    images = build.probes.images.get(CALIB)
    if images is None:
        return Produced(
            notes=(f"{INT8.file}: not built (its decision check needs real images: --calib-images)",)
        )
    src = CPU.file if CPU in kept else FP32.file

    def check(path: Path) -> Comparison:
        result, note = run_ort(path, images, images_per_call(INT8.precision, build.opts.max_batch))
        return Comparison.measure(
            model=INT8.file,
            precision=INT8.precision,
            inputs=CALIB,
            runner=result.runner,
            reference=build.reference[CALIB],
            candidate=(result.logits, result.probabilities),
            threshold=build.threshold,
            tolerances=tolerances(build, INT8.precision),
            note=note,
            ood=ood_pair(build, CALIB, result.ood),
        )

    calib = Calibration(images, build.reference[CALIB][0])
    with progress.step(
        f"{INT8.file}: smoothed dynamic INT8 of {src}, decisions on {len(images)} calibration images"
    ):
        decision = add_int8_model(staging / src, check, calib)
    if not decision.kept:
        return Produced(rejected=decision.comparisons, notes=(decision.note,))
    return Produced(kept=(INT8,), comparisons=decision.comparisons, notes=(decision.note,))


def engine(build: Build, staging: Path, manifest: Manifest, progress: Progress) -> Produced:
    """Build the TensorRT engine with the runtime's backend, and compare it with PyTorch.

    With ``--engine auto`` a build failure (e.g. TensorRT >= 10 without --fp16) is a note, not an error.
    The engine is a cache keyed per GPU (not a manifest entry), so nothing is added to ``kept``.
    """
    try:
        with progress.step(f"TensorRT engine (batch 1..{build.opts.max_batch}) by the runtime's backend"):
            backend = engine_step.build(staging, manifest, build.opts.max_batch)
    except ExportError as e:
        if build.opts.engine == "yes":
            raise
        return Produced(notes=(f"{e}; not built",))
    try:
        images, batch = build.probes.stacked(), build.opts.max_batch
        logits = np.concatenate([backend.infer(images[i : i + batch]) for i in range(0, len(images), batch)])
        path = Path(backend.engine_path)
    finally:
        backend.close()
    result = RunResult(logits, sigmoid(logits), f"i2p.runtime TensorRTBackend ({backend.precision})")
    file = path.relative_to(staging).as_posix() if path.is_relative_to(staging) else str(path)
    note = "the backend returns logits only; probability = sigmoid(logit) on the host"
    comparisons = tuple(compare(build, file, "fp16", result, note, with_ood=False))
    return Produced(comparisons=comparisons, notes=(f"TensorRT engine: {file}",))
