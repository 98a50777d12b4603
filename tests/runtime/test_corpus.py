"""The bad-input corpus through the API and through i2p-detect: one clear error per bad file, the right
answer for every good one, no crash and no hang."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from i2p.runtime import Detector
from i2p.runtime.detect_cli import detect
from tests.support.corpus import Case, make_bad_corpus
from tests.support.fake_artifact import make_artifact


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Case]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_bad_corpus(root)


@pytest.fixture(scope="module")
def det(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    return Detector(make_artifact(tmp_path_factory.mktemp("artifact") / "fake.i2p"), batch_size=8)


def check(
    name: str, case: Case, path: str, probability: float | None, error: str | None, det: Detector
) -> None:
    if case.error is not None:
        assert probability is None, f"{name} should have failed"
        assert error and path in error and case.error in error, f"{name}: {error!r}"
        return
    assert error is None, f"{name}: {error}"
    [expected] = det.predict(case.pixels)
    assert probability == pytest.approx(expected.probability, abs=case.tolerance, rel=0), name


@pytest.mark.timeout(60)
def test_api_on_the_corpus(corpus: tuple[Path, dict[str, Case]], det: Detector) -> None:
    root, cases = corpus
    names = sorted(cases)
    results = det.predict([root / n for n in names])  # all in one call: bad files must not sink the batch
    assert len(results) == len(names)
    for name, r in zip(names, results, strict=True):
        assert r.source == str(root / name)
        check(name, cases[name], r.source, r.probability, r.error, det)
    assert {n for n, r in zip(names, results, strict=True) if r.ok} == {
        n for n, c in cases.items() if not c.error
    }


def test_exif_orientation_is_applied(corpus: tuple[Path, dict[str, Case]], det: Detector) -> None:
    """The upright pixels score differently from the stored sideways ones, so the corpus check has teeth."""
    upright = corpus[1]["exif_rotated.jpg"].pixels
    assert det.predict(np.rot90(upright))[0].probability != det.predict(upright)[0].probability


@pytest.mark.timeout(60)
def test_cli_on_the_corpus(corpus: tuple[Path, dict[str, Case]], det: Detector, tmp_path: Path) -> None:
    root, cases = corpus
    out = tmp_path / "rows.csv"
    args = [
        str(root),
        "--model",
        str(det.path),
        "--csv",
        str(out),
        "--workers",
        "3",
        "--batch-size",
        "4",
        "--json",
    ]
    result = CliRunner().invoke(detect, args)
    assert result.exit_code == 0, result.output
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(cases)  # one row per file, nothing else
    for row in rows:
        name = Path(row["path"]).name
        prob = float(row["probability"]) if row["probability"] else None
        check(name, cases[name], row["path"], prob, row["error"] or None, det)
        assert row["label"] == ("" if prob is None else ("fake" if prob >= det.threshold else "real"))
    summary = json.loads(result.stdout)  # rows went to the file, so stdout holds only the summary
    errors = sum(1 for c in cases.values() if c.error)
    assert (summary["files"], summary["errors"]) == (len(cases), errors)
    assert summary["fake"] + summary["real"] == len(cases) - errors


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root can read a chmod-000 file, so it cannot be made unreadable"
)
def test_unreadable_file_is_an_error_row(corpus: tuple[Path, dict[str, Case]], det: Detector) -> None:
    root, cases = corpus
    [r] = det.predict(root / "unreadable.jpg")
    assert "Permission denied" in r.error and str(root / "unreadable.jpg") in r.error
