"""``i2p calibrate``: a point at a target FPR on one's own reals, on real ONNX Runtime sessions and files.

The artifact is a copy of the v1 fixture (a real exported tiny ViT with three points from training);
reals and fakes are generated PNGs, with dimmer pixels for the reals so the scores of the two differ.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from i2p.base.files import sha256_file
from i2p.cli import main
from i2p.evaluation.calibrate import (
    CalibrationError,
    beta_quantile,
    betainc,
    calibrate,
    clopper_pearson,
    files_digest,
    fpr_threshold,
    min_reals,
)
from i2p.evaluation.cli import evaluate
from i2p.runtime import ArtifactError, Detector
from i2p.runtime.detect_cli import detect
from i2p.runtime.manifest import MANIFEST, read_manifest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
V1 = FIXTURES / "v1" / "artifact"


def _images(folder: Path, n: int, seed: int, brightness: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = (rng.random((40 + i % 7, 48, 3)) * 255 * brightness).astype(np.uint8)
        path = folder / f"{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A labelled folder: 0_real (80 reals, enough for a 5% target) and 1_fake (20)."""
    root = tmp_path_factory.mktemp("calib") / "data"
    _images(root / "0_real", 80, seed=1, brightness=0.5)
    _images(root / "1_fake", 20, seed=2, brightness=1.0)
    return root


@pytest.fixture
def artifact(tmp_path) -> Path:
    return Path(shutil.copytree(V1, tmp_path / "a.i2p"))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, data) -> Path:
    art = Path(shutil.copytree(V1, tmp_path_factory.mktemp("cal") / "a.i2p"))
    calibrate(art, data / "0_real", 0.05, "uploads", fakes=data / "1_fake", precision="fp32")
    return art


def _p_real(art: Path, data: Path, **kw) -> np.ndarray:
    with Detector(art, precision="fp32", **kw) as det:
        preds = det.predict(sorted(str(p) for p in (data / "0_real").iterdir()))
    return np.array([p.is_fake for p in preds])


# -- statistics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b,x", [(1.0, 5.0, 0.3), (1.0, 300.0, 0.01), (4.0, 1.0, 0.7), (2.0, 2.0, 0.5)])
def test_betainc_closed_forms(a, b, x):
    expected = 1 - (1 - x) ** b if a == 1 else x**a if b == 1 else 0.5
    assert betainc(a, b, x) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert betainc(a, b, x) + betainc(b, a, 1 - x) == pytest.approx(1.0, abs=1e-13)


def test_betainc_and_clopper_pearson_reference_values():
    """Values from scipy 1.17 (scipy.special.betainc, scipy.stats.beta.ppf), hard-coded: runs without scipy."""
    assert betainc(2.5, 7.0, 0.3) == pytest.approx(0.6412224629717214, rel=1e-11)
    assert betainc(300.0, 20.0, 0.93) == pytest.approx(0.2737988038953778, rel=1e-10)
    assert betainc(0.5, 0.5, 0.2) == pytest.approx(0.2951672353008665, rel=1e-11)
    reference = {
        (3, 300): (0.0020670072350923163, 0.028944511255692605),
        (0, 299): (0.0, 0.012261595907535044),
        (50, 1000): (0.03733539760466178, 0.06539048791549364),
        (1, 10): (0.0025285785444617848, 0.4450161170281954),
        (10, 10): (0.6915028921812392, 1.0),
        (7, 5000): (0.0005630520242895752, 0.00288239435280333),
    }
    for (k, n), (low, high) in reference.items():
        got = clopper_pearson(k, n)
        assert got[0] == pytest.approx(low, rel=1e-9, abs=1e-15), (k, n)
        assert got[1] == pytest.approx(high, rel=1e-9), (k, n)
    n = 299  # closed forms at the ends: 0 of n -> 1 - 0.025^(1/n); n of n -> 0.025^(1/n)
    assert clopper_pearson(0, n)[1] == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-12)
    assert clopper_pearson(n, n)[0] == pytest.approx(0.025 ** (1 / n), rel=1e-12)


def test_beta_quantile_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(40):
        a, b, q = rng.uniform(0.3, 400), rng.uniform(0.3, 400), rng.uniform(0.001, 0.999)
        assert beta_quantile(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), rel=1e-8, abs=1e-14)


