"""Robustness sweeps: same degradation for both classes, deterministic, bad files skipped, tables and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from i2p.evaluation.labels import discover
from i2p.evaluation.metrics import MEAN, evaluate
from i2p.evaluation.perturb import parse_sweeps
from i2p.evaluation.robustness import detector_scorer, evaluate_artifact, plot_sweep, sweep, sweep_table
from i2p.runtime.detector import Detector
from i2p.synthetic import make_image_folder
from tests.support.fake_artifact import make_artifact

CONDITIONS = parse_sweeps(["jpeg:90,50", "resize:0.5", "blur:1,2", "social", "resize:0.5+jpeg:90"])


def sharpness_scorer(seen: list | None = None):
    """A stand-in detector: probability from the image's high-frequency energy (what JPEG and blur remove)."""

    def score(images: list[Image.Image]) -> np.ndarray:
        if seen is not None:
            seen.extend(img.tobytes() for img in images)
        hf = [np.abs(np.diff(np.asarray(img.resize((32, 32)), np.float64), axis=1)).mean() for img in images]
        return 1 / (1 + np.exp(-(np.asarray(hf) - 20) / 5))

    return score


@pytest.fixture
def folder(tmp_path):
    make_image_folder(tmp_path / "data", n_per_class=6, size=(48, 40))
    return discover(tmp_path / "data")


def test_the_degradation_does_not_depend_on_the_label(tmp_path):
    # The same picture saved as a real and as a fake image: every condition must score them identically.
    make_image_folder(tmp_path / "d", n_per_class=3, generators=("g",), formats=("png",))
    samples = discover(tmp_path / "d")
    reals = [s for s in samples if s.label == 0]
    for s, twin in zip(reals, [s for s in samples if s.label == 1], strict=True):
        twin.path.write_bytes(s.path.read_bytes())
    seen: list = []
    result = sweep(samples, CONDITIONS, sharpness_scorer(seen), threshold=0.5)
    assert all(m["g"].auc == 0.5 for m in result.metrics.values())  # identical scores for each pair
    assert len(seen) == len(samples) * len(CONDITIONS)
    n = len(samples)
    for c in range(len(CONDITIONS)):
        block = seen[c * n : (c + 1) * n]
        assert block[: n // 2] == block[n // 2 :]  # reals first, then their fake twins, byte-identical inputs


def test_sweep_is_deterministic_and_matches_direct_metrics(folder):
    a = sweep(folder, CONDITIONS, sharpness_scorer(), threshold=0.6, batch_size=5)
    b = sweep(folder, CONDITIONS, sharpness_scorer(), threshold=0.6, batch_size=32)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert list(a.metrics) == [c.name for c in CONDITIONS] and list(a.metrics)[0] == "clean"
    y = np.array([s.label for s in folder])
    from i2p.runtime.preprocess import load_image

    p = sharpness_scorer()([CONDITIONS[2](load_image(s.path)) for s in folder])
    direct = evaluate(y, p, [s.generator for s in folder], 0.6)
    assert a.metrics[CONDITIONS[2].name][MEAN] == direct[MEAN]
    assert a.strengths["jpeg:50"] == 50 and a.strengths["resize:0.5+jpeg:90"] is None


def test_unreadable_files_are_skipped_once_and_named(folder):
    folder[0].path.write_bytes(b"not an image")
    result = sweep(folder, CONDITIONS[:3], sharpness_scorer(), threshold=0.5)
    assert [p for p, _ in result.skipped] == [str(folder[0].path)]
    assert all(m[MEAN].n == len(folder) - 1 for m in result.metrics.values())


def test_table_and_plot(folder, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the [train] extra)")
    result = sweep(folder, CONDITIONS, sharpness_scorer(), threshold=0.5)
    table = sweep_table(result, "auc").splitlines()
    assert table[0].split() == ["condition", "gen_a", "gen_b", "mean", "Δauc", "vs", "clean"]
    assert table[2].split()[0] == "clean" and table[2].split()[-1] == "0.0000"
    png = plot_sweep(result, tmp_path / "sweep.png", "auc", title="test")
    assert png.stat().st_size > 1000 and Image.open(png).size[0] > 300


def test_artifact_evaluation_runs_the_detector_without_torch(folder, tmp_path):
    art = make_artifact(tmp_path / "m.i2p", size=32, threshold=0.4)
    root = folder[0].path.parents[2]
    result = evaluate_artifact(art, root, CONDITIONS[:2], backend="onnxruntime")
    assert result.threshold == 0.4
    with Detector(art, backend="onnxruntime") as det:
        direct = sweep(folder, CONDITIONS[:2], detector_scorer(det), 0.4)
        scorer = {"backend": det.backend.name, "precision": det.backend.precision}
    assert result.scorer == scorer and result.to_dict() == direct.to_dict() | scorer
    assert evaluate_artifact(art, root, CONDITIONS[:1], threshold=0.9, backend="onnxruntime").threshold == 0.9
