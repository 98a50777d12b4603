"""Data discovery, splitting, file checks, the Dataset and train-time augmentation, on real files."""

from __future__ import annotations

import dataclasses
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from i2p.runtime.preprocess import PreprocessSpec, normalize, preprocess, resized_size
from i2p.train.augment import AugmentConfig, augment
from i2p.train.data import (
    BadSample,
    DataError,
    ImageDataset,
    Sample,
    class_counts,
    collate_skip_bad,
    discover,
    scan,
    split,
)
from tests.support.images import make_image_folder, synthetic_image, write_csv_manifest

SPEC = PreprocessSpec(size=24)


def as_rows(samples: list[Sample]) -> list[tuple[Path, int, str]]:
    return [(s.path, s.label, s.generator) for s in samples]


# ---------------------------------------------------------------------------------------------- discover


@pytest.mark.parametrize("class_dirs", [("0_real", "1_fake"), ("real", "fake"), ("Real", "FAKE")])
def test_discover_ufd_layout(tmp_path, class_dirs):
    rows = make_image_folder(
        tmp_path / "data", "ufd", n_per_class=3, generators=("sd", "glide"), class_dirs=class_dirs
    )
    samples = discover(tmp_path / "data")
    assert as_rows(samples) == rows
    assert class_counts(samples) == {"glide": (3, 3), "sd": (3, 3)}


@pytest.mark.parametrize("class_dirs", [("0_real", "1_fake"), ("real", "fake")])
def test_discover_flat_layout_names_generator_after_folder(tmp_path, class_dirs):
    rows = make_image_folder(tmp_path / "ldm", "flat", n_per_class=2, class_dirs=class_dirs)
    samples = discover(str(tmp_path / "ldm"))
    assert as_rows(samples) == rows
    assert {s.generator for s in samples} == {"ldm"}


def test_discover_recurses_filters_and_sorts(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, "ufd", n_per_class=1, generators=("g",))
    nested = root / "g" / "1_fake" / "sub" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "z.webp")
    Image.new("RGB", (8, 8)).save(nested / "a.BMP")
    (root / "g" / "1_fake" / "notes.txt").write_text("not an image")
    (root / "g" / "1_fake" / ".hidden.png").write_bytes(b"")
    (root / "g" / "0_real" / "._img_000.png").write_bytes(b"macOS resource fork")
    (root / "README.md").write_text("files beside the generator folders are ignored")
    samples = discover(root)
    fake = [s.path.relative_to(root).as_posix() for s in samples if s.label == 1]
    assert fake == ["g/1_fake/img_000.png", "g/1_fake/sub/deeper/a.BMP", "g/1_fake/sub/deeper/z.webp"]
    assert [s.label for s in samples] == [0, 1, 1, 1]
    assert discover(root) == samples  # deterministic


def test_discover_cnndetection_category_folders_belong_to_their_generator(tmp_path):
    root = tmp_path / "test"
    make_image_folder(root / "progan" / "airplane", "flat", n_per_class=1)
    make_image_folder(root / "progan" / "cat", "flat", n_per_class=2)
    make_image_folder(root / "glide", "flat", n_per_class=1, class_dirs=("0_real", "1_fake"))
    assert class_counts(discover(root)) == {"glide": (1, 1), "progan": (3, 3)}


def test_discover_single_class_generators_are_allowed(tmp_path):
    """UniversalFakeDetect's diffusion set keeps real images in their own folders (laion/0_real)."""
    make_image_folder(tmp_path / "d", "ufd", n_per_class=2, generators=("laion",), class_dirs=("0_real", "x"))
    make_image_folder(tmp_path / "d", "ufd", n_per_class=2, generators=("dalle",), class_dirs=("y", "1_fake"))
    for stray in (tmp_path / "d" / "laion" / "x", tmp_path / "d" / "dalle" / "y"):
        for f in stray.iterdir():
            f.unlink()
        stray.rmdir()
    assert class_counts(discover(tmp_path / "d")) == {"dalle": (0, 2), "laion": (2, 0)}


