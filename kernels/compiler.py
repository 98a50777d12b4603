"""Compiling ``preprocess.cu`` with nvcc: finding nvcc, asking it which GPUs it targets, the cubin cache.

No fast-math anywhere: the normalization must round exactly like numpy.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from i2p.base.files import cache_root, sha256_file

log = logging.getLogger("i2p")

SOURCE = Path(__file__).with_name("preprocess.cu")
_ARCH = re.compile(r"sm_\d+[a-z]?")


class KernelBuildError(RuntimeError):
    """nvcc is missing or failed; the message says which and how to fix it."""


def find_nvcc() -> str | None:
    """nvcc from PATH, $CUDA_HOME / $CUDA_PATH, or /usr/local/cuda (where JetPack puts it, off PATH)."""
    candidates = [shutil.which("nvcc")]
    candidates += [
        os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ
    ]
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError(
            "nvcc not found (looked on PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin); "
            "install the CUDA toolkit (on Jetson it ships with JetPack) or set CUDA_HOME"
        )
    return nvcc


def supported_archs() -> list[str]:
    """The ``sm_XY`` targets this nvcc can compile for (``nvcc --list-gpu-code``; JetPack 5's 11.4 stops at sm_87)."""
    proc = subprocess.run([_nvcc(), "--list-gpu-code"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelBuildError(f"nvcc --list-gpu-code failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return [a for a in proc.stdout.split() if _ARCH.fullmatch(a)]


def nvcc_compile(arch: str | Sequence[str], out: str | os.PathLike, extra_flags: Sequence[str] = ()) -> str:
    """Compile ``preprocess.cu`` to a cubin (one ``sm_XY``) or a fatbin (several); return ptxas's report.

    ``-Xptxas -v`` makes ptxas print registers, stack and spills per kernel and architecture
    (``parse_ptxas_report`` reads it).
    """
    nvcc = _nvcc()
    archs = [arch] if isinstance(arch, str) else list(arch)
    if not archs or not all(_ARCH.fullmatch(a) for a in archs):
        raise ValueError(f"expected architectures like 'sm_87', got {arch!r}")
    if len(archs) == 1:
        target = ["-cubin", f"-arch={archs[0]}"]
    else:
        target = ["-fatbin"] + [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    cmd = [nvcc, *target, "-Xptxas", "-v", *extra_flags, "-o", os.fspath(out), os.fspath(SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{report[-4000:]}")
    return report


@dataclass(frozen=True)
class KernelResources:
    """One kernel on one architecture, as ptxas reports it."""

    kernel: str
    arch: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_report(report: str) -> list[KernelResources]:
    """Every (kernel, architecture) block of a ``-Xptxas -v`` report; raises if a block is incomplete."""
    found = []
    blocks = _ENTRY.split(report)  # [preamble, name, arch, body, name, arch, body, ...]
    for name, arch, body in zip(blocks[1::3], blocks[2::3], blocks[3::3], strict=True):
        frame, regs = _FRAME.search(body), _REGS.search(body)
        if frame is None or regs is None:
            raise ValueError(f"ptxas report for {name} on {arch} has no stack/spill or register line")
        stack, stores, loads = map(int, frame.groups())
        found.append(KernelResources(name, arch, int(regs.group(1)), stack, stores, loads))
    return found


def source_sha256() -> str:
    return sha256_file(SOURCE)


def cache_dir() -> Path:
    """Where compiled kernels are cached: ``cache_root() / "kernels"``."""
    return cache_root() / "kernels"


def compile_kernels(arch: str) -> Path:
    """The cubin for ``arch`` (e.g. ``"sm_87"``), compiled once and cached by architecture and source hash."""
    directory = cache_dir()
    path = directory / f"preprocess_{arch}_{source_sha256()[:16]}.cubin"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        report = nvcc_compile(arch, tmp)
        os.replace(tmp, path)  # concurrent builders each write a whole file; the last one wins
    finally:
        Path(tmp).unlink(missing_ok=True)
    for r in parse_ptxas_report(report):
        log.debug(
            "compiled %s for %s: %d registers, %d B spilled", r.kernel, r.arch, r.registers, r.spill_stores
        )
    log.info("compiled the GPU preprocessing kernel for %s into %s", arch, path)
    return path
