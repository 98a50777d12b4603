"""What one launch of ``preprocess.cu`` reads, laid out on the host in plain numpy (testable without a GPU).

The caller brings the filter tables: per image, one flat int32 table per axis,
``start[size] | count[size] | weights[size * ksize]`` (``preprocess.cu`` documents the layout; the
runtime builds them with Pillow's arithmetic in ``i2p.runtime.resample.kernel_tables``), and a flag
saying whether the vertical pass runs first. This module packs pixels, descriptors and tables into
the buffers the kernel reads, and says how to launch it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KERNELS = {np.dtype(np.float32): "i2p_preprocess_f32", np.dtype(np.float16): "i2p_preprocess_f16"}
BLOCK = (32, 8, 1)  # matches __launch_bounds__(256) in preprocess.cu
DESC_FIELDS = 8  # int64 fields of ImageDesc in preprocess.cu
MAX_BATCH = 65535  # one image per grid z index, and gridDim.z is at most 65535

# Per image: (column table, row table, vertical pass first).
ImageTables = tuple[np.ndarray, np.ndarray, bool]


def launch_shape(size: int, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for ``batch`` images of ``size``² outputs: one thread per output pixel."""
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"a launch takes 1..{MAX_BATCH} images (gridDim.z), got {batch}")
    return (-(-size // BLOCK[0]), -(-size // BLOCK[1]), batch), BLOCK


@dataclass(frozen=True)
class BatchLayout:
    """Where each image's pixels go in the packed source buffer, and the descriptors and tables to upload."""

    offsets: np.ndarray  # int64 [B]: byte offset of each image in the packed source buffer
    src_bytes: int  # total size of the packed source buffer
    descs: np.ndarray  # int64 [B, 8], ImageDesc in preprocess.cu
    tables: np.ndarray  # int32 [T]: per image, the column table then the row table


def _ksize(table: np.ndarray, size: int, what: str) -> int:
    if table.dtype != np.int32 or table.ndim != 1 or table.size <= 2 * size or (table.size % size):
        raise ValueError(
            f"{what}: expected a flat int32 table start[{size}] | count[{size}] | weights[{size} * ksize], "
            f"got {table.dtype} {table.shape}"
        )
    return table.size // size - 2


def plan_batch(shapes: Sequence[tuple[int, ...]], tables: Sequence[ImageTables], size: int) -> BatchLayout:
    """Lay out a batch of HxWx3 uint8 images (their ``shapes``) and their filter tables for one launch."""
    if len(shapes) != len(tables):
        raise ValueError(f"{len(shapes)} images but {len(tables)} table sets")
    offsets, descs = [], []
    src_pos = table_pos = 0
    for i, ((h, w, *_), (x_table, y_table, vertical)) in enumerate(zip(shapes, tables, strict=True)):
        x_ksize = _ksize(x_table, size, f"image {i} column table")
        y_ksize = _ksize(y_table, size, f"image {i} row table")
        y_pos = table_pos + x_table.size
        descs.append((src_pos, w, h, table_pos, x_ksize, y_pos, y_ksize, int(bool(vertical))))
        offsets.append(src_pos)
        src_pos += h * w * 3
        table_pos = y_pos + y_table.size
    flat = [t for x_table, y_table, _ in tables for t in (x_table, y_table)]
    return BatchLayout(
        offsets=np.asarray(offsets, np.int64),
        src_bytes=src_pos,
        descs=np.asarray(descs, np.int64).reshape(-1, DESC_FIELDS),
        tables=np.concatenate(flat) if flat else np.zeros(0, np.int32),
    )


def pack_sources(images: Sequence[np.ndarray], layout: BatchLayout, dest: np.ndarray) -> None:
    """Copy each image into the uint8 buffer ``dest`` (at least ``layout.src_bytes``) at its offset."""
    for img, offset in zip(images, layout.offsets, strict=True):
        np.copyto(dest[offset : offset + img.size].reshape(img.shape), img)


def check_images(images: Sequence[Any]) -> list[np.ndarray]:
    """The batch as uint8 HxWx3 arrays, or a ValueError naming the first bad item."""
    for i, img in enumerate(images):
        if not (
            isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        ):
            what = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}".strip()
            raise ValueError(f"image {i}: expected a uint8 HxWx3 RGB array, got {what}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"image {i}: empty image {img.shape}")
    return list(images)
