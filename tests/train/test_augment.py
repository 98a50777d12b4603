"""Training augmentation uses the robustness sweep's own degradations, drawn from the given rng."""

from __future__ import annotations

import numpy as np
import pytest

from i2p.evaluation.perturb import blur, downscale, jpeg
from i2p.runtime.preprocess import PreprocessSpec, normalize, resize_crop
from i2p.train.augment import AugmentConfig, augment
from tests.evaluation.test_perturb import photo

SPEC = PreprocessSpec(size=32)
OFF = AugmentConfig(blur_prob=0.0, jpeg_prob=0.0, resize_prob=0.0, flip=False, scale_jitter=1.0)


def evaluated(img) -> np.ndarray:
    return normalize(np.asarray(resize_crop(img, SPEC)), SPEC)


@pytest.mark.parametrize(
    ("cfg", "op"),
    [
        (
            AugmentConfig(**{**OFF.__dict__, "jpeg_prob": 1.0, "jpeg_quality": (60, 60)}),
            lambda im: jpeg(im, 60),
        ),
        (
            AugmentConfig(**{**OFF.__dict__, "blur_prob": 1.0, "blur_sigma": (1.5, 1.5)}),
            lambda im: blur(im, 1.5),
        ),
        (
            AugmentConfig(**{**OFF.__dict__, "resize_prob": 1.0, "resize_scale": (0.5, 0.5)}),
            lambda im: downscale(im, 0.5),
        ),
    ],
)
def test_each_augmentation_is_the_sweep_operation(cfg, op):
    img = photo(32, 32)
    assert np.array_equal(augment(img, cfg, np.random.default_rng(0), SPEC), evaluated(op(img)))


def test_degradations_apply_in_pipeline_order_blur_downscale_jpeg():
    cfg = AugmentConfig(
        blur_prob=1.0, blur_sigma=(1.0, 1.0), jpeg_prob=1.0, jpeg_quality=(70, 70),
        resize_prob=1.0, resize_scale=(0.5, 0.5), flip=False, scale_jitter=1.0,
    )  # fmt: skip
    img = photo(32, 32)
    expected = evaluated(jpeg(downscale(blur(img, 1.0), 0.5), 70))
    assert np.array_equal(augment(img, cfg, np.random.default_rng(3), SPEC), expected)


def test_resize_probability_is_respected():
    img = photo(32, 32)
    cfg = AugmentConfig(**{**OFF.__dict__, "resize_prob": 0.5, "resize_scale": (0.25, 0.75)})
    outs = [augment(img, cfg, np.random.default_rng(s), SPEC) for s in range(40)]
    untouched = sum(np.array_equal(x, evaluated(img)) for x in outs)
    assert 8 <= untouched <= 32


@pytest.mark.parametrize(
    ("field", "value"), [("resize_prob", 1.5), ("resize_scale", (0.0, 0.5)), ("resize_scale", (0.5, 1.2))]
)
def test_bad_resize_settings_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})


def test_evaluation_dataset_applies_a_degradation_condition(tmp_path):
    from i2p.evaluation.perturb import parse_condition
    from i2p.runtime.preprocess import preprocess
    from i2p.train.data import ImageDataset, Sample

    path = tmp_path / "a.png"
    photo(40, 36).save(path)
    cond = parse_condition("resize:0.5+jpeg:60")
    x, label, index = ImageDataset([Sample(path, 1, "g")], SPEC, condition=cond)[0]
    assert np.array_equal(x.numpy(), preprocess(cond(photo(40, 36)), SPEC))
    assert not np.array_equal(x.numpy(), preprocess(path, SPEC))
