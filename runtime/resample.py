"""Pillow's 8-bit antialiased bicubic and bilinear resize, redone in integer numpy, bit-exact with Pillow.

Pillow resizes in two separable passes. Each pass computes, per output position, filter weights in
double precision (``precompute_coeffs`` in ``src/libImaging/Resample.c``), normalizes them to their
sum, rounds them to 22-bit fixed point (``normalize_coeffs_8bpc``), and accumulates
``pixel * weight`` in 32-bit integers starting from one half, then shifts right by 22 and clips to
0..255. The result of the first pass is stored as uint8 before the second pass reads it. A pass
whose size does not change is skipped (its fixed-point table would be the identity).

Only the filter (bicubic with a = -0.5 on (-2, 2), or bilinear's triangle on (-1, 1)) and the geometry
(``i2p.runtime.preprocess.resize_plan``: shortest side or squash, crop fraction, center crop) differ
between the modes a ``PreprocessSpec`` allows; both end up in the tables.

This module reproduces that arithmetic operation for operation. The fixed-point tables it builds
(:func:`crop_coefficients`) are also what the CUDA kernel in ``i2p.kernels`` consumes, so the GPU
path does only integer arithmetic on exactly these weights, and agrees with this reference bit for
bit; this reference in turn agrees with Pillow bit for bit (``tests/runtime/test_resample.py``).

Which pass Pillow runs first depends on its version (see :func:`vertical_first`); the order matters
because the intermediate image is rounded to uint8.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import PIL

from .preprocess import PreprocessSpec, ResizePlan, aspect_box, normalize, resize_plan

PRECISION_BITS = 32 - 8 - 2  # Pillow: 8 bits of result, 2 bits of headroom for negative lobes
HALF = 1 << (PRECISION_BITS - 1)  # accumulators start here: rounding to nearest after the shift


@dataclass(frozen=True)
class AxisCoefficients:
    """Pillow's fixed-point filter taps for a run of output positions along one axis.

    Output position ``i`` reads source pixels ``start[i] .. start[i] + count[i] - 1`` with weights
    ``weights[i, :count[i]]``; the rest of each row is zero, as in Pillow's ``kk`` buffer.
    """

    start: np.ndarray  # int32 [n]
    count: np.ndarray  # int32 [n]
    weights: np.ndarray  # int32 [n, ksize]

    @property
    def ksize(self) -> int:
        return int(self.weights.shape[1])

    def flat(self) -> np.ndarray:
        """``start | count | weights`` as one int32 array: one axis's table as ``preprocess.cu`` reads it."""
        return np.concatenate([self.start, self.count, self.weights.ravel()])


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter`` with a = -0.5, evaluated in the same order (no fused multiply-add)."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0  # ((a + 2) x - (a + 3)) x x + 1
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5  # (((x - 5) x + 8) x - 4) a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bilinear_filter``: 1 - |x| on (-1, 1)."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}  # Pillow's filter and its support


@lru_cache(maxsize=512)
def crop_coefficients(
    in_size: int, out_size: int, first: int, count: int, interpolation: str = "bicubic"
) -> AxisCoefficients:
    """Fixed-point taps for output positions ``first .. first + count - 1`` of an ``in_size -> out_size`` pass.

    ``in_size == out_size`` gives the identity (one tap of weight 1.0): Pillow skips such a pass, and
    ``(v << 22) + half >> 22 == v`` makes the identity table exactly equivalent to skipping it.
    """
    if first < 0 or first + count > out_size or in_size < 1:
        raise ValueError(
            f"output positions {first}..{first + count - 1} outside a {in_size}->{out_size} resize"
        )
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation must be one of {list(FILTERS)}, got {interpolation!r:.80}")
    kernel, kernel_support = FILTERS[interpolation]
    positions = np.arange(first, first + count)
    if in_size == out_size:
        return _frozen(
            positions, np.ones(count, np.int64), np.full((count, 1), 1 << PRECISION_BITS, np.int64)
        )

    # precompute_coeffs: box = (0, in_size) as C floats, so in1 - in0 is a float32 difference.
    scale = float(np.float32(in_size)) / out_size
    filterscale = max(scale, 1.0)
    support = kernel_support * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale

    center = 0.0 + (positions + 0.5) * scale
    # C's (int) cast truncates toward zero; negative values are clamped to 0 right after either way.
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin

    taps = np.zeros((count, ksize), np.float64)
    total = np.zeros(count, np.float64)
    for k in range(ksize):  # sequential sum over taps, in Pillow's order (numpy's sum is pairwise)
        w = kernel(((xmin + k) - center + 0.5) * inv_filterscale)
        w = np.where(k < xmax, w, 0.0)
        taps[:, k] = w
        total += w
    taps = np.divide(taps, total[:, None], out=taps, where=total[:, None] != 0.0)

    # normalize_coeffs_8bpc: round half away from zero, then C's truncating (int) cast.
    scaled = taps * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5))
    return _frozen(xmin, xmax, fixed)


def _frozen(start: np.ndarray, count: np.ndarray, weights: np.ndarray) -> AxisCoefficients:
    arrays = [np.ascontiguousarray(a, dtype=np.int32) for a in (start, count, weights)]
    for a in arrays:
        a.setflags(write=False)  # shared through the lru_cache
    return AxisCoefficients(*arrays)


