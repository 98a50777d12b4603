"""What the Triton ensemble computes, in plain numpy: the server side of ``i2p.runtime.remote``.

The Python-backend models that ``i2p-export --triton`` writes are thin wrappers around these functions,
so the server decodes with the runtime's own preprocessing and labels with the Detector's own sigmoid
and threshold rule: a server verdict and a ``Detector.predict`` verdict on the same bytes are the same.
Nothing here imports Triton; the functions are tested without a server.

Wire contract of the ensemble (names shared by the exporter, the models and the client):
``image`` (BYTES [batch, 1], encoded image files) -> ``probability`` (FP32 [batch, 1], NaN on error),
``label`` (BYTES [batch, 1]: ``fake``, ``real`` or empty on error), ``error`` (BYTES [batch, 1]: empty,
or why this image has no verdict; the reason only, the client prefixes the file name).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .detector import NON_FINITE, sigmoid
from .preprocess import ImageError, PreprocessSpec, describe, preprocess

ENSEMBLE = "i2p"  # default ensemble name; the composing models are named f"{ENSEMBLE}_{step}"
STEPS = ("preprocess", "network", "postprocess")
IMAGE, PIXELS, LOGIT, DECODE_ERROR = "image", "pixels", "logit", "decode_error"
VERDICT = ("probability", "label", "error")  # the ensemble's outputs, in this order


def text_tensor(texts: Sequence[str]) -> np.ndarray:
    """A BYTES tensor [N, 1] of UTF-8 strings, as Triton sends them."""
    return np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)


def reason(error: Exception, data: bytes) -> str:
    """The error message without the ``<N bytes>:`` name the runtime puts first (the client knows the name)."""
    prefix = f"{describe(data)}: "
    text = str(error)
    return text[len(prefix) :] if text.startswith(prefix) else text


def decode_batch(blobs: Sequence[bytes], spec: PreprocessSpec) -> tuple[np.ndarray, list[str]]:
    """Encoded images -> (float32 [N, 3, S, S] model inputs, one error per image: '' when it decoded).

    An image that fails gets zeros (the network runs on them; postprocessing drops the result) and its
    reason; anything unexpected from a decoder is caught here too, so one file never fails the batch.
    """
    pixels = np.zeros((len(blobs), 3, spec.size, spec.size), np.float32)
    errors = [""] * len(blobs)
    for i, data in enumerate(blobs):
        try:
            pixels[i] = preprocess(bytes(data), spec)
        except ImageError as e:
            errors[i] = reason(e, data)
        except Exception as e:  # a decoder bug must cost one image, not the batch or the model instance
            errors[i] = f"cannot decode image (internal error {type(e).__name__}: {e})"
    return pixels, errors


def verdicts(
    logits: np.ndarray, errors: Sequence[str], threshold: float
) -> tuple[np.ndarray, list[str], list[str]]:
    """Logits [N] and decode errors -> (probabilities [N], labels, errors), exactly as ``Detector`` decides."""
    probabilities = sigmoid(np.asarray(logits, np.float32).reshape(-1))
    labels, reasons = [], []
    for p, error in zip(probabilities, errors, strict=True):
        if not error and not np.isfinite(p):
            error = NON_FINITE
        is_fake = float(p) >= threshold  # compared in float64, as Detector does
        labels.append("" if error else ("fake" if is_fake else "real"))
        reasons.append(error)
    probabilities[[bool(e) for e in reasons]] = np.nan
    return probabilities, labels, reasons
