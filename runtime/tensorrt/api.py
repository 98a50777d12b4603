"""The tensorrt package, imported lazily, and the facts about its version the other modules branch on."""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Any

from ... import kernels

log = logging.getLogger("i2p")


class TensorRTUnavailableError(RuntimeError):
    """TensorRT, pycuda or a GPU is missing; the message says what to install."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file, build an engine, or load the one it built."""


def tensorrt() -> Any:
    """The ``tensorrt`` module, or TensorRTUnavailableError saying how to install it."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing
        raise TensorRTUnavailableError(
            f"the TensorRT backend needs the tensorrt Python package ({e}); on Jetson use JetPack's "
            "python3-libnvinfer in a venv made with --system-site-packages, elsewhere pip install tensorrt"
        ) from e
    return trt


@lru_cache(maxsize=1)
def logger() -> Any:
    """One TensorRT logger per process: builders and runtimes warn when given different ones."""
    trt = tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def available() -> bool:
    """tensorrt and pycuda import and a CUDA GPU is visible."""
    try:
        tensorrt()
    except TensorRTUnavailableError as e:
        log.debug("%s", e)
        return False
    return kernels.available()


def version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot parse the TensorRT version {version!r}")
    return int(match.group(1)), int(match.group(2))


def major(version: str) -> int:
    return version_tuple(version)[0]


def graphs_supported(version: str) -> bool:
    """Whether a second execution context of a dynamic-shape engine can run on profile 0.

    Before TensorRT 10 only the first context of an engine gets profile 0; later ones must select
    an unused profile (TensorRT 8.5 ``createExecutionContext``; NVIDIA/TensorRT#846 "Profile 0 has
    been chosen by another IExecutionContext"), so the context a CUDA graph is captured from could
    not enqueue at all. The backend skips graphs there (TensorRT 9 was an LLM-only release).
    """
    return major(version) >= 10
