"""One run that checks what an NVIDIA GPU can show about the GPU path, on whatever GPU software is present.

Run from the repository root: ``python -m benchmarks.gpu_check [--out DIR]`` (``python
benchmarks/gpu_check.py`` works too). No network: it needs the repo, the GPU's driver, and whichever of
pycuda, cupy, torch (CUDA) + open_clip_torch, onnxruntime-gpu and tensorrt the machine has. Each check
runs when its pieces are present and is reported ``not available: <why>`` otherwise:

- ``kernel-pycuda`` / ``kernel-cupy``: ``kernels/preprocess.cu`` on the GPU (``GpuPreprocessor`` through
  pycuda; cupy's RawModule on the same source) vs the numpy reference, bit for bit, FP32 and FP16, on
  mixed sizes, tall images, 1x1, 8000x6000 -> 224, 20x30 -> 224, odd sizes and a batch of 64;
- ``torch-fp16-numerics``: the merged truncated network (random-init ``--model``, ``--layer`` blocks) in
  torch FP16 on the GPU vs FP32 (TF32 off): max/mean |dlogit|, decision flips;
- ``throughput-torch``: that network in FP16 at batch 1, 8, 64 next to the full open_clip tower in FP16
  (the UnivFD-style baseline), the ratio, and the FLOP floor (L* x per-block GFLOP / measured FP16
  matmul TFLOP/s);
- ``runtime-tensorrt``, ``runtime-ort-cuda``, ``runtime-ort-tensorrt``: an artifact exported here from
  the same random-init network, on that runtime vs FP32 ONNX on the CPU (|dlogit|, flips) and its
  throughput at batch 1, 8, 64;
- ``detect-gpu-preprocessing``: the Detector (what ``i2p-detect`` runs) over a generated folder of
  JPEGs on TensorRT, with GPU preprocessing on and off.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``. Exit status 0 unless a check that ran
failed (every check "not available" is a success: nothing was wrong).

JSON schema (``schema`` = 1)::

    {"schema": 1, "date": ISO-8601 UTC, "command": str, "seconds": float,
     "environment": {"gpu": str|null, "python": str, "packages": {name: version|null},
                     "nvcc": bool, "pycuda_gpu": bool, "cupy_gpu": bool, "torch_cuda": bool,
                     "tensorrt": bool, "ort_providers": [str]},
     "checks": [{"name": str, "status": "pass"|"fail"|"error"|"not available",
                 "reason": str, "figures": {str: number|str|list|dict}}]}
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from i2p.base.files import write_bytes_atomic, write_json_atomic

SCHEMA = 1
PACKAGES = ("numpy", "pycuda", "cupy", "torch", "open_clip", "onnxruntime", "tensorrt")
CUDA_EP, TENSORRT_EP = "CUDAExecutionProvider", "TensorrtExecutionProvider"


@dataclass(frozen=True)
class Environment:
    """What this machine has, as far as the checks care."""

    gpu: str | None = None
    python: str = platform.python_version()
    packages: dict[str, str | None] = field(default_factory=dict)
    nvcc: bool = False
    pycuda_gpu: bool = False
    cupy_gpu: bool = False
    torch_cuda: bool = False
    tensorrt: bool = False
    ort_providers: tuple[str, ...] = ()


@dataclass
class Result:
    name: str
    status: str  # pass | fail | error | not available
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return str(getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as e:  # a package that is installed but cannot load (missing libnvinfer, ...)
        return f"broken: {type(e).__name__}: {e}"[:200]


def probe() -> Environment:
    """Look at the machine without failing: every probe that raises counts as 'absent'."""
    from i2p import kernels
    from i2p.runtime.tensorrt import api

    packages = {name: _version(name) for name in PACKAGES}
    ok = lambda v: v is not None and not v.startswith("broken")  # noqa: E731
    gpu, cupy_gpu, torch_cuda = None, False, False
    pycuda_gpu = ok(packages["pycuda"]) and kernels.available()
    if pycuda_gpu:
        gpu = kernels.driver().Device(0).name()
    if ok(packages["cupy"]):
        try:
            import cupy

            cupy_gpu = cupy.cuda.runtime.getDeviceCount() > 0
            gpu = gpu or cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception:
            cupy_gpu = False
    if ok(packages["torch"]):
        import torch

        torch_cuda = torch.cuda.is_available()
        gpu = gpu or (torch.cuda.get_device_name(0) if torch_cuda else None)
    providers: tuple[str, ...] = ()
    if ok(packages["onnxruntime"]):
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    return Environment(
        gpu=gpu,
        packages=packages,
        nvcc=kernels.find_nvcc() is not None,
        pycuda_gpu=pycuda_gpu,
        cupy_gpu=cupy_gpu,
        torch_cuda=torch_cuda,
        tensorrt=ok(packages["tensorrt"]) and api.available(),
        ort_providers=providers,
    )


def _needs(env: Environment, **wanted: bool) -> str | None:
    """None when every wanted piece is there, else the reason naming the first missing one."""
    why = {
        "gpu": "no NVIDIA GPU visible (through pycuda, cupy or torch)",
        "nvcc": "nvcc (CUDA toolkit) not found",
        "pycuda_gpu": "pycuda is not installed or sees no GPU",
        "cupy_gpu": "cupy is not installed or sees no GPU",
        "torch_cuda": "torch with CUDA is not installed or sees no GPU",
        "open_clip": "open_clip_torch is not installed",
        "tensorrt": "tensorrt (with pycuda and a GPU) is not installed",
        "ort_cuda": f"onnxruntime has no {CUDA_EP} (onnxruntime-gpu not installed)",
        "ort_tensorrt": f"onnxruntime has no {TENSORRT_EP}",
    }
    have = {
        "gpu": env.gpu is not None,
        "nvcc": env.nvcc,
        "pycuda_gpu": env.pycuda_gpu,
        "cupy_gpu": env.cupy_gpu,
        "torch_cuda": env.torch_cuda,
        "open_clip": env.packages.get("open_clip") is not None,
        "tensorrt": env.tensorrt,
        "ort_cuda": CUDA_EP in env.ort_providers,
        "ort_tensorrt": TENSORRT_EP in env.ort_providers,
    }
    missing = [why[k] for k in wanted if not have[k]]
    return "; ".join(missing) or None


# What each check needs; the exporter (torch + open_clip) makes the artifact the runtime checks run on.
REQUIREMENTS: dict[str, dict[str, bool]] = {
    "kernel-pycuda": {"gpu": True, "nvcc": True, "pycuda_gpu": True},
    "kernel-cupy": {"gpu": True, "cupy_gpu": True},
    "torch-fp16-numerics": {"gpu": True, "torch_cuda": True, "open_clip": True},
    "throughput-torch": {"gpu": True, "torch_cuda": True, "open_clip": True},
    "runtime-tensorrt": {"tensorrt": True, "open_clip": True},
    "runtime-ort-cuda": {"ort_cuda": True, "open_clip": True},
    "runtime-ort-tensorrt": {"ort_tensorrt": True, "open_clip": True},
    "detect-gpu-preprocessing": {"tensorrt": True, "nvcc": True, "open_clip": True},
}


def plan(env: Environment) -> dict[str, str | None]:
    """Check name -> None (it runs) or the reason it is not available."""
    return {name: _needs(env, **wanted) for name, wanted in REQUIREMENTS.items()}


def run_checks(
    env: Environment, runners: dict[str, Callable[[], dict[str, Any]]], echo: Callable[[str], None] = print
) -> list[Result]:
    """Run every planned check; a runner returns figures and raises AssertionError for a failed check."""
    results = []
    for name, reason in plan(env).items():
        if reason is not None:
            results.append(Result(name, "not available", reason))
            echo(f"{name}: not available: {reason}")
            continue
        echo(f"{name}: running")
        start = time.perf_counter()
        try:
            result = Result(name, "pass", figures=runners[name]())
        except AssertionError as e:
            result = Result(name, "fail", str(e), getattr(e, "figures", {}))
        except Exception as e:
            result = Result(
                name, "error", f"{type(e).__name__}: {e}", {"traceback": traceback.format_exc()[-3000:]}
            )
        result.figures.setdefault("seconds", round(time.perf_counter() - start, 2))
        echo(f"{name}: {result.status} {result.reason}".rstrip())
        results.append(result)
    return results


def report(env: Environment, results: list[Result], command: str, seconds: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "seconds": round(seconds, 1),
        "environment": {**asdict(env), "ort_providers": list(env.ort_providers)},
        "checks": [asdict(r) for r in results],
    }


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def markdown(rep: dict[str, Any]) -> str:
    """The report as a markdown table (figures inline; tracebacks stay in the JSON)."""
    env = rep["environment"]
    lines = [
        f"GPU check, {rep['date']}, GPU: {env['gpu'] or 'none'}, Python {env['python']}, "
        f"command: `{rep['command']}` ({rep['seconds']} s)",
        "",
        "Packages: " + ", ".join(f"{k} {v or '-'}" for k, v in env["packages"].items()),
        "",
        "| check | status | figures / reason |",
        "| --- | --- | --- |",
    ]
    for c in rep["checks"]:
        figures = {k: v for k, v in c["figures"].items() if k != "traceback"}
        detail = "; ".join(x for x in (c["reason"], _short(figures) if figures else "") if x)
        lines.append(f"| {c['name']} | {c['status']} | {detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="where gpu_check.json/.md go")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model, random init")
    parser.add_argument("--layer", type=int, default=6, help="blocks kept (L*) for the deployed network")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    env = probe()
    from benchmarks import gpu_runners  # the GPU work itself; imported here so probing stays light

    results = run_checks(env, gpu_runners.runners(args))
    command = "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    rep = report(env, results, command.strip(), time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "gpu_check.json", rep)
    write_bytes_atomic(args.out / "gpu_check.md", markdown(rep).encode())
    print(markdown(rep))
    return 1 if any(r.status in ("fail", "error") for r in results) else 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file: make the repo root importable for `benchmarks`
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
