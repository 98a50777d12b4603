"""Run one ONNX model under ONNX Runtime in a child process, so a crashing execution provider is a result.

ONNX Runtime can die with SIGSEGV on graphs it does not handle (1.32's CPU ``NchwcTransformer`` on FP16
models, onnxruntime#28392). Parity runs every model through ``run_onnx``, which starts
``python -m i2p.export.ort_run`` (numpy + onnxruntime only, no torch) and reports a crash as
``RunnerError`` with the signal instead of taking the export down with it.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROVIDER = "CPUExecutionProvider"


class RunnerError(RuntimeError):
    """ONNX Runtime could not load or run the model; the message says how it failed."""


@dataclass(frozen=True)
class RunResult:
    logits: np.ndarray
    probabilities: np.ndarray
    runner: str  # e.g. "onnxruntime 1.32.0 CPUExecutionProvider"
    ood: np.ndarray | None = None  # the third output of a network with an OOD head


def run_onnx(
    model: Path,
    images: np.ndarray,
    batch: int,
    disabled_optimizers: Sequence[str] = (),
    timeout: float = 1800,
) -> RunResult:
    """(logits, probabilities) of ``model`` on float32 NCHW ``images``, in batches of ``batch``."""
    with tempfile.TemporaryDirectory(prefix="i2p-ort-") as tmp:
        inputs, outputs = Path(tmp) / "images.npy", Path(tmp) / "outputs.npz"
        np.save(inputs, np.ascontiguousarray(images, np.float32))
        cmd = [sys.executable, "-m", "i2p.export.ort_run", str(model), str(inputs), str(outputs)]
        cmd += ["--batch", str(batch), *(a for name in disabled_optimizers for a in ("--disable", name))]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RunnerError(f"onnxruntime did not finish within {timeout:.0f} s") from e
        if proc.returncode != 0:
            raise RunnerError(_failure(proc.returncode, proc.stderr))
        with np.load(outputs) as out:
            meta = json.loads(str(out["meta"]))
            ood = out["ood"] if "ood" in out.files else None
            return RunResult(out["logits"], out["probabilities"], meta["runner"], ood)


def _failure(code: int, stderr: str) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"onnxruntime crashed ({name}) while loading or running the model"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"onnxruntime exited with status {code}"


def main(argv: Sequence[str] | None = None) -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("inputs")
    p.add_argument("outputs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--disable", action="append", default=[], help="ORT graph optimizer to turn off")
    args = p.parse_args(argv)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        args.model, opts, providers=[PROVIDER], disabled_optimizers=args.disable or None
    )
    images = np.load(args.inputs)
    image = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]  # (logit, probability[, ood]): export_onnx's order
    parts = [
        session.run(outputs, {image: images[i : i + args.batch]}) for i in range(0, len(images), args.batch)
    ]
    runner = f"onnxruntime {ort.__version__} {session.get_providers()[0]}"
    if args.disable:
        runner += f" ({', '.join(args.disable)} disabled)"
    extra = {"ood": np.concatenate([p[2] for p in parts]).astype(np.float32)} if len(outputs) > 2 else {}
    np.savez(
        args.outputs,
        logits=np.concatenate([p[0] for p in parts]).astype(np.float32),
        probabilities=np.concatenate([p[1] for p in parts]).astype(np.float32),
        meta=json.dumps({"runner": runner}),
        **extra,
    )


if __name__ == "__main__":
    main()
