"""Prediction.ood / Prediction.uncertain: from the artifact's ood output and its stored threshold, into the files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from i2p.runtime import Detector
from i2p.runtime.detect_cli import detect
from i2p.runtime.manifest import ArtifactError, read_manifest
from i2p.runtime.preprocess import preprocess

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def ood_artifact(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting an artifact with an OOD output needs the [export] extra")
    from i2p.export.pipeline import ExportOptions, run_export
    from tests.support.checkpoints import make_checkpoint

    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt"), layer=2, ood=True)
    opts = ExportOptions(
        ckpt=ckpt, out=tmp_path_factory.mktemp("art") / "det.i2p", engine="no", random_samples=4
    )
    return run_export(opts, echo=lambda _: None).artifact


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(6):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (70, 64, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.mark.parametrize("version", ["v0", "v1"])
def test_old_artifacts_load_with_ood_absent(version):
    artifact = FIXTURES / version / "artifact"
    assert read_manifest(artifact).ood is None
    det = Detector(artifact, backend="onnxruntime")
    (p,) = det.predict([next((FIXTURES / version / "images").iterdir())])
    assert p.ok and p.ood is None and p.uncertain is None and det.ood_threshold is None


def test_ood_is_the_network_output_and_uncertain_uses_the_stored_threshold(ood_artifact, images, tmp_path):
    det = Detector(ood_artifact, backend="onnxruntime", precision="fp32")
    preds = det.predict(images)
    manifest = read_manifest(ood_artifact)
    x = np.stack([preprocess(p, manifest.preprocess) for p in images])
    session = ort.InferenceSession(str(ood_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    (want,) = session.run(["ood"], {"image": x})
    np.testing.assert_allclose([p.ood for p in preds], want, rtol=1e-5)
    assert [p.uncertain for p in preds] == [bool(v > manifest.ood.threshold) for v in want]
    # a copy whose stored threshold is the median: the flags follow it, half and half
    copy = tmp_path / "copy.i2p"
    shutil.copytree(ood_artifact, copy)
    d = json.loads((copy / "manifest.json").read_text())
    d["ood"]["threshold"] = float(np.median(want))
    (copy / "manifest.json").write_text(json.dumps(d))
    flagged = [p.uncertain for p in Detector(copy, backend="onnxruntime", precision="fp32").predict(images)]
    assert flagged == [bool(v > np.median(want)) for v in want] and 0 < sum(flagged) < len(flagged)


@pytest.mark.parametrize("change", ["output without field", "field without output"])
def test_manifest_ood_field_and_output_go_together(ood_artifact, tmp_path, change):
    copy = tmp_path / "copy.i2p"
    shutil.copytree(ood_artifact, copy)
    d = json.loads((copy / "manifest.json").read_text())
    if change == "output without field":
        del d["ood"]
    else:
        d["outputs"] = [o for o in d["outputs"] if o["name"] != "ood"]
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="'ood'"):
        Detector(copy, backend="onnxruntime")


def test_a_declared_ood_output_the_network_lacks_is_refused(ood_artifact, tmp_path):
    """v1's network has no ood output: a manifest that declares one fails the contract check at load."""
    copy = tmp_path / "v1.i2p"
    shutil.copytree(FIXTURES / "v1" / "artifact", copy)
    d = json.loads((copy / "manifest.json").read_text())
    d["outputs"].append({"name": "ood", "dtype": "float32", "shape": ["batch"]})
    d["ood"] = json.loads((ood_artifact / "manifest.json").read_text())["ood"]
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="no output 'ood'"):
        Detector(copy, backend="onnxruntime")


def _detect(*args: object) -> None:
    result = CliRunner().invoke(detect, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_files_carry_ood_and_uncertain(ood_artifact, images, tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    _detect(*images, "--model", ood_artifact, f"--{fmt}", out, "--backend", "onnxruntime")
    if fmt == "csv":
        with out.open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0])[-2:] == ["ood", "uncertain"]
        assert all(float(r["ood"]) > 0 and r["uncertain"] in ("True", "False") for r in rows)
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(isinstance(r["ood"], float) and isinstance(r["uncertain"], bool) for r in rows)
    assert len(rows) == len(images)


def test_resume_continues_a_csv_written_before_the_ood_columns(ood_artifact, images, tmp_path):
    out = tmp_path / "out.csv"
    _detect(*images[:2], "--model", ood_artifact, "--csv", out, "--backend", "onnxruntime")
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    with out.open("w", newline="") as f:  # as the previous i2p-detect wrote it: six columns
        csv.writer(f).writerows(r[:6] for r in rows)
    _detect(*images, "--model", ood_artifact, "--csv", out, "--backend", "onnxruntime", "--resume")
    with out.open(newline="") as f:
        again = list(csv.reader(f))
    assert again[0] == rows[0][:6] and len(again) == len(images) + 1 and {len(r) for r in again} == {6}
