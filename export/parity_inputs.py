"""The inputs every export check runs on, and the PyTorch reference outputs on them.

Random images (uniform pixels, preprocessed like real ones) always; real images from ``--calib-images``
when given. Each named set is compared separately, so parity.json tells how a model does on each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from i2p.base.files import IMAGE_EXTENSIONS, is_image_name
from i2p.runtime.preprocess import ImageError, PreprocessSpec, normalize, preprocess
from i2p.train.model import I2PModel

from .network import ExportError

CALIB = "calib-images"  # the probe set of real images (what the INT8 decision gate runs on)


@dataclass(frozen=True)
class ProbeSet:
    """Inputs for the merge and parity checks: one float32 NCHW batch per named set."""

    images: dict[str, np.ndarray]

    def stacked(self) -> np.ndarray:
        return np.concatenate(list(self.images.values()))

    def split(
        self, logits: np.ndarray, probabilities: np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Outputs computed on ``stacked()``, cut back into (logits, probabilities) per set."""
        pairs = zip(self.cut(logits).values(), self.cut(probabilities).values(), strict=True)
        return dict(zip(self.images, pairs, strict=True))

    def cut(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """One output computed on ``stacked()``, cut back per set."""
        cuts = np.cumsum([len(v) for v in self.images.values()])[:-1]
        return dict(zip(self.images, np.split(values, cuts), strict=True))


def probe_set(
    spec: PreprocessSpec,
    random_samples: int,
    seed: int,
    calib: Path | None,
    calib_limit: int,
    notes: list[str],
) -> ProbeSet:
    """``random_samples`` random images and, with ``calib``, up to ``calib_limit`` real ones."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(random_samples, spec.size, spec.size, 3), dtype=np.uint8)
    images = {"random": np.stack([normalize(p, spec) for p in pixels])}
    if calib is not None:
        images[CALIB] = calib_images(calib, calib_limit, spec, notes)
    return ProbeSet(images)


def calib_images(folder: Path, limit: int, spec: PreprocessSpec, notes: list[str]) -> np.ndarray:
    """Up to ``limit`` images spread evenly over ``folder`` (sorted, recursive); unreadable ones noted."""
    if not folder.is_dir():
        raise ExportError(f"{folder}: --calib-images must be a folder of images")
    files = sorted(p for p in folder.rglob("*") if is_image_name(p) and p.is_file())
    if not files:
        raise ExportError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) for --calib-images")
    if len(files) > limit:  # an even spread over the sorted list covers every sub-folder (class, generator)
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    batch, skipped = [], []
    for f in files:
        try:
            batch.append(preprocess(f, spec))
        except ImageError as e:
            skipped.append(str(e))
    if skipped:
        notes.append(f"--calib-images: skipped {len(skipped)} unreadable images, e.g. {skipped[0]}")
    if not batch:
        raise ExportError(f"{folder}: none of the {len(files)} calibration images could be read")
    return np.stack(batch)


@torch.no_grad()
def torch_outputs(model: I2PModel, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of the PyTorch model, ``batch`` images at a time."""
    logits = torch.cat([model(torch.from_numpy(images[i : i + batch])) for i in range(0, len(images), batch)])
    return logits.numpy(), torch.sigmoid(logits).numpy()
