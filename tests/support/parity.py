"""One parity comparison built from logits alone, as the export checks build them (probability = sigmoid)."""

from __future__ import annotations

import numpy as np

from i2p.export.parity import Comparison, Tolerances
from i2p.runtime.detector import sigmoid


def compare_logits(
    reference, candidate, *, model: str, precision: str, inputs: str, threshold: float = 0.5, atol: float
) -> Comparison:
    """Compare candidate logits with reference logits under ``Tolerances(atol)``."""
    reference, candidate = np.asarray(reference, np.float32), np.asarray(candidate, np.float32)
    return Comparison.measure(
        model=model,
        precision=precision,
        inputs=inputs,
        runner="test",
        reference=(reference, sigmoid(reference)),
        candidate=(candidate, sigmoid(candidate)),
        threshold=threshold,
        tolerances=Tolerances(atol),
    )
