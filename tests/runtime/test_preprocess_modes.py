"""The preprocessing modes of the backbone families: resize "shortest" or "squash", crop fraction, bicubic or
bilinear. Each is one ``PreprocessSpec``, parsed by the shared schema, and the numpy reference (the GPU
kernel's tables) equals Pillow's bytes for it. ``tests/kernels/test_host_kernel.py`` runs the kernel's own
source on each mode.

Tolerance: none; ``resize_crop_reference`` equals Pillow's ``resize_crop`` as uint8.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from i2p.runtime import schema
from i2p.runtime.preprocess import PreprocessSpec, preprocess, resize_crop, resize_plan
from i2p.runtime.resample import preprocess_reference, resize_crop_reference
from tests.runtime.test_resample import EDGE_SIZES, _image, _sizes

FIXTURES = Path(__file__).parents[1] / "fixtures"

MODES = {
    "squash-bicubic (SigLIP 2)": PreprocessSpec(size=224, resize="squash", mean=(0.5,) * 3, std=(0.5,) * 3),
    "squash-bilinear (PE-Core)": PreprocessSpec(size=224, resize="squash", interpolation="bilinear"),
    "crop_pct-0.9 (EVA-02)": PreprocessSpec(size=224, crop_pct=0.9),
    "shortest-bilinear-0.875": PreprocessSpec(size=64, interpolation="bilinear", crop_pct=0.875),
    "squash-bicubic-0.95": PreprocessSpec(size=37, resize="squash", crop_pct=0.95),
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_reference_is_bit_exact_with_pillow_on_mixed_sizes(mode: str) -> None:
    spec = MODES[mode]
    rng = np.random.default_rng(sum(map(ord, mode)))
    sizes = [(w, h) for w, h in EDGE_SIZES if w * h < 3_000_000] + _sizes(rng, 12)
    for w, h in sizes:
        img = _image(rng, w, h)
        expected = np.asarray(resize_crop(Image.fromarray(img), spec))
        got = resize_crop_reference(img, spec)
        assert got.shape == expected.shape == (spec.size, spec.size, 3)
        if not np.array_equal(got, expected):
            diff = np.abs(got.astype(int) - expected)
            pytest.fail(
                f"{mode} {w}x{h}: {int((diff > 0).sum())} pixels differ from Pillow, max {int(diff.max())}"
            )
    img = _image(rng, 333, 191)
    np.testing.assert_array_equal(preprocess_reference(img, spec), preprocess(img, spec))


def test_the_modes_differ_from_each_other_and_from_the_default() -> None:
    """Each field changes the pixels (a mode that were ignored somewhere would pass the other tests)."""
    img = _image(np.random.default_rng(1), 300, 200)
    base = PreprocessSpec(size=64)
    variants = [
        base,
        PreprocessSpec(size=64, resize="squash"),
        PreprocessSpec(size=64, interpolation="bilinear"),
        PreprocessSpec(size=64, crop_pct=0.9),
    ]
    outputs = {resize_crop_reference(img, s).tobytes() for s in variants}
    assert len(outputs) == len(variants)


@pytest.mark.parametrize(
    ("spec", "geometry"),
    [  # (out_w, out_h, left, top): torchvision's Resize + CenterCrop as timm and open_clip compose them
        (PreprocessSpec(size=224), (298, 224, 37, 0)),
        (
            PreprocessSpec(size=224, crop_pct=0.9),
            (329, 248, 52, 12),
        ),  # floor(224 / 0.9) = 248; round(52.5) = 52
        (PreprocessSpec(size=224, crop_pct=0.875), (340, 256, 58, 16)),
        (PreprocessSpec(size=224, resize="squash"), (224, 224, 0, 0)),
        (PreprocessSpec(size=224, resize="squash", crop_pct=0.9), (248, 248, 12, 12)),
    ],
)
def test_resize_plan_geometry(spec: PreprocessSpec, geometry: tuple[int, int, int, int]) -> None:
    plan = resize_plan(640, 481, spec)
    assert (plan.out_w, plan.out_h, plan.left, plan.top) == geometry
    assert plan.interpolation == spec.interpolation and plan.size == spec.size


@pytest.mark.parametrize("version", ["v0", "v1"])
def test_specs_written_before_the_modes_load_as_todays_preprocessing(version: str) -> None:
    """Manifests without ``crop_pct`` mean shortest side, bicubic, no crop margin: the only one there was."""
    raw = json.loads((FIXTURES / version / "artifact" / "manifest.json").read_text())["preprocess"]
    assert "crop_pct" not in raw
    spec = schema.preprocess(raw)
    assert (spec.resize, spec.interpolation, spec.crop, spec.crop_pct) == (
        "shortest",
        "bicubic",
        "center",
        1.0,
    )
    assert spec.scale_size == spec.size
    assert schema.preprocess(spec.to_dict()) == spec  # and round-trips with the new field written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"resize": "longest"}, r"resize must be one of \['shortest', 'squash'\].*'longest'"),
        ({"resize": "Squash"}, "resize must be one of"),
        ({"resize": None}, "resize must be one of"),
        ({"interpolation": "nearest"}, r"interpolation must be one of \['bicubic', 'bilinear'\]"),
        ({"interpolation": "lanczos"}, "interpolation must be one of"),
        ({"interpolation": ["bicubic"]}, "interpolation must be one of"),
        ({"crop": "border"}, r"crop must be one of \['center'\]"),
        ({"crop_pct": 0.0}, r"crop_pct must be in \[0.5, 1\]"),
        ({"crop_pct": 0.49}, r"crop_pct must be in \[0.5, 1\]"),
        ({"crop_pct": 1.01}, r"crop_pct must be in \[0.5, 1\]"),
        ({"crop_pct": -0.9}, r"crop_pct must be in"),
        ({"crop_pct": float("nan")}, r"crop_pct must be in"),
        ({"crop_pct": float("inf")}, r"crop_pct must be in"),
        ({"crop_pct": "0.9"}, "crop_pct must be a number"),
        ({"crop_pct": True}, "crop_pct must be a number"),
        ({"crop_fraction": 0.9}, r"unknown preprocessing keys \['crop_fraction'\]"),
    ],
)
def test_the_shared_schema_refuses_modes_the_runtime_cannot_reproduce(change: dict, message: str) -> None:
    raw = {**PreprocessSpec(size=224).to_dict(), **change}
    with pytest.raises(schema.SchemaError, match=rf"field 'preprocess': {message}"):
        schema.preprocess(raw)


def test_the_extreme_allowed_crop_fraction_bounds_the_resize() -> None:
    spec = schema.preprocess({**PreprocessSpec(size=224).to_dict(), "crop_pct": 0.5})
    assert spec.scale_size == 448
    img = _image(np.random.default_rng(2), 50, 800)
    np.testing.assert_array_equal(
        resize_crop_reference(img, spec), np.asarray(resize_crop(Image.fromarray(img), spec))
    )


def test_a_default_crop_fraction_is_left_out_so_older_runtimes_load_the_manifest():
    """Runtimes before crop_pct refuse unknown preprocessing keys: a spec that does not use it omits it."""
    assert "crop_pct" not in PreprocessSpec().to_dict()
    assert PreprocessSpec(crop_pct=0.9).to_dict()["crop_pct"] == 0.9
    for spec in (PreprocessSpec(), PreprocessSpec(crop_pct=0.875, resize="squash", interpolation="bilinear")):
        assert PreprocessSpec.from_dict(spec.to_dict()) == spec
