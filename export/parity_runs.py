"""Parity at export time: a produced model run here and compared with the PyTorch reference.

ONNX files run under ONNX Runtime CPU in a child process (``ort_run``: a crashing session cannot take
the export down); the TensorRT engine, where one is built, runs through the runtime's own backend
(``optional_models.engine``). Any failed comparison of a kept file stops the export before the staged
artifact is moved into place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from i2p.runtime.backends.onnxruntime import FP16_CPU_DISABLED_OPTIMIZERS
from i2p.runtime.model_files import FileKind

from .build import Build
from .network import ExportError
from .ood_head import OOD_RTOL
from .ort_run import RunnerError, RunResult, run_onnx
from .parity import Comparison, ParityReport, Tolerances

# ONNX Runtime 1.32's CPU NchwcTransformer segfaults on FP16 graphs (onnxruntime#28392): parity tries the
# default session first and, if the runner dies, once more with that optimizer off (noted in parity.json).
ORT_ATTEMPTS: tuple[tuple[str, ...], ...] = ((), FP16_CPU_DISABLED_OPTIMIZERS)


def reference_name() -> str:
    return f"PyTorch {torch.__version__} FP32 on CPU: the checkpoint's model before merging"


def onnx_parity(build: Build, staging: Path, kinds: Iterable[FileKind]) -> Iterator[Comparison]:
    """Each file of ``kinds`` under ONNX Runtime CPU, per probe set; an FP16 model it cannot run is recorded."""
    for kind in kinds:
        file, precision = kind.file, kind.precision
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
                    tolerances=tolerances(build, precision),
                )
            continue
        yield from compare(build, file, precision, result, note)


def compare(
    build: Build, file: str, precision: str, result: RunResult, note: str, with_ood: bool = True
) -> Iterator[Comparison]:
    """One comparison per probe set of ``result`` (computed on all probes) against the reference.

    ``with_ood=False``: a runner that returns logits only (the TensorRT backend); its ood is not compared.
    """
    outputs = build.probes.split(result.logits, result.probabilities)
    ood = build.probes.cut(result.ood) if result.ood is not None else {}
    for name in build.probes.images:
        yield Comparison.measure(
            model=file,
            precision=precision,
            inputs=name,
            runner=result.runner,
            reference=build.reference[name],
            candidate=outputs[name],
            threshold=build.threshold,
            tolerances=tolerances(build, precision),
            note=note,
            ood=ood_pair(build, name, ood.get(name)) if with_ood else None,
        )


def tolerances(build: Build, precision: str) -> Tolerances:
    """The logit limit of ``precision`` (--atol), and the ood limit where the network has an OOD head."""
    return Tolerances(build.opts.atol[precision], OOD_RTOL[precision] if build.density is not None else None)


def ood_pair(build: Build, probes: str, candidate: np.ndarray | None) -> tuple | None:
    """(reference, candidate) ood on one probe set, None for a network without an OOD head."""
    return None if build.ood_reference is None else (build.ood_reference[probes], candidate)


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
            f"checked with ONNX Runtime's {', '.join(disabled)} disabled, as the runtime loads this file: "
            f"that optimizer is known to crash on such graphs (onnxruntime#28392; here: {failures[0]})"
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