@pytest.mark.parametrize("with_generator", [True, False])
def test_discover_csv_manifest(tmp_path, with_generator):
    rows = make_image_folder(tmp_path / "imgs", "ufd", n_per_class=2)
    csv_path = write_csv_manifest(tmp_path / "lists" / "test.csv", rows, with_generator=with_generator)
    samples = discover(csv_path)
    expected = [(p.resolve(), lab, g if with_generator else "test") for p, lab, g in rows]
    expected.sort(key=lambda r: (r[2], r[1], str(r[0])))
    assert [(s.path.resolve(), s.label, s.generator) for s in samples] == expected
    assert all(s.path.is_file() for s in samples)


def test_csv_accepts_word_labels_absolute_paths_and_missing_generator(tmp_path):
    img = tmp_path / "z.png"  # each file under one label: one listed as both is an error (test_labels.py)
    Image.new("RGB", (8, 8)).save(img)
    (tmp_path / "m.csv").write_text(
        f" Path , LABEL ,generator\nx.png,real,g1\ny.png, Fake ,\n{img},1,g1\nsub/x.png,0,g2\n"
    )
    samples = discover(tmp_path / "m.csv")
    assert as_rows(samples) == [  # sorted by (generator, label, path); missing files are scan()'s business
        (tmp_path / "x.png", 0, "g1"),
        (tmp_path / "z.png", 1, "g1"),
        (tmp_path / "sub" / "x.png", 0, "g2"),
        (tmp_path / "y.png", 1, "m"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\na.png,0\n", "header must name the columns path,label"),
        ("", "header must name the columns"),
        ("path,label\n", "lists no images"),
        ("path,label\na.png,0\nb.png,2\n", "line 3: label '2' is not one of 0, 1, real, fake"),
        ("path,label\na.png,0\n,1\n", "line 3: empty path"),
        ("path,label\na.png,0\nb.png\n", "line 3: the number of fields differs"),
        ("path,label\na.png,0,extra\n", "line 2: the number of fields differs"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        discover(tmp_path / "bad.csv")
    assert str(tmp_path / "bad.csv") in str(err.value)


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        discover(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match=r"x\.txt: expected a folder of images or a \.csv"):
        discover(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no class folders found"):
        discover(tmp_path / "empty")
    (tmp_path / "nolayout" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="nolayout: no class folders found"):
        discover(tmp_path / "nolayout")


def test_empty_class_folder_is_an_error(tmp_path):
    make_image_folder(tmp_path / "d", "ufd", n_per_class=1, generators=("g",))
    for f in (tmp_path / "d" / "g" / "1_fake").iterdir():
        f.unlink()
    (tmp_path / "d" / "g" / "1_fake" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"g/1_fake: class folder holds no images"):
        discover(tmp_path / "d")


def test_generator_folder_without_classes_and_duplicate_class_names_are_errors(tmp_path):
    make_image_folder(tmp_path / "d", "ufd", n_per_class=1, generators=("g",))
    (tmp_path / "d" / "typo" / "fakes").mkdir(parents=True)
    with pytest.raises(DataError, match="typo: generator folder without 0_real/1_fake"):
        discover(tmp_path / "d")
    make_image_folder(tmp_path / "f", "flat", n_per_class=1)
    make_image_folder(tmp_path / "f", "flat", n_per_class=1, class_dirs=("real", "1_fake"))
    with pytest.raises(DataError, match="both 0_real and real exist"):
        discover(tmp_path / "f")


# ---------------------------------------------------------------------------------------------- split


def fake_samples(counts: dict[tuple[str, int], int]) -> list[Sample]:
    return [Sample(Path(f"/{g}/{lab}/{i}.png"), lab, g) for (g, lab), n in counts.items() for i in range(n)]


def test_split_is_stratified_and_deterministic():
    counts = {("a", 0): 100, ("a", 1): 40, ("b", 0): 7, ("b", 1): 2, ("c", 1): 1}
    samples = fake_samples(counts)
    train, val = split(samples, 0.2, seed=3)
    assert sorted(train + val, key=str) == sorted(samples, key=str) and not set(train) & set(val)
    n_val = Counter((s.generator, s.label) for s in val)
    assert n_val == {("a", 0): 20, ("a", 1): 8, ("b", 0): 1, ("b", 1): 1}  # c keeps its single image
    assert [samples.index(s) for s in val] == sorted(samples.index(s) for s in val)  # input order kept
    assert split(samples, 0.2, seed=3) == (train, val)
    assert split(samples, 0.2, seed=4)[1] != val


def test_split_rejects_bad_fraction():
    for f in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            split(fake_samples({("a", 0): 4}), f, seed=0)


# ---------------------------------------------------------------------------------------------- scan


def test_scan_reports_unreadable_files_and_keeps_the_rest(tmp_path):
    make_image_folder(tmp_path / "d", "flat", n_per_class=3, size=(40, 32))
    samples = discover(tmp_path / "d")
    samples[0].path.write_bytes(b"")  # zero bytes
    samples[1].path.write_bytes(samples[1].path.read_bytes()[:12])  # truncated inside the header
    samples[3].path.write_text("this is not an image")
    missing = Sample(tmp_path / "gone.png", 1, "d")
    good, bad = scan([*samples, missing], max_pixels=10_000, progress=False)
    assert good == [samples[2], samples[4], samples[5]]
    assert [s for s, _ in bad] == [samples[0], samples[1], samples[3], missing]
    reasons = [r for _, r in bad]
    assert "empty file" in reasons[0]
    assert "not a readable image" in reasons[1] and "not a readable image" in reasons[2]
    assert "cannot read file" in reasons[3]
    assert all(str(s.path) in r for s, r in bad)  # every reason names its file
    _, too_big = scan(samples[2:3], max_pixels=40 * 32 - 1, progress=False)
    assert "exceeds the 1,279-pixel limit" in too_big[0][1]


# ---------------------------------------------------------------------------------------------- Dataset


@pytest.fixture
def folder(tmp_path) -> list[Sample]:
    make_image_folder(tmp_path / "d", "ufd", n_per_class=3, size=(37, 29), generators=("g1", "g2"))
    return discover(tmp_path / "d")


def test_eval_dataset_output_is_the_runtime_preprocess(folder):
    ds = ImageDataset(folder, SPEC)
    assert len(ds) == len(folder)
    for i, sample in enumerate(folder):
        x, label, index = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 24, 24)
        assert (label, index) == (sample.label, i)
        np.testing.assert_array_equal(x.numpy(), preprocess(sample.path, SPEC))
    ds.set_epoch(5)  # evaluation has no randomness: epochs do not matter
    np.testing.assert_array_equal(ds[2][0].numpy(), preprocess(folder[2].path, SPEC))


def test_undecodable_file_at_load_time_is_dropped_and_reported(folder):
    jpg = next(s for s in folder if s.path.suffix == ".jpg")
    data = jpg.path.read_bytes()
    jpg.path.write_bytes(data[: len(data) // 2])  # header intact: passes scan(), fails to decode
    assert scan([jpg], SPEC.max_pixels, progress=False)[1] == []
    for augment_cfg in (None, AugmentConfig()):
        loader = DataLoader(
            ImageDataset(folder, SPEC, augment_cfg), batch_size=4, collate_fn=collate_skip_bad, num_workers=0
        )
        batches = list(loader)
        bad = [b for batch in batches for b in batch.bad]
        assert [(b.path, b.index) for b in bad] == [(jpg.path, folder.index(jpg))]
        assert "truncated" in bad[0].reason and str(jpg.path) in bad[0].reason
        indices = torch.cat([b.indices for b in batches]).tolist()
        assert indices == [i for i in range(len(folder)) if i != folder.index(jpg)]
        labels = torch.cat([b.labels for b in batches])
        assert labels.dtype == torch.float32 and labels.tolist() == [folder[i].label for i in indices]
        assert all(b.images.shape == (len(b.indices), 3, 24, 24) for b in batches)


def test_an_elongated_image_follows_the_runtimes_16_to_1_rule_in_training_and_evaluation(tmp_path):
    """A 150:1 strip is center-cropped to 16:1 before the resize on every path: evaluation gives exactly
    the runtime's input, augmentation a full-size crop of it (once refused as "too elongated")."""
    strip = tmp_path / "strip.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(2, 300, 3), dtype=np.uint8)).save(strip)
    spec = PreprocessSpec(size=24, max_pixels=5_000)
    x, label, index = ImageDataset([Sample(strip, 1, "g")], spec)[0]
    np.testing.assert_array_equal(x.numpy(), preprocess(strip, spec))
    assert (label, index) == (1, 0)
    cropped = Image.open(strip).crop((134, 0, 166, 2))  # the centered 32x2 box
    np.testing.assert_array_equal(x.numpy(), preprocess(cropped, spec))
    augmented = ImageDataset([Sample(strip, 1, "g")], spec, AugmentConfig())[0]
    assert not isinstance(augmented, BadSample) and augmented[0].shape == (3, 24, 24)


def test_collate_of_an_all_bad_batch_is_empty():
    bad = [BadSample(0, Path("a.png"), "broken"), BadSample(1, Path("b.png"), "broken")]
    batch = collate_skip_bad(bad)
    assert batch.images.numel() == 0 and len(batch.labels) == 0 and len(batch.indices) == 0
    assert batch.bad == bad


def test_augmentation_is_deterministic_per_seed_epoch_index(folder):
    ds = ImageDataset(folder, SPEC, AugmentConfig(), seed=7)
    first = [ds[i][0] for i in range(len(ds))]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # same epoch: same images
    ds.set_epoch(1)
    second = [ds[i][0] for i in range(len(ds))]
    assert sum(not torch.equal(a, b) for a, b in zip(first, second, strict=True)) >= len(ds) - 1
    resumed = ImageDataset(folder, SPEC, AugmentConfig(), seed=7)  # a fresh process resuming at epoch 1
    resumed.set_epoch(1)
    assert all(torch.equal(resumed[i][0], b) for i, b in enumerate(second))
    other_seed = ImageDataset(folder, SPEC, AugmentConfig(), seed=8)
    assert sum(not torch.equal(other_seed[i][0], a) for i, a in enumerate(first)) >= len(ds) - 1


def test_augmentation_does_not_depend_on_workers_or_batching(folder):
    ds = ImageDataset(folder, SPEC, AugmentConfig(), seed=1)
    ds.set_epoch(2)
    expected = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_skip_bad)
    batches = list(loader)
    got = torch.cat([b.images for b in batches])
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(len(ds)))
    assert torch.equal(got, expected)


def test_dataset_rejects_negative_seed(folder):
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ImageDataset(folder, SPEC, AugmentConfig(), seed=-1)


# ---------------------------------------------------------------------------------------------- augment

NO_PIXEL_CHANGES = AugmentConfig(resize_prob=0.0, blur_prob=0.0, jpeg_prob=0.0, flip=True, scale_jitter=1.0)


def square_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(synthetic_image(0, (SPEC.size, SPEC.size), np.random.default_rng(seed)))


def test_augment_geometry_matches_evaluation_and_flips_half_the_time():
    img = square_image()
    evaluated = preprocess(img, SPEC)
    outputs = [augment(img, NO_PIXEL_CHANGES, np.random.default_rng(s), SPEC) for s in range(40)]
    flipped = [np.array_equal(x, evaluated[:, :, ::-1]) for x in outputs]
    same = [np.array_equal(x, evaluated) for x in outputs]
    assert all(f or s for f, s in zip(flipped, same, strict=True))  # same pixels, same normalization
    assert 8 <= sum(flipped) <= 32
    no_flip = dataclasses.replace(NO_PIXEL_CHANGES, flip=False)
    assert all(
        np.array_equal(augment(img, no_flip, np.random.default_rng(s), SPEC), evaluated) for s in range(5)
    )


def test_augment_crop_jitter_stays_at_evaluation_scale():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8))  # 50 wide, 30 high
    cfg = AugmentConfig(resize_prob=0.0, blur_prob=0.0, jpeg_prob=0.0, flip=False)
    outs = [augment(img, cfg, np.random.default_rng(s), SPEC) for s in range(30)]
    assert all(x.shape == (3, 24, 24) and x.dtype == np.float32 for x in outs)
    assert len({x.tobytes() for x in outs}) > 20  # crop position and scale vary
    # Every output is a crop of the image resized to a shorter side in [24, round(24 * 8 / 7) = 27].
    candidates = []
    for short in range(24, 28):
        resized = normalize(
            np.asarray(img.resize(resized_size(50, 30, short, "shortest"), Image.Resampling.BICUBIC)), SPEC
        )
        candidates.append(resized)
    for x in outs:
        assert any(
            np.array_equal(x, c[:, t : t + 24, left : left + 24])
            for c in candidates
            for t in range(c.shape[1] - 23)
            for left in range(c.shape[2] - 23)
        )


@pytest.mark.parametrize(
    ("spec", "sides"),
    [
        (PreprocessSpec(size=24, resize="squash", interpolation="bilinear"), range(24, 28)),  # PE-Core's
        (PreprocessSpec(size=24, crop_pct=0.75), range(24, 38)),  # scale_size 32: up to round(32 * 8 / 7)
    ],
)
def test_augment_follows_the_specs_resize_mode_filter_and_crop_fraction(spec, sides):
    """Training crops at the deployment's scale, resized the deployment's way with its filter."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8))
    cfg = AugmentConfig(resize_prob=0.0, blur_prob=0.0, jpeg_prob=0.0, flip=False)
    outs = [augment(img, cfg, np.random.default_rng(s), spec) for s in range(30)]
    filt = Image.Resampling.BILINEAR if spec.interpolation == "bilinear" else Image.Resampling.BICUBIC
    candidates = [
        normalize(np.asarray(img.resize(resized_size(50, 30, side, spec.resize), filt)), spec)
        for side in sides
    ]
    for x in outs:
        assert any(
            np.array_equal(x, c[:, t : t + 24, left : left + 24])
            for c in candidates
            for t in range(c.shape[1] - 23)
            for left in range(c.shape[2] - 23)
        )
    assert len({x.tobytes() for x in outs}) > 10  # crop position and scale vary


def test_augment_blur_and_jpeg_change_pixels_as_configured():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(24, 24, 3), dtype=np.uint8))
    plain = augment(img, dataclasses.replace(NO_PIXEL_CHANGES, flip=False), np.random.default_rng(0), SPEC)

    def high_freq(x: np.ndarray) -> float:
        return float(np.abs(np.diff(x, axis=2)).mean())

    blur = AugmentConfig(
        resize_prob=0.0, blur_prob=1.0, blur_sigma=(2.0, 2.0), jpeg_prob=0.0, flip=False, scale_jitter=1.0
    )
    blurred = augment(img, blur, np.random.default_rng(0), SPEC)
    assert high_freq(blurred) < 0.3 * high_freq(plain)
    jpeg = AugmentConfig(
        resize_prob=0.0, blur_prob=0.0, jpeg_prob=1.0, jpeg_quality=(30, 30), flip=False, scale_jitter=1.0
    )
    recoded = augment(img, jpeg, np.random.default_rng(0), SPEC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=30)
    np.testing.assert_array_equal(recoded, preprocess(buf.getvalue(), SPEC))
    assert not np.array_equal(recoded, plain)


def test_augment_probabilities_follow_the_config():
    img = square_image(3)
    cfg = AugmentConfig(
        resize_prob=0.0, blur_prob=0.5, blur_sigma=(1.0, 3.0), jpeg_prob=0.0, flip=False, scale_jitter=1.0
    )
    evaluated = preprocess(img, SPEC)
    changed = sum(
        not np.array_equal(augment(img, cfg, np.random.default_rng(s), SPEC), evaluated) for s in range(60)
    )
    assert 15 <= changed <= 45


@pytest.mark.parametrize(
    "kwargs",
    [
        {"blur_prob": 1.5},
        {"jpeg_prob": -0.1},
        {"blur_sigma": (2.0, 1.0)},
        {"jpeg_quality": (0, 90)},
        {"jpeg_quality": (90, 101)},
        {"scale_jitter": 0.9},
    ],
)
def test_augment_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AugmentConfig(**kwargs)


def test_synthetic_classes_are_separable():
    """The test images' classes differ learnably: noise inside 2x2 blocks only in real images."""
    rng = np.random.default_rng(0)

    def in_block_variation(label: int) -> float:
        x = synthetic_image(label, (32, 24), rng).astype(float)
        return float(np.abs(x[:, 0::2] - x[:, 1::2]).mean())

    real = [in_block_variation(0) for _ in range(20)]
    fake = [in_block_variation(1) for _ in range(20)]
    assert min(real) > 10 > 3 > max(fake)
