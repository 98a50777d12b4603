"""``i2p-train --align``: one encoding pipeline for both classes, drawn per image, never from the label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from i2p.evaluation.labels import Sample
from i2p.runtime.preprocess import PreprocessSpec
from i2p.train.augment import AugmentConfig, parse_align
from i2p.train.checkpoint import read_checkpoint
from i2p.train.config import TrainConfig
from i2p.train.data import ImageDataset
from i2p.train.train_cli import train as train_cmd
from tests.support.training import TINY

SPEC = PreprocessSpec(size=32)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("jpeg:60-100,resize:0.5-1.0", "jpeg:60-100,resize:0.5-1"),
        (" JPEG:90 ", "jpeg:90"),
        ("resize:0.5-0.5,jpeg:30-31", "resize:0.5,jpeg:30-31"),
        ("jpeg:1-100", "jpeg:1-100"),
    ],
)
def test_align_specs_parse_to_one_spelling(text, normal):
    assert parse_align(text).text == normal
    assert TrainConfig(data="d", align=text).align == normal


@pytest.mark.parametrize(
    "text",
    [
        "jpeg:0-100", "jpeg:60-101", "jpeg:100-60", "jpeg:60.5-90", "jpeg:inf", "jpeg:nan-90", "jpeg:60-",
        "jpeg:-60", "jpeg", "jpeg:", "resize:0-1", "resize:0.5-1.5", "resize:1e-3", "webp:80", "blur:1-2",
        "jpeg:60-100,jpeg:70", "jpeg:٩٥", "jpeg:60-100,", ",jpeg:60", "jpeg:60--90", "jpeg:95\x00",
        ",".join(["jpeg:90", "resize:0.5"] * 5), "jpeg:" + "9" * 2000,
    ],
)  # fmt: skip
def test_bad_align_specs_are_refused_naming_the_option(text):
    with pytest.raises(ValueError, match="--align"):
        parse_align(text)
    with pytest.raises(ValueError, match="--align"):
        TrainConfig(data="d", align=text)


def test_the_choice_round_trips_through_the_config_and_old_configs_load():
    cfg = TrainConfig(data="d", align="jpeg:60-100")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).align == "jpeg:60-100"
    old = cfg.to_dict()
    del old["align"]  # a checkpoint written before --align
    assert TrainConfig.from_dict(old).align is None
    assert "align" in TrainConfig.IDENTITY  # a resumed run must keep the pipeline it started with


def _pair(tmp_path, fmt_real="JPEG", fmt_fake="PNG"):
    """The same pixels saved twice: once as a 'real' JPEG file, once as a 'fake' PNG file."""
    samples = {}
    for label, fmt in ((0, fmt_real), (1, fmt_fake)):
        paths = []
        for i in range(6):
            pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
            path = tmp_path / f"{label}_{i}.{fmt.lower()}"
            Image.fromarray(pixels).save(path, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
            paths.append(path)
        samples[label] = [Sample(p, label, "g") for p in paths]
    return samples


def test_a_real_and_a_fake_at_one_index_get_the_same_draws(tmp_path):
    samples = _pair(tmp_path, "PNG", "PNG")  # identical files for both labels
    align = parse_align("resize:0.5-1,jpeg:30-90")
    reals = ImageDataset(samples[0], SPEC, AugmentConfig(), seed=7, align=align)
    fakes = ImageDataset(samples[1], SPEC, AugmentConfig(), seed=7, align=align)
    for epoch in (0, 3):
        reals.set_epoch(epoch)
        fakes.set_epoch(epoch)
        for i in range(6):
            assert reals.align_draw(i) == fakes.align_draw(i)
            (xr, yr, _), (xf, yf, _) = reals[i], fakes[i]
            assert (yr, yf) == (0, 1)
            assert torch.equal(xr, xf)  # same pixels in, same pipeline draw: the same tensor out


def test_draws_depend_on_seed_epoch_and_index_and_stay_in_range(tmp_path):
    samples = _pair(tmp_path)[0]
    align = parse_align("jpeg:60-100,resize:0.5-1")
    ds = ImageDataset(samples, SPEC, AugmentConfig(), seed=1, align=align)
    draws = [ds.align_draw(i) for i in range(6)]
    assert len(set(draws)) == 6
    assert all(60 <= q <= 100 and q == int(q) and 0.5 <= f <= 1 for q, f in draws)
    ds.set_epoch(1)
    assert [ds.align_draw(i) for i in range(6)] != draws
    assert [ImageDataset(samples, SPEC, seed=2, align=align).align_draw(i) for i in range(6)] != draws
    ds.set_epoch(0)
    assert [ds.align_draw(i) for i in range(6)] == draws  # a resumed run redraws the same


def test_alignment_reencodes_before_augmentation_and_leaves_other_draws_alone(tmp_path):
    """With --align the image is re-encoded (a PNG becomes a JPEG of the drawn quality); the augmentation
    draws are those of a run without it (their own random stream)."""
    samples = _pair(tmp_path)[1]  # PNG files
    none = AugmentConfig(blur_prob=0.0, jpeg_prob=0.0, flip=False, scale_jitter=1.0)
    x_plain = ImageDataset(samples, SPEC, none).__getitem__(0)[0]
    x_aligned = ImageDataset(samples, SPEC, none, align=parse_align("jpeg:40")).__getitem__(0)[0]
    assert not torch.equal(x_plain, x_aligned)
    from i2p.evaluation.perturb import jpeg
    from i2p.train.augment import augment

    img = jpeg(Image.open(samples[0].path).convert("RGB"), 40)
    expected = augment(img, none, np.random.default_rng((0, 0, 0)), SPEC)
    assert torch.equal(x_aligned, torch.from_numpy(expected))


def test_bad_align_is_a_usage_error_before_training(tmp_path):
    (tmp_path / "d").mkdir()
    res = CliRunner().invoke(train_cmd, ["--data", str(tmp_path / "d"), "--align", "jpeg:0-50", *TINY])
    assert res.exit_code == 2
    assert "--align 'jpeg:0-50': jpeg takes an integer quality 1..100, got '0'" in res.output


@pytest.mark.slow
def test_training_records_align_and_warns_about_a_biased_set(tmp_path):
    """A real run: the audit's warning is printed (training goes on) and the checkpoint records --align."""
    for label, fmt in (("0_real", "JPEG"), ("1_fake", "PNG")):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(24):
            pixels = np.random.default_rng(i + 100 * (fmt == "PNG")).integers(
                0, 256, (64, 64, 3), dtype=np.uint8
            )
            Image.fromarray(pixels).save(tmp_path / "d" / label / f"{i}.{fmt.lower()}", fmt)
    out = tmp_path / "run"
    args = ["--data", str(tmp_path / "d"), "--out", str(out), "--epochs", "1", "--rank", "0", "--layer", "2"]
    res = CliRunner().invoke(train_cmd, [*args, "--align", "jpeg:60-100,resize:0.5-1.0", *TINY])
    assert res.exit_code == 0, res.output
    assert "warning: shortcut: the file metadata alone tell real from fake" in res.output
    assert "reals are 100% JPEG, fakes 100% PNG" in res.output and "--align is on" in res.output
    assert read_checkpoint(out / "checkpoint.safetensors").meta.config["align"] == "jpeg:60-100,resize:0.5-1"
