"""The numpy resampling reference against Pillow, the CPU preprocessing every other path must reproduce.

Tolerances: ``resize_crop_reference`` must equal Pillow's ``resize_crop`` exactly (uint8 equality, no
tolerance); ``preprocess_reference`` must equal ``i2p.runtime.preprocess.preprocess`` within 1e-6
absolute (it shares ``normalize``, so in practice the difference is 0).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from i2p.runtime import resample
from i2p.runtime.preprocess import PreprocessSpec, preprocess, resize_crop, resize_plan
from i2p.runtime.resample import (
    PRECISION_BITS,
    crop_coefficients,
    preprocess_reference,
    resize_crop_reference,
    vertical_first,
)

SPEC = PreprocessSpec(size=224)

# (width, height): degenerate, thin, exact, one-axis-unchanged, up-scaling, large down-scaling, odd sizes.
EDGE_SIZES = [
    (1, 1), (2, 3), (3, 500), (500, 3), (1, 224), (224, 1), (7, 9), (224, 224), (224, 300), (300, 224),
    (225, 224), (223, 225), (57, 913), (913, 57), (30, 2000), (2000, 30), (10, 5000), (640, 480),
    (1000, 1000), (3000, 2001), (120, 13000),
]  # fmt: skip


def _image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Noise, smooth gradients, or hard 0/255 edges (which overshoot and exercise the clipping)."""
    kind = rng.integers(3)
    if kind == 0:
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    if kind == 1:
        yy, xx = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 2 * np.pi, size=3)
        period = rng.uniform(3, 60)
        img = 127.5 + 127.5 * np.sin((xx[..., None] + 0.7 * yy[..., None]) / period + phase)
        return img.round().astype(np.uint8)
    cell = int(rng.integers(1, 9))
    board = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(np.uint8) * 255
    return np.repeat(board[:, :, None], 3, axis=2)


def _pillow(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    return np.asarray(resize_crop(Image.fromarray(img), spec))


def _sizes(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    sizes = []
    for _ in range(n):
        w = int(rng.integers(1, 900))
        aspect = float(np.exp(rng.uniform(-2.5, 2.5)))
        sizes.append((w, max(1, min(4000, int(w * aspect)))))
    return sizes


@pytest.mark.slow
def test_reference_is_bit_exact_with_pillow_on_mixed_sizes() -> None:
    rng = np.random.default_rng(20260917)
    for w, h in EDGE_SIZES + _sizes(rng, 60):
        img = _image(rng, w, h)
        expected = _pillow(img, SPEC)
        got = resize_crop_reference(img, SPEC)
        assert got.dtype == np.uint8 and got.shape == expected.shape == (224, 224, 3)
        if not np.array_equal(got, expected):
            diff = np.abs(got.astype(int) - expected)
            pytest.fail(f"{w}x{h}: {int((diff > 0).sum())} pixels differ from Pillow, max {int(diff.max())}")


@pytest.mark.parametrize("size", [1, 32, 97, 336])
def test_reference_is_bit_exact_for_other_input_sizes(size: int) -> None:
    spec = PreprocessSpec(size=size)
    rng = np.random.default_rng(size)
    for w, h in [(1, 1), (size, size), (size + 1, 3 * size + 2), *_sizes(rng, 8)]:
        img = _image(rng, w, h)
        np.testing.assert_array_equal(
            resize_crop_reference(img, spec), _pillow(img, spec), err_msg=f"{w}x{h}"
        )


def test_preprocess_reference_matches_the_cpu_path() -> None:
    rng = np.random.default_rng(7)
    for w, h in [(1, 1), (3, 500), (640, 480), *_sizes(rng, 10)]:
        img = _image(rng, w, h)
        expected = preprocess(img, SPEC)
        got = preprocess_reference(img, SPEC)
        assert got.dtype == np.float32 and got.shape == expected.shape == (3, 224, 224)
        assert np.max(np.abs(got - expected)) <= 1e-6, f"{w}x{h}"


def test_pass_order_follows_the_installed_pillow() -> None:
    """A tall image that shrinks mostly in height: the two pass orders give different bytes, Pillow's wins."""
    w, h = 300, 1400
    plan = resize_plan(w, h, SPEC)
    if not vertical_first(w, h, plan.out_w, plan.out_h):
        pytest.skip("this Pillow version always runs the horizontal pass first")
    img = _image(np.random.default_rng(3), w, h)
    expected = _pillow(img, SPEC)
    np.testing.assert_array_equal(resize_crop_reference(img, SPEC), expected)
    rows = crop_coefficients(h, plan.out_h, plan.top, SPEC.size)
    cols = crop_coefficients(w, plan.out_w, plan.left, SPEC.size)
    lo, hi = int(rows.start.min()), int((rows.start + rows.count).max())
    horizontal_first = resample._resample(
        resample._resample(img[lo:hi], cols, axis=1), resample._shifted(rows, lo), axis=0
    )
    assert not np.array_equal(horizontal_first, expected)


@pytest.mark.parametrize(
    ("version", "tall", "square"),
    [((11, 3), False, False), ((12, 2), True, False), ((13, 0), True, True)],
)
def test_pass_order_rules_by_pillow_version(version: tuple[int, int], tall: bool, square: bool) -> None:
    assert vertical_first(10, 1200, 2, 240, version) is tall  # 120x taller than wide, height shrinks
    assert vertical_first(300, 1400, 224, 1045, version) is square  # height shrinks 355, width 76


def test_coefficients_are_normalized_fixed_point() -> None:
    for in_size, out_size in [(1, 224), (3, 224), (500, 224), (4000, 224), (224, 225), (1000, 37)]:
        c = crop_coefficients(in_size, out_size, 0, out_size)
        sums = c.weights.sum(axis=1)
        # Each row sums to 1.0 in 22-bit fixed point, up to one rounding step per tap.
        assert np.all(np.abs(sums - (1 << PRECISION_BITS)) <= c.ksize), (in_size, out_size)
        assert np.all(c.start >= 0) and np.all(c.start + c.count <= in_size)
        beyond = np.arange(c.ksize)[None, :] >= c.count[:, None]
        assert not c.weights[beyond].any()
    identity = crop_coefficients(224, 224, 10, 20)
    assert identity.ksize == 1 and list(identity.start) == list(range(10, 30))
    assert np.all(identity.weights == 1 << PRECISION_BITS)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        resize_crop_reference(np.zeros((8, 8, 3), np.float32), SPEC)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        resize_crop_reference(np.zeros((8, 8), np.uint8), SPEC)
    with pytest.raises(ValueError, match="outside"):
        crop_coefficients(10, 20, 15, 10)