def test_min_reals_is_the_rule_of_three():
    assert (min_reals(0.01), min_reals(0.05), min_reals(0.001)) == (299, 59, 2995)
    for target in (0.2, 0.05, 0.01, 0.003):
        n = min_reals(target)
        assert 1 - 0.05 ** (1 / n) <= target < 1 - 0.05 ** (1 / (n - 1))


# -- the threshold rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores,target",
    [
        ([0.9, 0.8, 0.8, 0.8, 0.1] * 20, 0.05),  # ties straddle the cut: all of them stay real
        (list(np.linspace(0, 0.99, 100)), 0.01),
        ([0.3] * 60, 0.05),  # all tied
        (list(np.random.default_rng(3).random(1000).astype(np.float32)), 0.01),
    ],
)
def test_threshold_is_the_lowest_within_the_target(scores, target):
    p = np.asarray(scores, np.float32).astype(np.float64)  # Detector: float(float32 probability)
    t = fpr_threshold(p, target)
    allowed = math.floor(target * len(p) + 1e-9)
    assert (p >= t).sum() <= allowed  # the Detector's rule: fake when p >= threshold
    below = np.nextafter(t, -np.inf)
    assert (p >= below).sum() > allowed  # one float lower would exceed the target: the lowest such t


def test_saturated_reals_are_refused():
    with pytest.raises(CalibrationError, match="score 1.0"):
        fpr_threshold([1.0] * 5 + [0.2] * 95, 0.01)


def test_files_digest_encoding_is_order_free_and_content_bound():
    from i2p.evaluation.calibrate import Scored

    a, b = Scored("real", "x/a.png", "0" * 64, 0.1), Scored("real", "b.png", "1" * 64, 0.2)
    assert files_digest([a, b]) == files_digest([b, a])
    assert files_digest([a, b]) != files_digest([a, Scored("real", "b.png", "2" * 64, 0.2)])
    assert files_digest([a]) != files_digest([Scored("fake", "x/a.png", "0" * 64, 0.1)])


# -- calibrating an artifact --------------------------------------------------------------------------


def test_point_holds_the_target_on_its_reals_and_keeps_other_points(calibrated, data):
    before, after = read_manifest(V1), read_manifest(calibrated)
    point = after.operating_points["uploads"]
    assert {k: v for k, v in after.operating_points.items() if k != "uploads"} == before.operating_points
    assert (after.threshold, after.operating_point) == (before.threshold, before.operating_point)
    assert point.rule == "fpr_on_reals" and point.target_fpr == 0.05 and point.n_real == 80
    assert point.n_fake == 20 and point.val_tpr is not None
    low, high = point.fpr_ci95
    assert low <= point.val_fpr <= high and point.val_fpr <= 0.05
    fake = _p_real(calibrated, data, operating_point="uploads")
    assert fake.mean() == point.val_fpr <= 0.05
    assert _p_real(calibrated, data, threshold=np.nextafter(point.threshold, 0)).mean() > 0.05
    with Detector(calibrated, precision="fp32") as det:  # scored by the FP32 file the Detector picks
        assert point.model_sha256 == sha256_file(det.backend.model_path)


