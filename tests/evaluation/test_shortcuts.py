"""``i2p eval --shortcuts``: re-encodings that should not change a verdict, and the flip numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from i2p.evaluation.cli import evaluate
from i2p.evaluation.labels import Sample, discover
from i2p.evaluation.perturb import SHORTCUTS, jpeg, parse_condition, parse_sweeps
from i2p.evaluation.robustness import ImageScores, SweepResult, sweep
from i2p.evaluation.verdicts import shortcut_effects, shortcut_table
from i2p.runtime.preprocess import load_image
from tests.support.fake_artifact import make_artifact


def blockiness(img: Image.Image) -> float:
    """Column-difference energy on the 8-pixel JPEG block grid, relative to all columns (1: no blocks)."""
    d = np.abs(np.diff(np.asarray(img.convert("L"), np.float64), axis=1))
    return float(d[:, 7::8].mean() / d.mean())


def format_keyed(images: list[Image.Image]) -> np.ndarray:
    """A stand-in detector that learned the shortcut: JPEG block edges mean 'real', their absence 'fake'."""
    return np.array([1 / (1 + np.exp(np.clip((blockiness(img) - 1.3) * 20, -50, 50))) for img in images])


def _smooth(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0, 20, (64, 64, 3)).cumsum(1) / 8 + 110, 0, 255).astype(np.uint8)


def test_a_detector_keyed_on_the_format_is_shown_as_such(tmp_path):
    """Reals are JPEG 50 files, fakes PNG: re-saving the fakes as JPEG 95 flips them; a PNG re-save,
    which changes the container but no pixel, flips nothing and moves no probability."""
    for i in range(6):
        (tmp_path / "0_real").mkdir(exist_ok=True)
        (tmp_path / "1_fake").mkdir(exist_ok=True)
        Image.fromarray(_smooth(i)).save(tmp_path / "0_real" / f"{i}.jpg", quality=50)
        Image.fromarray(_smooth(100 + i)).save(tmp_path / "1_fake" / f"{i}.png")
    samples = discover(tmp_path)
    result = sweep(samples, parse_sweeps(SHORTCUTS), format_keyed, threshold=0.5)
    assert result.metrics["clean"]["mean"].acc == 1.0  # the shortcut works on the biased set
    effects = {e.condition: e for e in shortcut_effects(result, SHORTCUTS)}
    assert [e for e in effects] == list(SHORTCUTS)
    assert effects["png"].flip_rate == 0.0 and effects["png"].mean_abs_delta == 0.0
    assert effects["jpeg:95"].flip_rate_fake == 1.0 and effects["jpeg:95"].flip_rate_real == 0.0
    assert effects["jpeg:95"].flip_rate == 0.5 and effects["jpeg:95"].n == 12
    # the numbers, recomputed by hand from the images
    clean = format_keyed([load_image(s.path) for s in samples])
    after = format_keyed([jpeg(load_image(s.path), 95) for s in samples])
    assert effects["jpeg:95"].mean_abs_delta == pytest.approx(np.abs(after - clean).mean())
    assert effects["jpeg:95"].max_abs_delta == pytest.approx(np.abs(after - clean).max())
    assert "jpeg:95" in shortcut_table(list(effects.values()))


def test_flip_rates_and_deltas_are_paired_by_image():
    paths = ("a", "b", "c", "d")
    labels = np.array([0, 1, 1, 0])

    def scores(probs, keep=paths):
        idx = [paths.index(p) for p in keep]
        return ImageScores(tuple(keep), labels[idx], ("g",) * len(keep), np.array(probs, dtype=np.float64))

    result = SweepResult(0.5, {}, {}, [])
    result.scores = {
        "clean": scores([0.2, 0.8, 0.6, 0.4]),
        "png": scores([0.2, 0.8, 0.6, 0.4]),
        "jpeg:95": scores([0.7, 0.3, 0.6, 0.4]),
        "noexif": scores([0.5, 0.1], keep=("a", "c")),  # b and d unreadable under this condition
    }
    png, jpg, noexif = shortcut_effects(result, ["png", "jpeg:95", "noexif"])
    assert (png.n, png.flip_rate, png.mean_abs_delta, png.max_abs_delta) == (4, 0.0, 0.0, 0.0)
    assert (jpg.flip_rate, jpg.flip_rate_real, jpg.flip_rate_fake) == (0.5, 0.5, 0.5)
    assert jpg.mean_abs_delta == pytest.approx(0.25) and jpg.max_abs_delta == pytest.approx(0.5)
    assert noexif.n == 2 and noexif.flip_rate == 1.0  # 0.2 -> 0.5 is fake at threshold 0.5 (>=); 0.6 -> 0.1
    assert noexif.mean_abs_delta == pytest.approx(0.4)
    assert noexif.to_dict()["flip_rate_real"] == 1.0


def test_noexif_reads_the_file_without_its_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "a.jpg", exif=exif.tobytes())
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "b.png")
    assert load_image(tmp_path / "a.jpg").size == (20, 40)  # upright, as the runtime scores it
    assert parse_condition("noexif").load(tmp_path / "a.jpg").size == (40, 20)  # as stored
    assert parse_condition("noexif+scale:1.1").load(tmp_path / "a.jpg").size == (44, 22)
    assert parse_condition("noexif").load(tmp_path / "b.png").size == (40, 20)
    samples = [Sample(tmp_path / "a.jpg", 0, "g"), Sample(tmp_path / "b.png", 1, "g")]
    wide = lambda images: np.array([float(img.width > img.height) for img in images])  # noqa: E731
    result = sweep(samples, parse_sweeps(["noexif"]), wide, threshold=0.5)
    (effect,) = shortcut_effects(result, ["noexif"])
    assert (effect.flip_rate_real, effect.flip_rate_fake) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("spec", "size"), [("scale:0.9", (36, 18)), ("scale:1.1", (44, 22)), ("png", (40, 20))]
)
def test_resaves_and_rescales(tmp_path, spec, size):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = parse_condition(spec).load(tmp_path / "a.png")
    assert out.size == size and out.mode == "RGB"
    if spec == "png":
        assert np.array_equal(np.asarray(out), pixels)


@pytest.mark.parametrize("spec", ["png:1", "noexif:", "scale:0.4", "scale:2.5", "scale:inf", "scale"])
def test_bad_shortcut_specs_are_refused(spec):
    with pytest.raises(ValueError, match="--perturb"):
        parse_sweeps([spec])


def test_eval_shortcuts_on_an_artifact(tmp_path):
    artifact = make_artifact(tmp_path / "m.i2p", size=32)
    (tmp_path / "d" / "0_real").mkdir(parents=True)
    (tmp_path / "d" / "1_fake").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_smooth(i)).save(tmp_path / "d" / "0_real" / f"{i}.jpg", quality=60)
        Image.fromarray(_smooth(10 + i)).save(tmp_path / "d" / "1_fake" / f"{i}.png")
    args = ["--model", str(artifact), "--data", str(tmp_path / "d"), "--shortcuts"]
    res = CliRunner().invoke(evaluate, [*args, "--json"])
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    rows = {r["condition"]: r for r in body["shortcuts"]}
    assert list(rows) == list(SHORTCUTS)
    assert all(r["n"] == 6 and 0 <= r["flip_rate"] <= 1 for r in rows.values())
    assert rows["png"]["mean_abs_delta"] == 0.0  # same pixels, same score, through the real runtime
    assert rows["scale:1.1"]["mean_abs_delta"] > 0
    assert set(body["conditions"]) == {"clean", *SHORTCUTS}
    text = CliRunner().invoke(evaluate, args)
    assert text.exit_code == 0 and "verdict flips after a change of delivery" in text.stdout
    assert "noexif" in text.stdout


def test_undefined_shares_print_as_n_a_in_every_table() -> None:
    """A condition with no wrong verdicts has no "flagged among wrong" share: the table says n/a, not nan."""
    from i2p.base.tables import format_table

    lines = format_table([{"condition": "clean", "of wrong": math.nan, "of right": 0.25}]).splitlines()
    assert lines[2].split() == ["clean", "n/a", "0.2500"]
