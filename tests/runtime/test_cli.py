"""i2p-detect and i2p-bench: outputs, discovery, streaming, exit codes."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from i2p.base.files import sha256_file
from i2p.cli import main as i2p_main
from i2p.runtime import Detector
from i2p.runtime import sources as sources_module
from i2p.runtime.bench_cli import bench
from i2p.runtime.detect_cli import detect
from i2p.runtime.sources import iter_images
from tests.support.corpus import base_image, encode
from tests.support.fake_artifact import make_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact") / "fake.i2p")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """top/{a.png, b.jpg, notes.txt, broken.png, sub/{c.png, deeper/d.webp}}."""
    root = tmp_path_factory.mktemp("tree")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.png").write_bytes(encode(base_image(40, 30, seed=1), "PNG"))
    (root / "b.jpg").write_bytes(encode(base_image(50, 64, seed=2), "JPEG"))
    (root / "notes.txt").write_text("not an image, not scored")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "sub" / "c.png").write_bytes(encode(base_image(33, 70, seed=3), "PNG"))
    (root / "sub" / "deeper" / "d.webp").write_bytes(
        encode(base_image(64, 64, seed=4), "WEBP", lossless=True)
    )
    return root


def run(cmd, args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def names(paths) -> list[str]:
    return sorted(Path(p).name for p in paths)


def test_discovery_filters_extensions_and_recurses_on_request(tree: Path) -> None:
    assert names(iter_images([tree])) == ["a.png", "b.jpg", "broken.png"]
    assert names(iter_images([tree], recursive=True)) == ["a.png", "b.jpg", "broken.png", "c.png", "d.webp"]
    # A file named explicitly is always scored, whatever its extension.
    assert names(iter_images([tree / "notes.txt", tree / "sub"])) == ["c.png", "notes.txt"]


def test_discovery_streams(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first file arrives after one directory read, not after walking the tree."""
    opened: list[str] = []
    real_scandir = os.scandir
    monkeypatch.setattr(sources_module.os, "scandir", lambda p: opened.append(p) or real_scandir(p))
    it = iter_images([tree], recursive=True)
    next(it)
    assert opened == [str(tree)]
    list(it)
    assert len(opened) == 3


def test_symlink_loops_are_not_followed(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(encode(base_image(), "PNG"))
    os.symlink(tmp_path, tmp_path / "loop")
    assert names(iter_images([tmp_path], recursive=True)) == ["x.png"]


def test_predict_stream_keeps_order_and_bounds_work_in_flight(artifact: Path, tree: Path) -> None:
    det = Detector(artifact, batch_size=2)
    paths = [str(p) for p in sorted(tree.rglob("*.*"))] * 5
    pulled = 0

    def sources():
        nonlocal pulled
        for p in paths:
            pulled += 1
            yield p

    stream = det.predict_stream(sources(), workers=3)
    first = next(stream)
    assert pulled <= 2 * det.batch_size + 3 + det.batch_size  # read-ahead is bounded, not the whole list
    results = [first, *stream]
    assert results == det.predict(paths)


def test_detect_writes_csv_jsonl_and_stdout(artifact: Path, tree: Path, tmp_path: Path) -> None:
    base = [tree, "--model", artifact, "--recursive", "--workers", "2", "--batch-size", "2"]
    code, out, err = run(detect, [*base, "--csv", tmp_path / "rows.csv"])
    assert code == 0
    with open(tmp_path / "rows.csv", newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["a.png", "b.jpg", "broken.png", "c.png", "d.webp"]
    assert "broken.png" in rows["broken.png"]["error"] and rows["broken.png"]["probability"] == ""
    expected = {Path(p.source).name: p for p in Detector(artifact).predict(sorted(tree.rglob("*.*")))}
    for name, row in rows.items():
        if expected[name].ok:
            assert (
                float(row["probability"]) == expected[name].probability
                and row["label"] == expected[name].label
            )
    assert "files" in out and "errors" in out  # the summary table on stdout: rows went to the file
    assert "onnxruntime[CPUExecutionProvider], precision fp32" in err

    code, out, _ = run(detect, [*base, "--jsonl", tmp_path / "rows.jsonl", "--json"])
    lines = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {Path(r["path"]).name: r["probability"] for r in lines} == {
        n: (float(r["probability"]) if r["probability"] else None) for n, r in rows.items()
    }
    summary = json.loads(out)
    assert (summary["files"], summary["errors"], summary["fake"] + summary["real"]) == (5, 1, 4)
    assert summary["images_per_s"] > 0 and summary["backend"] == "onnxruntime[CPUExecutionProvider]"

    code, out, err = run(detect, [*base, "--json"])  # rows to stdout as JSON lines, summary to stderr
    assert sorted(Path(json.loads(line)["path"]).name for line in out.splitlines()) == sorted(rows)
    assert '"files": 5' in err

    code, out, _ = run(detect, base)  # the default: a table
    header, rule, *table = out.splitlines()
    assert header.split() == ["path", "probability", "label", "error"] and len(table) == 5


def test_threshold_option_overrides_the_artifact(artifact: Path, tree: Path) -> None:
    _, out, _ = run(
        detect, [tree / "a.png", tree / "b.jpg", "--model", artifact, "--threshold", "0", "--json"]
    )
    assert [json.loads(line)["label"] for line in out.splitlines()] == ["fake", "fake"]


def test_the_i2p_group_runs_detect(artifact: Path, tree: Path) -> None:
    code, out, _ = run(i2p_main, ["detect", tree / "a.png", "--model", artifact, "--json"])
    assert code == 0 and json.loads(out)["path"] == str(tree / "a.png")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tree}"], "Missing option '--model'"),
        (["{tree}/nope.jpg", "--model", "{artifact}"], "does not exist"),
        (["--model", "{artifact}"], "Missing argument 'PATHS...'"),
        (["{tree}", "--model", "{artifact}", "--csv", "a.csv", "--jsonl", "a.jsonl"], "exclusive"),
        (["{tree}", "--model", "{artifact}", "--batch-size", "0"], "0 is not in the range x>=1"),
        (["{tree}", "--model", "{artifact}", "--backend", "cuda"], "'cuda' is not one of"),
        (
            ["{tree}", "--model", "{artifact}", "--backend", "tensorrt", "--precision", "fp32"],
            "runs FP16 engines",
        ),
    ],
)
def test_detect_misuse_exits_nonzero_with_a_message(artifact: Path, tree: Path, args, message) -> None:
    code, out, err = run(detect, [a.format(tree=tree, artifact=artifact) for a in args])
    assert code == 2 and message in err


