"""Labelled image sets for training and evaluation: splitting, checking, and the Dataset.

Discovery (``discover``: UniversalFakeDetect folders, flat or ``real``/``fake`` layouts, CSV manifests
``path,label[,generator]``) lives in ``i2p.evaluation.labels`` and is re-exported here. Evaluation images go
through ``i2p.runtime.preprocess.preprocess``, the code the deployed runtime runs, so a trained model is
measured on exactly what it will be served.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from i2p.base.progress import Progress
from i2p.evaluation.audit import audit
from i2p.evaluation.labels import CLASS_DIRS, CSV_LABELS, DataError, Sample, class_counts, discover
from i2p.runtime.memory import decode_memory_bytes
from i2p.runtime.preprocess import ImageError, PreprocessSpec, check_header, load_image, preprocess

from .augment import ALIGN_STREAM, AlignSpec, AugmentConfig, augment

# Discovery lives in the runtime (torch-free artifact evaluation reads labelled folders too).
__all__ = [
    "CLASS_DIRS", "CSV_LABELS", "BadSample", "Batch", "DataError", "ImageDataset", "Sample",
    "class_counts", "collate_skip_bad", "discover", "scan", "shortcut_warnings", "split",
]  # fmt: skip

# ---------------------------------------------------------------------------------------------- splitting


def split(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified (generator, label) train/validation split; the same inputs and seed give the same split.

    Each stratum sends ``round(n * val_fraction)`` images to validation, at least one when it has two or
    more, and always keeps one for training. Both halves keep the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    strata: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        strata[(s.generator, s.label)].append(i)
    rng = np.random.default_rng(seed)
    in_val = np.zeros(len(samples), dtype=bool)
    for key in sorted(strata):
        members = strata[key]
        n_val = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        in_val[rng.permutation(members)[:n_val]] = True
    train = [s for s, v in zip(samples, in_val, strict=True) if not v]
    val = [s for s, v in zip(samples, in_val, strict=True) if v]
    return train, val


# ---------------------------------------------------------------------------------------------- checking


def scan(
    samples: Sequence[Sample], max_pixels: int, progress: bool = True, workers: int = 8
) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """Split samples into (openable, [(unreadable, reason)]) from the file headers alone.

    Catches missing, empty, non-image and oversized files cheaply, without decoding pixels; a file
    whose body is damaged is caught later, when the Dataset loads it (see ``collate_skip_bad``).
    Reads run on ``workers`` threads (file I/O), results keep the input order.
    """

    def check(s: Sample) -> str | None:
        try:
            check_header(s.path, max_pixels)
        except ImageError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checked = pool.map(check, samples)
        reasons = list(
            Progress(checked, total=len(samples), desc="checking images", unit="img", enabled=progress)
        )
    good = [s for s, r in zip(samples, reasons, strict=True) if r is None]
    bad = [(s, r) for s, r in zip(samples, reasons, strict=True) if r is not None]
    return good, bad


AUDIT_LIMIT = 2000  # images the audit at the start of training reads (headers only: about a second)


def shortcut_warnings(samples: Sequence[Sample], align: str | None, seed: int, max_pixels: int) -> list[str]:
    """The shortcut audit's warnings for a training set (``i2p audit``), for ``i2p-train`` to print.

    Never stops training: an audit that fails says so in one line instead.
    """
    advice = "--align is on, so training re-encodes both classes alike" if align else "consider --align"
    try:
        return [
            f"warning: {w}"
            for w in audit(samples, AUDIT_LIMIT, seed, max_pixels=max_pixels, advice=advice).warnings
        ]
    except Exception as e:  # noqa: BLE001 - an advisory check must not end a run
        return [f"warning: the shortcut audit could not run ({type(e).__name__}: {e})"]


# ---------------------------------------------------------------------------------------------- Dataset


@dataclass(frozen=True)
class BadSample:
    """What ``ImageDataset`` returns for a file it cannot decode; ``collate_skip_bad`` drops it."""

    index: int
    path: Path
    reason: str


class Batch(NamedTuple):
    images: torch.Tensor  # float32 [N, 3, S, S]; N may be 0 when every file of the batch failed
    labels: torch.Tensor  # float32 [N], 1 = fake
    indices: torch.Tensor  # int64 [N], positions in the dataset
    bad: list[BadSample]  # files dropped from this batch, with the reason


class ImageDataset(Dataset):
    """Samples -> (float32 CHW tensor, label, index), augmented for training or as deployed for evaluation.

    Augmentation randomness comes from ``numpy.random.default_rng((seed, epoch, index))``: it depends
    on nothing else (not the worker, not the order of loading, not the label), so a resumed run sees exactly
    the augmentations of an uninterrupted one. ``align`` (``--align``) re-encodes every image first, with
    strengths from ``(seed, epoch, index, ALIGN_STREAM)``: a real and a fake at one index get the same draw. Call ``set_epoch`` before creating each epoch's iterator
    (DataLoader workers copy the dataset when the iterator starts; do not use persistent workers).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        spec: PreprocessSpec,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        condition: Callable[[Image.Image], Image.Image] | None = None,
        align: AlignSpec | None = None,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        decode_memory_bytes()  # a bad I2P_DECODE_MEMORY_MB is one message here, not one per worker
        self.samples = list(samples)
        self.spec = spec
        self.augment = augment
        self.condition = (
            condition  # a deterministic degradation (i2p.evaluation.perturb) before preprocessing
        )
        self.align = align
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def align_draw(self, index: int) -> tuple[float, ...]:
        """The ``--align`` strengths of image ``index`` this epoch: a function of (seed, epoch, index) only."""
        if self.align is None:
            return ()
        return self.align.draw(np.random.default_rng((self.seed, self.epoch, index, ALIGN_STREAM)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | BadSample:
        sample = self.samples[index]
        try:
            if self.augment is None and self.condition is None and self.align is None:
                x = preprocess(sample.path, self.spec)
            else:
                img = load_image(sample.path, self.spec.max_pixels)
                if self.align is not None:
                    img = self.align.apply(img, self.align_draw(index))
                if self.condition is not None:
                    img = self.condition(img)
                if self.augment is None:
                    x = preprocess(img, self.spec)
                else:
                    rng = np.random.default_rng((self.seed, self.epoch, index))
                    x = augment(img, self.augment, rng, self.spec)
        except (ImageError, OSError) as e:
            return BadSample(index, sample.path, str(e))
        return torch.from_numpy(x), sample.label, index


def collate_skip_bad(items: Sequence[tuple[torch.Tensor, int, int] | BadSample]) -> Batch:
    """DataLoader ``collate_fn``: stacks the good items and lists the undecodable ones in ``Batch.bad``."""
    good = [it for it in items if not isinstance(it, BadSample)]
    bad = [it for it in items if isinstance(it, BadSample)]
    if not good:
        return Batch(
            torch.empty(0, dtype=torch.float32), torch.empty(0), torch.empty(0, dtype=torch.int64), bad
        )
    return Batch(
        torch.stack([x for x, _, _ in good]),
        torch.tensor([label for _, label, _ in good], dtype=torch.float32),
        torch.tensor([i for _, _, i in good], dtype=torch.int64),
        bad,
    )
