"""Shared setup of the tests that run ``i2p-train`` on the tiny ViT: its CLI options and a labelled folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.images import make_image_folder

# i2p-train options for the tiny random-init ViT (image 64, 4 blocks): fast enough to train in a test.
TINY = ["--model", "i2p-tiny-vit", "--pretrained", "none", "--workers", "0", "--batch-size", "16"]


def training_folder(factory: pytest.TempPathFactory, n_per_class: int = 12) -> Path:
    """A fresh synthetic ``0_real``/``1_fake`` folder of 72x64 images (non-square, so cropping runs)."""
    root = factory.mktemp("data")
    make_image_folder(root, n_per_class=n_per_class, size=(72, 64))
    return root
