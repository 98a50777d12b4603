"""i2p eval --model with an artifact that has the OOD output: the share of verdicts flagged uncertain, overall,
per generator and among wrong vs right verdicts, in the table, --json and the HTML report; none without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from i2p.evaluation.cli import evaluate
from i2p.evaluation.labels import discover
from i2p.evaluation.metrics import evaluate as metrics
from i2p.evaluation.report import render_report
from i2p.evaluation.robustness import ImageScores, SweepResult
from i2p.evaluation.verdicts import uncertain_shares
from i2p.runtime import Detector
from i2p.synthetic import make_image_folder
from tests.support.fake_artifact import make_artifact


def result_with(uncertain: np.ndarray | None) -> SweepResult:
    labels = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.2, 0.7, 0.9, 0.3, 0.1, 0.8])  # at 0.5: images 1 and 3 wrong
    gens = ("a", "a", "a", "b", "b", "b")
    scores = ImageScores(tuple(f"/x/{i}.png" for i in range(6)), labels, gens, p, uncertain)
    return SweepResult(
        0.5, {"clean": metrics(labels, p, gens, 0.5)}, {"clean": None}, [], scores={"clean": scores}
    )


def test_shares_overall_per_generator_and_among_wrong_and_right():
    result = result_with(np.array([False, True, False, True, True, False]))
    (share,) = uncertain_shares(result)
    assert (share.n, share.flagged, share.n_wrong) == (6, 0.5, 2)
    assert share.per_generator == {"a": pytest.approx(1 / 3), "b": pytest.approx(2 / 3)}
    assert (share.wrong, share.right) == (1.0, 0.25)
    assert result.to_dict()["conditions"]["clean"]["uncertain"]["wrong"] == 1.0
    assert (
        uncertain_shares(result_with(None)) == []
        and "uncertain" not in result_with(None).to_dict()["conditions"]["clean"]
    )
    assert "Verdicts flagged uncertain" in render_report(result, "t")
    assert "Verdicts flagged uncertain" not in render_report(result_with(None), "t")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_ood")
    make_image_folder(root / "data", n_per_class=6, size=(48, 40))
    return root / "data"


def artifact_split_at_the_median(root: Path, data: Path) -> Path:
    """A fake artifact with the OOD output whose threshold is the median score of ``data``: both flags occur."""
    artifact = make_artifact(root / "ood.i2p", size=32, threshold=0.6, ood_threshold=1.0)
    files = [str(s.path) for s in discover(data)]
    scores = [p.ood for p in Detector(artifact).predict(files)]
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["ood"]["threshold"] = float(np.median(scores))
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    return artifact


def test_eval_model_reports_the_shares_the_detector_flags(tmp_path, data):
    artifact = artifact_split_at_the_median(tmp_path, data)
    samples = discover(data)
    rows = Detector(artifact).predict([str(s.path) for s in samples])
    flags = np.array([r.uncertain for r in rows])
    wrong = np.array([r.is_fake != bool(s.label) for r, s in zip(rows, samples, strict=True)])
    assert flags.any() and not flags.all() and wrong.any()
    gens = np.array([s.generator for s in samples])
    runner = CliRunner()
    result = runner.invoke(
        evaluate, ["--model", str(artifact), "--data", str(data), "--json", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    got = body["uncertain"]
    assert got["n"] == len(samples) and got["flagged"] == pytest.approx(flags.mean())
    assert got["per_generator"] == {g: pytest.approx(flags[gens == g].mean()) for g in sorted(set(gens))}
    assert got["wrong"] == pytest.approx(flags[wrong].mean()) and got["right"] == pytest.approx(
        flags[~wrong].mean()
    )
    assert got["n_wrong"] == int(wrong.sum())
    text = runner.invoke(evaluate, ["--model", str(artifact), "--data", str(data), "--perturb", "jpeg:50"])
    assert text.exit_code == 0 and "flagged uncertain" in text.output, text.output
    table = text.output.split("flagged uncertain")[1]
    assert "clean" in table and "jpeg:50" in table and "of wrong" in table
    page = tmp_path / "r.html"
    assert (
        runner.invoke(
            evaluate, ["--model", str(artifact), "--data", str(data), "--report", str(page)]
        ).exit_code
        == 0
    )
    assert 'id="uncertain"' in page.read_text()


def test_an_artifact_without_the_ood_output_reports_no_shares(tmp_path, data):
    artifact = make_artifact(tmp_path / "old.i2p", size=32, threshold=0.6)
    runner = CliRunner()
    result = runner.invoke(evaluate, ["--model", str(artifact), "--data", str(data), "--json"])
    assert result.exit_code == 0 and "uncertain" not in json.loads(result.stdout)
    text = runner.invoke(evaluate, ["--model", str(artifact), "--data", str(data)])
    assert text.exit_code == 0 and "uncertain" not in text.output