def pillow_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", PIL.__version__)
    if match is None:
        raise RuntimeError(f"cannot parse the Pillow version {PIL.__version__!r}")
    return int(match.group(1)), int(match.group(2))


def vertical_first(
    src_w: int, src_h: int, out_w: int, out_h: int, version: tuple[int, int] | None = None
) -> bool:
    """Whether the installed Pillow resamples rows before columns for this resize.

    Pillow < 12.2 always runs the horizontal pass first. Pillow 12.2 and 12.3 run the vertical pass
    first (in ``Image.resize``) for images more than 100 times taller than wide that shrink in
    height. Pillow >= 13 does it in C whenever the height shrinks by more than twice the width's
    reduction (``ImagingResampleInner``).
    """
    major, minor = version or pillow_version()
    if (major, minor) >= (13, 0):
        return src_h - out_h > 0 and src_h - out_h > (src_w - out_w) * 2
    if (major, minor) >= (12, 2):
        return src_h > src_w * 100 and out_h < src_h
    return False


class KernelTables(NamedTuple):
    """What the CUDA kernel needs for one image besides its pixels (``i2p.kernels.plan_batch`` packs it)."""

    x: np.ndarray  # int32 column table, AxisCoefficients.flat()
    y: np.ndarray  # int32 row table
    vertical_first: bool


@lru_cache(maxsize=1024)
def kernel_tables(plan: ResizePlan) -> KernelTables:
    """Pillow's fixed-point tables for one resize plan (computed once per plan; photos repeat sizes)."""
    cols = crop_coefficients(plan.src_w, plan.out_w, plan.left, plan.size, plan.interpolation)
    rows = crop_coefficients(plan.src_h, plan.out_h, plan.top, plan.size, plan.interpolation)
    x, y = cols.flat(), rows.flat()
    for a in (x, y):
        a.setflags(write=False)  # shared through the lru_cache
    return KernelTables(x, y, vertical_first(plan.src_w, plan.src_h, plan.out_w, plan.out_h))


def fit_aspect_array(rgb: np.ndarray) -> np.ndarray:
    """``preprocess.fit_aspect`` on a uint8 HWC array: a view of its centered MAX_ASPECT:1 box."""
    box = aspect_box(rgb.shape[1], rgb.shape[0])
    if box is None:
        return rgb
    left, top, right, bottom = box
    return rgb[top:bottom, left:right]


def kernel_batch(
    images: Sequence[np.ndarray], spec: PreprocessSpec
) -> tuple[list[np.ndarray], list[KernelTables]]:
    """uint8 HWC images as the kernel takes them: each fitted to MAX_ASPECT:1 (a view), with its tables."""
    fitted = [fit_aspect_array(img) for img in images]
    return fitted, [kernel_tables(resize_plan(img.shape[1], img.shape[0], spec)) for img in fitted]


def _resample(src: np.ndarray, coeffs: AxisCoefficients, axis: int) -> np.ndarray:
    """One Pillow pass along ``axis`` (0 = rows/vertical, 1 = columns/horizontal) of a uint8 HWC image."""
    n_in = src.shape[axis]
    acc = None
    for k in range(coeffs.ksize):
        # Taps past `count` have weight 0; clamping their index only keeps the gather in bounds.
        index = np.minimum(coeffs.start + k, n_in - 1)
        taken = np.take(src, index, axis=axis).astype(np.int32)
        weight = coeffs.weights[:, k].reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
        term = taken * weight
        acc = term + HALF if acc is None else acc + term
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_crop_reference(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Pillow's ``resize_crop`` (the spec's resize mode, crop fraction and filter) on a uint8 HWC array.

    Only the crop window is computed: every Pillow output pixel depends on its own row and column
    alone, so restricting both passes to the rows and columns the window needs changes nothing.
    """
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        shape = getattr(rgb, "shape", None)
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {type(rgb).__name__} {shape}")
    src_h, src_w = rgb.shape[:2]
    if src_h == 0 or src_w == 0:
        raise ValueError(f"empty image {rgb.shape}")
    plan = resize_plan(src_w, src_h, spec)
    cols = crop_coefficients(src_w, plan.out_w, plan.left, spec.size, spec.interpolation)
    rows = crop_coefficients(src_h, plan.out_h, plan.top, spec.size, spec.interpolation)
    if vertical_first(src_w, src_h, plan.out_w, plan.out_h):
        lo, hi = _span(cols)
        tmp = _resample(rgb[:, lo:hi], rows, axis=0)
        return _resample(tmp, _shifted(cols, lo), axis=1)
    lo, hi = _span(rows)
    tmp = _resample(rgb[lo:hi], cols, axis=1)
    return _resample(tmp, _shifted(rows, lo), axis=0)


def _span(coeffs: AxisCoefficients) -> tuple[int, int]:
    return int(coeffs.start.min()), int((coeffs.start + coeffs.count).max())


def _shifted(coeffs: AxisCoefficients, offset: int) -> AxisCoefficients:
    return AxisCoefficients(coeffs.start - offset, coeffs.count, coeffs.weights)


def preprocess_reference(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC -> float32 CHW model input, the numpy twin of ``i2p.runtime.preprocess.preprocess``."""
    return normalize(resize_crop_reference(fit_aspect_array(rgb), spec), spec)
