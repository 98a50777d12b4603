"""Session fixtures: what several test modules build the same way, built once per run.

Each hands out a shared file tree. Tests read it and copy it before changing anything
(``shutil.copytree``, or write beside it in their own ``tmp_path``); when the session ends every tree is
compared with its state at creation, and a test that wrote into one fails there, naming the files.
Fixtures that differ for a reason (another L*, fewer images, export options under test) stay in their
module. Torch and the train/export code are imported inside the fixtures: the lean runtime's test run
(no torch) loads this file too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from i2p.export.pipeline import ExportResult

T = TypeVar("T")


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (``dir`` for folders) under ``root``."""
    return {
        p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def unchanged(root: Path, handed: T) -> Iterator[T]:
    """Yield ``handed`` (a path into ``root``, or a result), then fail if a test changed a file under ``root``."""
    before = snapshot(root)
    yield handed
    after = snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared {root}: {changed} (copy it before modifying)"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The labelled folder the training tests share: ``training_folder``'s 12 images per class."""
    from tests.support.training import training_folder

    root = training_folder(tmp_path_factory)
    yield from unchanged(root, root)


@pytest.fixture(scope="session")
def checkpoint_l2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny ViT checkpoint at L* = 2 of 4 blocks, rank-4 random deltas (``make_checkpoint``'s defaults)."""
    from tests.support.checkpoints import make_checkpoint

    ckpt = make_checkpoint(tmp_path_factory.mktemp("checkpoint_l2"), layer=2)
    yield from unchanged(ckpt.parent, ckpt)


@pytest.fixture(scope="session")
def checkpoint_l3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The same at L* = 3: one block more, so the fused graph has an inner and a last attention block."""
    from tests.support.checkpoints import make_checkpoint

    ckpt = make_checkpoint(tmp_path_factory.mktemp("checkpoint_l3"), layer=3)
    yield from unchanged(ckpt.parent, ckpt)


@pytest.fixture(scope="session")
def calibration_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """24 random 72x64 PNGs for ``--calib-images``: enough for the INT8 gate to pass on the tiny ViT."""
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (72, 64, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    yield from unchanged(folder, folder)


@pytest.fixture(scope="session")
def export_l2(
    checkpoint_l2: Path, calibration_images: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExportResult]:
    """The default CPU export of ``checkpoint_l2``: model.onnx, model.cpu.onnx and the gated model.int8.onnx."""
    from i2p.export.pipeline import ExportOptions, run_export

    opts = ExportOptions(
        ckpt=checkpoint_l2,
        out=tmp_path_factory.mktemp("export_l2") / "det.i2p",
        engine="no",
        random_samples=4,
        calib_images=calibration_images,
    )
    result = run_export(opts, echo=lambda _: None)
    yield from unchanged(result.artifact, result)
