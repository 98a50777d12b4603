"""The TensorRT step: the runtime's own backend builds the engine, so export and first load agree.

Engines are specific to a GPU, its compute capability and the TensorRT version, so they are a cache
(``engines/`` in the artifact, named and keyed by ``i2p.runtime.backends.tensorrt``, not listed in the
manifest). Loading ``TensorRTBackend`` on the staged artifact builds the engine exactly where and how the
runtime would look for it, and returns a backend the parity check can run. Where TensorRT is absent
the runtime builds the engine on the target device on first load; ``--engine yes`` makes its absence an
error instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from i2p.runtime.manifest import Manifest

from .network import ExportError


def available() -> bool:
    try:
        from i2p.runtime.backends.tensorrt import tensorrt_available
    except ImportError:
        return False
    return bool(tensorrt_available())


def require() -> None:
    if not available():
        raise ExportError(
            "--engine yes: TensorRT (the tensorrt and pycuda packages and an NVIDIA GPU) is not available "
            "here. Export with --engine auto or no, and the runtime builds the engine on the target device"
        )


def build(artifact: Path, manifest: Manifest, max_batch: int) -> Any:
    """Build (or reuse) the engine for the artifact staged at ``artifact``; returns the loaded backend.

    The backend has ``infer(float32 NCHW) -> logits``, ``engine_path`` and ``close()``.
    """
    from i2p.runtime.backends.tensorrt import EngineBuildError, TensorRTBackend

    try:
        return TensorRTBackend(artifact, manifest, max_batch=max_batch)
    except EngineBuildError as e:
        raise ExportError(f"TensorRT engine: {e}") from e
