"""Inference backends: each turns a float32 NCHW batch into float32 logits, one per image."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str  # e.g. "onnxruntime[CUDAExecutionProvider]", "tensorrt"
    precision: str  # "fp32" | "fp16"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] -> float32 logits [N]. Must be safe to call from several threads."""
        ...
