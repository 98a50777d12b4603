"""pycuda, imported lazily: availability, the device's primary context, and making it current.

The CUDA context is always the device's *primary* context (never ``pycuda.autoinit``), so the
runtime shares the GPU with TensorRT, ONNX Runtime or PyTorch in one process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

log = logging.getLogger("i2p")


def driver() -> Any:
    """``pycuda.driver``, initialized; ImportError with install advice when pycuda is missing."""
    try:
        import pycuda.driver as cuda  # lazy: pycuda is an optional dependency
    except ImportError as e:
        raise ImportError(
            f"GPU preprocessing needs pycuda ({e}): pip install pycuda with the CUDA toolkit's nvcc on PATH "
            "(on Jetson: export PATH=/usr/local/cuda/bin:$PATH first)"
        ) from e

    cuda.init()
    return cuda


@lru_cache(maxsize=1)
def available() -> bool:
    """pycuda imports and at least one CUDA GPU is visible."""
    try:
        return driver().Device.count() > 0
    except Exception as e:  # ImportError, or pycuda's driver errors when no GPU/driver is present
        log.debug("GPU preprocessing unavailable: %s", e)
        return False


_contexts: dict[int, Any] = {}
_contexts_lock = threading.Lock()


def primary_context(device: int = 0) -> Any:
    """The device's primary context, retained once per process (the CUDA runtime and TensorRT use it too)."""
    with _contexts_lock:
        if device not in _contexts:
            _contexts[device] = driver().Device(device).retain_primary_context()
        return _contexts[device]


@contextlib.contextmanager
def activated(context: Any) -> Iterator[None]:
    """Make ``context`` current on this thread for the block (push/pop, so callers' contexts survive)."""
    context.push()
    try:
        yield
    finally:
        context.pop()


def compute_capability(device: int = 0) -> tuple[int, int]:
    major, minor = driver().Device(device).compute_capability()
    return int(major), int(minor)


def free_pinned(array: Any) -> None:
    """Release a ``pagelocked_empty`` array's pinned memory now (its HostAllocation), not at collection."""
    base = getattr(array, "base", None)
    while base is not None and not hasattr(base, "free"):
        base = getattr(base, "base", None)
    if base is not None:
        base.free()