def test_cli_reports_the_interval_and_makes_the_default(artifact, data):
    reals, fakes = str(data / "0_real"), str(data / "1_fake")
    args = ["calibrate", str(artifact), "--reals", reals, "--fakes", fakes, "--target-fpr", "0.05"]
    result = CliRunner().invoke(main, [*args, "--name", "web", "--default", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["default"] and len(out["point"]["fpr_ci95"]) == 2 and out["point"]["n_real"] == 80
    manifest = read_manifest(artifact)
    assert manifest.operating_point == "web" and manifest.threshold == out["point"]["threshold"]
    text = CliRunner().invoke(main, [*args, "--name", "web2"])
    assert text.exit_code == 0 and "95% Clopper-Pearson interval [" in text.output
    again = CliRunner().invoke(main, [*args, "--name", "web"])
    assert again.exit_code == 1 and "already has an operating point 'web'" in again.output
    assert CliRunner().invoke(main, [*args, "--name", "web", "--replace"]).exit_code == 0


@pytest.mark.parametrize("n,target,needed", [(30, 0.05, 59), (80, 0.01, 299), (58, 0.05, 59), (0, 0.2, 14)])
def test_too_few_reals_are_refused_and_nothing_is_written(artifact, tmp_path, n, target, needed):
    _images(tmp_path / "few", n, seed=5, brightness=0.5)
    before = (artifact / MANIFEST).read_bytes()
    with pytest.raises(
        CalibrationError, match=f"too few for a {target:g} FPR target: it needs at least {needed}"
    ):
        calibrate(artifact, tmp_path / "few", target, "few")
    result = CliRunner().invoke(
        main, ["calibrate", str(artifact), "--reals", str(tmp_path / "few"), "--target-fpr", str(target),
               "--name", "few"],
    )  # fmt: skip
    assert result.exit_code == 1 and f"needs at least {needed}" in result.output
    assert (artifact / MANIFEST).read_bytes() == before


def test_unreadable_files_do_not_count_towards_the_reals_needed(artifact, tmp_path):
    """59 files pass the count before scoring; 2 of them do not decode, and 57 reals are too few for 5%."""
    _images(tmp_path / "reals", 57, seed=6, brightness=0.5)
    (tmp_path / "reals" / "a_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "reals" / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(
        CalibrationError, match=r"57 usable real images \(2 more could not be read\) are too few"
    ):
        calibrate(artifact, tmp_path / "reals", 0.05, "x")


@pytest.mark.parametrize("target", ["0", "1", "-0.1", "nan", "inf", "1.5"])
def test_bad_targets_and_names_are_usage_errors(artifact, data, target):
    """Out-of-range options exit 2 in every command (the README's table), before any image is read;
    the library function refuses the same values for API users."""
    args = ["calibrate", str(artifact), "--reals", str(data / "0_real")]
    result = CliRunner().invoke(main, [*args, "--target-fpr", target, "--name", "x"])
    assert result.exit_code == 2 and "is not a fraction in (0, 1)" in result.output
    bad = CliRunner().invoke(main, [*args, "--target-fpr", "0.05", "--name", "a b/../c"])
    assert bad.exit_code == 2 and "is not an operating point name" in bad.output
    with pytest.raises(CalibrationError, match=r"--target-fpr must be a fraction in \(0, 1\)"):
        calibrate(artifact, data / "0_real", float(target), "x")


def test_unreadable_reals_are_reported_and_left_out(artifact, data, tmp_path):
    reals = Path(shutil.copytree(data / "0_real", tmp_path / "reals"))
    (reals / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (reals / "empty.png").write_bytes(b"")
    os.mkfifo(reals / "fifo.jpg")  # never opened for a blocking read
    (reals / "sub").mkdir()
    (reals / "sub" / "text.webp").write_text("hello")
    result = CliRunner().invoke(
        main,
        ["calibrate", str(artifact), "--reals", str(reals), "--target-fpr", "0.05", "--name", "x", "--json"],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["point"]["n_real"] == 80 and len(out["excluded"]) == 4
    for name in ("broken.jpg", "empty.png", "fifo.jpg", "text.webp"):
        assert f"excluded {reals}" in result.stderr and name in result.stderr
    assert "4 file(s) could not be scored and were left out" in result.stderr


def test_a_planted_manifest_link_is_refused_not_followed(artifact, data, tmp_path):
    target = tmp_path / "elsewhere.json"
    shutil.move(artifact / MANIFEST, target)
    os.symlink(target, artifact / MANIFEST)
    before = target.read_bytes()
    with pytest.raises(ArtifactError, match="symlink"):
        calibrate(artifact, data / "0_real", 0.05, "x")
    assert target.read_bytes() == before


# -- loading the calibrated artifact ------------------------------------------------------------------


def _edit(art: Path, change) -> None:
    d = json.loads((art / MANIFEST).read_text())
    change(d)
    (art / MANIFEST).write_text(json.dumps(d, indent=2))


def _set(d, point, key, value):
    d["operating_points"][point][key] = value


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: _set(d, "uploads", "threshold", 0.5), "edited after it was calibrated"),
        (lambda d: _set(d, "uploads", "threshold", d["operating_points"]["uploads"]["threshold"] * (1 + 1e-12)),
         "edited after it was calibrated"),
        (lambda d: _set(d, "uploads", "val_fpr", 0.0), "edited after it was calibrated"),
        (lambda d: _set(d, "uploads", "n_real", 10_000), "edited after it was calibrated"),
        (lambda d: _set(d, "uploads", "rule", "max_tpr_at_fpr"), "edited after it was calibrated"),
        (lambda d: d["operating_points"]["uploads"].pop("digest"), "must carry its 'digest'"),
        (lambda d: d["operating_points"].__setitem__("renamed", d["operating_points"].pop("uploads")),
         "edited after it was calibrated"),
        (lambda d: _set(d, "uploads", "digest", "0" * 64), "edited after it was calibrated"),
        (lambda d: _set(d, "uploads", "fpr_ci95", [0.2, 0.1]), "is above high"),
        (lambda d: _set(d, "uploads", "files_sha256", "abc"), "lowercase hex sha256"),
    ],
)  # fmt: skip
def test_a_tampered_point_is_refused_at_load(calibrated, tmp_path, change, message):
    art = Path(shutil.copytree(calibrated, tmp_path / "t.i2p"))
    _edit(art, change)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(art)
    with pytest.raises(ArtifactError, match=message):
        Detector(art)


def test_the_default_point_and_threshold_edited_together_are_refused(artifact, data):
    calibrate(artifact, data / "0_real", 0.05, "web", make_default=True)

    def both(d):
        d["threshold"] = 0.5
        _set(d, "web", "threshold", 0.5)

    _edit(artifact, both)
    with pytest.raises(ArtifactError, match="edited after it was calibrated"):
        read_manifest(artifact)


def test_i2p_detect_uses_the_point(calibrated, data):
    reals = str(data / "0_real")
    args = [reals, "--model", str(calibrated), "--precision", "fp32", "--json"]
    result = CliRunner().invoke(detect, [*args, "--operating-point", "uploads"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    summary = json.loads(next(line for line in result.stderr.splitlines() if line.startswith("{")))
    point = read_manifest(calibrated).operating_points["uploads"]
    assert summary["threshold"] == point.threshold and summary["fake"] / summary["files"] == point.val_fpr
    assert all((r["label"] == "fake") == (r["probability"] >= point.threshold) for r in rows)
    unknown = CliRunner().invoke(detect, [*args, "--operating-point", "nope"])
    assert (
        unknown.exit_code == 1
        and "no operating point 'nope'" in unknown.output
        and "uploads" in unknown.output
    )
    both = CliRunner().invoke(detect, [*args, "--operating-point", "uploads", "--threshold", "0.5"])
    assert both.exit_code == 2 and "not both" in both.output


def test_i2p_eval_shows_what_the_point_does(calibrated, data):
    args = ["--model", str(calibrated), "--data", str(data), "--precision", "fp32", "--json"]
    result = CliRunner().invoke(evaluate, [*args, "--operating-point", "uploads"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    point = read_manifest(calibrated).operating_points["uploads"]
    assert out["threshold"] == point.threshold
    (metrics,) = out["metrics"].values() if len(out["metrics"]) == 1 else [out["metrics"]["mean"]]
    assert metrics["acc_real"] == pytest.approx(1 - point.val_fpr) and metrics["acc_fake"] == pytest.approx(
        point.val_tpr
    )


def test_old_artifacts_still_load_and_keep_their_json(tmp_path):
    for version in ("v0", "v1"):
        art = FIXTURES / version / "artifact"
        manifest = read_manifest(art)
        with Detector(art) as det:
            assert det.threshold == manifest.threshold
        written = json.loads(manifest.to_json())
        for point in written.get("operating_points", {}).values():  # no calibration keys added as nulls
            assert not {"fpr_ci95", "files_sha256", "model_sha256", "digest"} & set(point)


@pytest.mark.slow  # starts a real tritonserver
def test_triton_ensemble_serves_every_point(calibrated, data, tmp_path):
    """The ensemble labels by the default point, or by the point a request's ``operating_point`` names."""
    from tests.support.triton_server import TritonServer, missing_reason

    if missing_reason() is not None:
        pytest.skip(str(missing_reason()))
    import tritonclient.grpc as tc

    from i2p.export.triton import TritonOptions, write_repository

    manifest = read_manifest(calibrated)
    write_repository(tmp_path / "repo", calibrated, manifest, TritonOptions(backend="python"), force=False)
    config = (tmp_path / "repo" / "i2p" / "config.pbtxt").read_text()
    assert "operating_points" in config and "uploads" in config
    with Detector(calibrated, precision="fp32") as det:  # the reals nearest the point, within one batch
        reals = sorted((data / "0_real").iterdir(), key=lambda f: -det.predict(str(f))[0].probability)
    files = reals[:24] + sorted((data / "1_fake").iterdir())[:8]
    blobs = np.array([f.read_bytes() for f in files], dtype=np.object_).reshape(-1, 1)
    with TritonServer(tmp_path / "repo", tmp_path / "server") as server:
        client = tc.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))

        def ask(**parameters):
            tensor = tc.InferInput("image", list(blobs.shape), "BYTES")
            tensor.set_data_from_numpy(blobs)
            result = client.infer("i2p", [tensor], parameters=parameters or None)
            labels = [v.decode() for v in result.as_numpy("label").reshape(-1)]
            return result.as_numpy("probability").reshape(-1).astype(np.float64), labels

        p, default = ask()
        _, point = ask(operating_point="uploads")
        with pytest.raises(tc.InferenceServerException, match="no operating point 'nope'.*uploads"):
            ask(operating_point="nope")
    t_default, t_point = manifest.threshold, manifest.operating_points["uploads"].threshold
    assert default == ["fake" if x >= t_default else "real" for x in p]
    assert point == ["fake" if x >= t_point else "real" for x in p] and point != default
    with Detector(calibrated, precision="fp32", operating_point="uploads") as det:
        local = det.predict([str(f) for f in files])
    assert np.abs(p - [r.probability for r in local]).max() <= 1e-6


NO_TORCH = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip") or name.startswith(("i2p.train", "i2p.export")):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Block())
from i2p.cli import main
try:
    main(["calibrate", sys.argv[1], "--reals", sys.argv[2], "--target-fpr", "0.05", "--name", "lean"])
except SystemExit as e:
    assert e.code == 0, e.code
"""


def test_calibrate_runs_without_torch(artifact, data):
    """The lean install: `i2p calibrate` imports neither torch nor the training or export layers."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(artifact), str(data / "0_real")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lean" in read_manifest(artifact).operating_points


def test_ood_threshold_is_taken_on_the_same_reals(tmp_path, data):
    """--ood: the artifact's one OOD threshold becomes its quantile of these reals' OOD scores, as the
    deployed network computes them; the points are calibrated as without it."""
    from tests.support.fake_artifact import make_artifact

    art = make_artifact(tmp_path / "ood.i2p", threshold=0.5, ood_threshold=1e-9)  # flags every image
    reals = sorted(str(p) for p in (data / "0_real").iterdir())
    scores = np.array([p.ood for p in Detector(art).predict(reals)])
    args = ["calibrate", str(art), "--reals", str(data / "0_real"), "--target-fpr", "0.05", "--json"]
    result = CliRunner().invoke(main, [*args, "--name", "web", "--ood"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    spec = read_manifest(art).ood
    assert spec.threshold == pytest.approx(float(np.quantile(scores, spec.quantile)), rel=1e-6)
    assert spec.n_val == len(reals) and body["ood"]["threshold"] == spec.threshold
    assert body["ood_flagged_before"] == 1.0  # the old threshold flagged all of them
    flagged = np.mean([p.uncertain for p in Detector(art).predict(reals)])
    assert 0 < flagged <= 1 - spec.quantile + 1 / len(reals)
    again = CliRunner().invoke(main, [*args, "--name", "web2"])  # without --ood: the threshold stays
    assert again.exit_code == 0 and read_manifest(art).ood == spec


def test_ood_on_an_artifact_without_the_ood_output_is_refused(artifact, data):
    args = ["calibrate", str(artifact), "--reals", str(data / "0_real"), "--target-fpr", "0.05"]
    result = CliRunner().invoke(main, [*args, "--name", "web", "--ood"])
    assert result.exit_code == 1 and "no OOD output to calibrate" in result.output
    assert "web" not in read_manifest(artifact).operating_points  # refused before anything is written