def test_a_folder_that_is_not_an_artifact_is_a_bad_input_file(tree: Path) -> None:
    code, _, err = run(detect, [tree, "--model", tree])
    assert code == 1 and "--model: " in err and "no manifest.json here" in err


def test_detect_refuses_a_tampered_model(tmp_path: Path, tree: Path) -> None:
    art = make_artifact(tmp_path / "t.i2p")
    data = bytearray((art / "model.onnx").read_bytes())
    data[-10] ^= 1
    (art / "model.onnx").write_bytes(bytes(data))
    code, _, err = run(detect, [tree, "--model", art])
    assert code == 1 and "does not match the manifest" in err  # a bad input file: exit 1


def test_detect_model_the_backend_cannot_load(tmp_path: Path, tree: Path) -> None:
    """A file that passes its sha256 check (re-hashed by hand) but is not ONNX: a message, no traceback."""
    art = make_artifact(tmp_path / "t.i2p")
    (art / "model.onnx").write_bytes(b"not onnx")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(art / "model.onnx")
    (art / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(detect, [tree, "--model", art, "--precision", "fp32"])
    # refused at load with the artifact's other checks (model_check reads it first): exit 1, like a bad hash
    assert code == 1 and "model.onnx: ONNX Runtime cannot load this model" in err


def test_detect_unwritable_output_is_a_clear_error(artifact: Path, tree: Path, tmp_path: Path) -> None:
    code, _, err = run(detect, [tree, "--model", artifact, "--csv", tmp_path / "no" / "dir" / "rows.csv"])
    assert code == 1 and "rows.csv" in err and "No such file or directory" in err


def test_bench_reports_percentiles_and_throughput(artifact: Path) -> None:
    code, out, _ = run(
        bench, ["--model", artifact, "--batch-sizes", "1,4", "--iters", "20", "--warmup", "2", "--json"]
    )
    assert code == 0
    report = json.loads(out)
    assert report["backend"] == "onnxruntime[CPUExecutionProvider]" and report["precision"] == "fp32"
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    for r in report["results"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["mean_ms"] * 1e3)

    code, out, _ = run(
        bench, ["--model", artifact, "--batch-sizes", "2", "--iters", "3", "--precision", "fp16"]
    )
    assert code == 0 and "precision fp16" in out.splitlines()[0]
    assert out.splitlines()[1].split() == [
        "batch_size",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "mean_ms",
        "images_per_s",
    ]


@pytest.mark.parametrize("sizes", ["", "a,b", "0,4", "-1"])
def test_bench_rejects_bad_batch_sizes(artifact: Path, sizes: str) -> None:
    code, _, err = run(bench, ["--model", artifact, "--batch-sizes", sizes])
    assert code == 2 and "positive integers separated by commas" in err


def test_detect_progress_has_a_total_and_an_eta(tmp_path, monkeypatch):
    """The bar's total comes from a second walk of the inputs, so a terminal shows done/total and an ETA."""
    from click.testing import CliRunner

    from i2p.base.progress import Progress
    from i2p.cli import main
    from tests.support.fake_artifact import make_artifact
    from tests.support.images import make_image_folder

    make_image_folder(tmp_path / "imgs", n_per_class=3, size=(40, 32))
    artifact = make_artifact(tmp_path / "m.i2p", size=32)
    monkeypatch.setattr(Progress, "_isatty", lambda self: True)
    monkeypatch.setattr("i2p.base.progress._REDRAW_SECONDS", 0.0)
    res = CliRunner().invoke(
        main, ["detect", str(tmp_path / "imgs"), "-r", "--model", str(artifact), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert "detect: 12/12 img (100%)" in res.stderr and "ETA" in res.stderr
    assert len(res.stdout.splitlines()) == 12  # the rows alone on stdout
