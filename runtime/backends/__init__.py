"""Inference backends: each turns a float32 NCHW batch into float32 logits, one per image.

The Detector cuts batches (at most ``max_batch`` images per call) and talks to a backend only
through ``Backend``; a backend that preprocesses on its device says so with ``accepts_images``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..manifest import Manifest
from ..preprocess import ResizePlan


class InferenceError(RuntimeError):
    """The network failed on one call (an allocation it could not make, a runtime error, a wrong output).

    The Detector turns it into error rows for that call's images; the backend stays usable.
    """


def checked_logits(logits: object, n: int) -> np.ndarray:
    """The backend's output as float32 [n]: exactly one logit per image, else InferenceError.

    A graph that passed the load checks can still compute another shape (declared [batch], returns one
    value for the whole batch): without this, some images would get others' scores, or none.
    """
    out = np.asarray(logits)
    if out.shape not in ((n,), (n, 1)) or out.dtype.kind != "f":
        raise InferenceError(
            f"the network returned {out.dtype} {list(out.shape)} for {n} images; expected one logit per image"
        )
    return out.reshape(n).astype(np.float32, copy=False)


def checked_scores(out: object, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits [n], ood [n] or None) from a backend's output: [n] / [n, 1] logits, or [n, 2] (logit, ood)
    from a backend opened with ``ood_name``."""
    arr = np.asarray(out)
    if arr.shape == (n, 2) and arr.dtype.kind == "f":
        return arr[:, 0].astype(np.float32), arr[:, 1].astype(np.float32)
    return checked_logits(arr, n), None


def tensor_names(manifest: Manifest) -> tuple[str, str]:
    """(input, logit output) as the manifest names them: its one input, and its first output.

    The exporter lists the logit first (then the probability); the runtime reads names from the
    manifest rather than assuming them.
    """
    return manifest.inputs[0].name, manifest.outputs[0].name


class Backend(Protocol):
    name: str  # e.g. "onnxruntime[CUDAExecutionProvider]", "tensorrt"
    precision: str  # "fp32" | "fp16"
    max_batch: int | None  # the most images one call takes; None: any number
    accepts_images: bool  # infer_images preprocesses decoded uint8 images on the device

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] -> float32 logits [N], or [N, 2] (logit, ood) for a backend opened with an
        ``ood_name`` (``checked_scores`` reads both). Must be safe to call from several threads."""
        ...

    def infer_images(
        self, images: Sequence[np.ndarray], plans: Sequence[ResizePlan] | None = None
    ) -> np.ndarray:
        """Decoded uint8 HxWx3 images (with their resize plans) -> float32 logits [N].

        Only called when ``accepts_images`` is true; other backends raise RuntimeError.
        """
        ...

    def close(self) -> None:
        """Release device resources now rather than at garbage collection."""
        ...
