"""What the Triton ensemble computes, in plain numpy: the server side of ``i2p.runtime.remote``.

The Python-backend models that ``i2p-export --triton`` writes are thin wrappers around these functions,
so the server decodes with the runtime's own preprocessing and labels with the Detector's own sigmoid
and threshold rule: a server verdict and a ``Detector.predict`` verdict on the same bytes are the same.
Nothing here imports Triton; the functions are tested without a server.

Wire contract of the ensemble (names shared by the exporter, the models and the client):
``image`` (BYTES [batch, 1], encoded image files) -> ``probability`` (FP32 [batch, 1], NaN on error),
``label`` (BYTES [batch, 1]: ``fake``, ``real`` or empty on error), ``error`` (BYTES [batch, 1]: empty,
or why this image has no verdict; the reason only, the client prefixes the file name). An artifact with the
OOD output (``schema.OodSpec``) adds ``ood`` (FP32 [batch, 1], NaN on error) and ``uncertain`` (BOOL
[batch, 1]: ood > the artifact's OOD threshold, false on error); the ensemble's parameter ``ood_threshold``
holds that threshold, or ``absent`` (the artifact has no OOD output: neither tensor exists).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .detector import NON_FINITE, sigmoid
from .preprocess import ImageError, PreprocessSpec, describe, preprocess
from .schema import OOD_OUTPUT

ENSEMBLE = "i2p"  # default ensemble name; the composing models are named f"{ENSEMBLE}_{step}"
STEPS = ("preprocess", "network", "postprocess")
IMAGE, PIXELS, LOGIT, DECODE_ERROR = "image", "pixels", "logit", "decode_error"
VERDICT = ("probability", "label", "error")  # the ensemble's outputs, in this order
OOD_SCORE = "ood_score"  # the network's ood output, as the postprocess model takes it
OOD_VERDICT = (OOD_OUTPUT, "uncertain")  # the ensemble's outputs after VERDICT, with the OOD output
OOD_ABSENT = "absent"  # the ``ood_threshold`` parameter of an ensemble without them


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
    logits: np.ndarray, errors: Sequence[str], threshold: float, ood: np.ndarray | None = None
) -> tuple[np.ndarray, list[str], list[str]]:
    """Logits [N] and decode errors -> (probabilities [N], labels, errors), exactly as ``Detector`` decides
    (with the network's ``ood`` scores: a non-finite one is an error too, as there)."""
    probabilities = sigmoid(np.asarray(logits, np.float32).reshape(-1))
    scores = np.zeros(len(probabilities)) if ood is None else np.asarray(ood, np.float32).reshape(-1)
    labels, reasons = [], []
    for p, score, error in zip(probabilities, scores, errors, strict=True):
        if not error and not (np.isfinite(p) and np.isfinite(score)):
            error = NON_FINITE
        is_fake = float(p) >= threshold  # compared in float64, as Detector does
        labels.append("" if error else ("fake" if is_fake else "real"))
        reasons.append(error)
    probabilities[[bool(e) for e in reasons]] = np.nan
    return probabilities, labels, reasons


def ood_verdicts(ood: np.ndarray, errors: Sequence[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``ood`` scores [N] and the errors ``verdicts`` gave -> (ood [N] float32, NaN on error; uncertain [N]
    bool, false on error): uncertain is ood > ``threshold`` compared in float64, as ``Detector`` decides."""
    scores = np.asarray(ood, np.float32).reshape(-1).copy()
    failed = np.array([bool(e) for e in errors], dtype=bool)
    scores[failed] = np.nan
    uncertain = np.zeros(len(scores), dtype=bool)
    uncertain[~failed] = scores[~failed].astype(np.float64) > threshold
    return scores, uncertain
