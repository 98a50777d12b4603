"""Synthetic labelled images: the demo's training data and the tests' fixtures, written as real files.

"Real" images are a smooth colour gradient under per-pixel noise (a camera-like texture); "fake" images
are the same kind of gradient without noise, with a faint period-4 checkerboard (an upsampling artifact)
and a warm tint. The difference survives resizing and mild JPEG, so even a tiny model can learn it —
which is all the demo claims: it exercises the pipeline, it is not a useful detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = ("ufd", "flat")
Row = tuple[Path, int, str]  # (path, label 0 real / 1 fake, generator)


def synthetic_image(label: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One uint8 HxWx3 image of class ``label`` (0 real, 1 fake); ``size`` is (width, height)."""
    w, h = size
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = (np.cos(angle) * xx / max(w - 1, 1) + np.sin(angle) * yy / max(h - 1, 1) + 1) / 2
    img = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    if label == 0:
        img = img + rng.normal(0, 22, size=img.shape)
    else:
        checker = ((xx.astype(int) // 2 + yy.astype(int) // 2) % 2) * 2 - 1
        img = img + 14 * checker[..., None] + np.array([18.0, 4.0, -18.0])
    return np.clip(img, 0, 255).round().astype(np.uint8)


def make_image_folder(
    root: str | Path,
    layout: str = "ufd",
    n_per_class: int = 4,
    generators: Sequence[str] = ("gen_a", "gen_b"),
    size: tuple[int, int] = (40, 32),
    seed: int = 0,
    class_dirs: tuple[str, str] = ("0_real", "1_fake"),
    formats: Sequence[str] = ("png", "jpg"),
) -> list[Row]:
    """Write a labelled folder and return its files as (path, label, generator), sorted like discover().

    ``layout="ufd"``: ``root/<generator>/<class_dir>/img_###.<fmt>``; ``layout="flat"``:
    ``root/<class_dir>/...`` with one generator named after ``root`` (``generators`` is unused).
    ``class_dirs`` gives the (real, fake) folder names, e.g. ``("real", "fake")``. Formats cycle over
    the images of a class.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    folders = {root.name: root} if layout == "flat" else {g: root / g for g in generators}
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for generator, folder in sorted(folders.items()):
        for label, class_dir in enumerate(class_dirs):
            out = folder / class_dir
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                fmt = formats[i % len(formats)]
                path = out / f"img_{i:03d}.{fmt}"
                Image.fromarray(synthetic_image(label, size, rng)).save(path, quality=95)
                rows.append((path, label, generator))
    return rows
