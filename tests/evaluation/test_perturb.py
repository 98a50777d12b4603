"""Robustness-sweep degradations: parsing, determinism, and that each is the Pillow operation it names."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from i2p.evaluation.perturb import (
    CLEAN,
    blur,
    downscale,
    jpeg,
    parse_condition,
    parse_sweep,
    parse_sweeps,
    social,
)


def photo(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: JPEG and blur change it measurably, but not beyond recognition."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=2)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def test_sweep_option_expands_to_one_condition_per_value():
    assert [c.name for c in parse_sweep("jpeg:95,75,50")] == ["jpeg:95", "jpeg:75", "jpeg:50"]
    assert [c.strength for c in parse_sweep("blur:1,2.5")] == [1.0, 2.5]
    assert [c.name for c in parse_sweep("social")] == ["social"]
    (chain,) = parse_sweep("resize:0.5+jpeg:90")
    assert chain.name == "resize:0.5+jpeg:90" and chain.strength is None and len(chain.steps) == 2
    names = [c.name for c in parse_sweeps(["jpeg:95,75", "resize:0.5", "jpeg:75", "social"])]
    assert names == ["clean", "jpeg:95", "jpeg:75", "resize:0.5", "social"]  # clean first, no duplicates
    assert parse_condition("clean") == CLEAN and CLEAN.name == "clean"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("webp:80", "unknown perturbation"),
        ("jpeg:101", "integer quality 1..100"),
        ("jpeg:75.5", "integer quality"),
        ("resize:2", r"factor in \(0, 1\]"),
        ("resize:0", "factor"),
        ("blur:-1", "sigma"),
        ("jpeg:", "needs a number"),
        ("social:3", "takes no value"),
    ],
)
def test_bad_conditions_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep(text)


@pytest.mark.parametrize("text", ["jpeg:50", "resize:0.5", "blur:2", "social", "resize:0.5+jpeg:90"])
def test_conditions_are_deterministic_and_do_not_modify_their_input(text):
    img = photo()
    before = img.tobytes()
    cond = parse_condition(text)
    a, b = cond(img), cond(photo())
    assert img.tobytes() == before
    assert a.mode == "RGB" and a.tobytes() == b.tobytes()
    assert diff(a.resize(img.size), img) > 0.5  # it did something


def test_each_step_is_the_pillow_operation_it_names():
    img = photo()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75, subsampling="4:2:0")
    assert jpeg(img, 75).tobytes() == Image.open(io.BytesIO(buf.getvalue())).convert("RGB").tobytes()
    assert downscale(img, 0.5).tobytes() == img.resize((32, 24), Image.Resampling.BICUBIC).tobytes()
    assert blur(img, 1.5).tobytes() == img.filter(ImageFilter.GaussianBlur(radius=1.5)).tobytes()
    assert blur(img, 0) is img and downscale(img, 1.0) is img


def test_strength_orders_the_damage():
    img = photo(96, 96)
    errors = [diff(jpeg(img, q), img) for q in (95, 75, 50, 20)]
    assert errors == sorted(errors)
    blurs = [diff(blur(img, s), img) for s in (0.5, 1, 2)]
    assert blurs == sorted(blurs)


def test_downscale_keeps_at_least_one_pixel_and_social_caps_the_long_side():
    assert downscale(photo(3, 2), 0.1).size == (1, 1)
    assert social(photo(2000, 1500)).size == (1080, 810)
    small = photo(300, 200)
    assert social(small).size == (300, 200)  # no upscaling: only the JPEG 80 re-encode
    assert social(small).tobytes() == jpeg(small, 80).tobytes()
