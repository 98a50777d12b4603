"""Output safety of i2p-detect: spreadsheet formulas neutralized, file names that cannot forge rows or
break UTF-8, full disks as messages, results never lost (OUT.partial, --resume, Ctrl-C), sane options,
and a hint when nothing was found."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from i2p.runtime import Detector
from i2p.runtime.bench_cli import bench
from i2p.runtime.cells import FORMULA_STARTS, csv_cell, display, path_cell, read_path
from i2p.runtime.detect_cli import detect
from i2p.runtime.outputs import DoneSet
from tests.support.corpus import base_image, encode
from tests.support.fake_artifact import make_artifact

REPO = Path(__file__).resolve().parents[2]
DETECT = [sys.executable, "-c", "from i2p.runtime.detect_cli import detect; detect()"]  # a real process


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact") / "a.i2p")


def png(path: Path, seed: int = 0) -> Path:
    path.write_bytes(encode(base_image(40, 30, seed=seed), "PNG"))
    return path


def run(args: list[object]) -> tuple[int, str, str]:
    result = CliRunner().invoke(detect, [os.fsdecode(a) if isinstance(a, Path) else str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:  # strict UTF-8: a bad byte fails the test
        return list(csv.DictReader(f))


# -- text -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb.png", "a\\nb.png"),
        ("x\r\n0.9,fake.png", "x\\r\\n0.9,fake.png"),
        ("\x1b[31mred.png", "\\x1b[31mred.png"),
        ("line\u2028sep.png", "line\\u2028sep.png"),
        (os.fsdecode(b"caf\xe9.png"), "caf\\xe9.png"),
        ("\ud800.png", "\\ud800.png"),
        ("ok é.png", "ok é.png"),
    ],
)
def test_display_is_one_line_of_utf8(raw: str, shown: str) -> None:
    assert display(raw) == shown
    display(raw).encode("utf-8")


@pytest.mark.parametrize("start", FORMULA_STARTS)
def test_formula_cells_are_neutralized(start: str) -> None:
    assert csv_cell(f"{start}1+1") == f"'{start}1+1" and csv_cell("a=1") == "a=1" and csv_cell(0.5) == 0.5


def test_done_set_is_exact_on_what_it_holds() -> None:
    done = DoneSet(f"dir/{i}.png" for i in range(10_000))
    assert len(done) == 10_000 and "dir/9999.png" in done and "dir/10000.png" not in done
    assert "x" not in DoneSet()


# -- through i2p-detect -------------------------------------------------------------------------------


HOSTILE = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM(1).png", "\tx.png", "a\nb.png", "x\r\n0.9,fake.png"]


def test_hostile_names_in_csv_jsonl_and_table(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative names (so cells start with the name): every cell is inert in a spreadsheet, one row per
    file in every format, and a broken file's error cell (which starts with its name) too."""
    monkeypatch.chdir(tmp_path)
    names = [*HOSTILE, os.fsdecode(b"caf\xe9.png")]
    for i, name in enumerate(names):
        png(tmp_path / name, seed=i)
    Path("=broken.png").write_bytes(b"not a png")
    names.append("=broken.png")
    code, _, err = run(["--model", artifact, "--csv", "rows.csv", "--", *names])
    assert code == 0, err
    rows = csv_rows(tmp_path / "rows.csv")
    assert len(rows) == len(names)
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(FORMULA_STARTS), row
    assert rows[-1]["path"] == "%3Dbroken.png" and rows[-1]["error"].startswith("'=broken.png")
    assert [r["path"] for r in rows[:4]] == ["%3DHYPERLINK(1).png", "%2B1.png", "%2D2.png", "%40SUM(1).png"]
    assert rows[7]["path"] == "caf%E9.png" and rows[7]["probability"]  # a non-UTF-8 name still scores
    assert [read_path(r["path"]) for r in rows] == names  # the exact names read back

    code, _, _ = run(["--model", artifact, "--jsonl", "rows.jsonl", "--", *names])
    lines = (tmp_path / "rows.jsonl").read_bytes().decode("utf-8").splitlines()
    assert [json.loads(line)["path"] for line in lines] == [path_cell(n) for n in names]

    code, out, _ = run(["--model", artifact, "--", *names])
    header, rule, *table = out.splitlines()
    assert len(table) == len(names) and table[5].startswith("a\\nb.png ")


def test_a_full_disk_is_a_message(artifact: Path, tmp_path: Path) -> None:
    image = png(tmp_path / "x.png")
    for option in ("--csv", "--jsonl"):
        code, _, err = run([image, "--model", artifact, option, "/dev/full"])
        assert code == 1 and "/dev/full: cannot write (No space left on device)" in err
        assert "Traceback" not in err
    with open("/dev/full", "w") as full:  # stdout on a full disk: a real process, a real descriptor
        proc = subprocess.run(
            [*DETECT, str(image), "--model", str(artifact), "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    assert proc.returncode == 1 and "standard output: cannot write (No space left on device)" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    rows = tmp_path / "rows.csv"  # rows to a file, the summary to a full stdout; and i2p-bench's report
    bench_cmd = [sys.executable, "-c", "from i2p.runtime.bench_cli import bench; bench()"]
    for cmd in (
        [*DETECT, str(image), "--model", str(artifact), "--csv", str(rows)],
        [*bench_cmd, "--model", str(artifact), "--batch-sizes", "1", "--iters", "2"],
    ):
        with open("/dev/full", "w") as full:
            proc = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 1 and "standard output: cannot write" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    real = Detector.predict_stream

    def stream(detector, sources, workers=None):
        for i, p in enumerate(real(detector, sources, workers)):
            if i == n:
                raise KeyboardInterrupt
            yield p

    monkeypatch.setattr(Detector, "predict_stream", stream)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_an_interrupted_run_keeps_the_old_output_and_resumes(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        png(folder / f"{i}.png", seed=i)
    out = tmp_path / f"rows.{fmt}"
    out.write_text("the previous results\n")
    _interrupt_after(monkeypatch, 3)
    code, _, err = run([folder, "--model", artifact, f"--{fmt}", out, "--batch-size", "1", "--json"])
    assert code == 130 and "interrupted after 3 files" in err and "--resume" in err
    assert out.read_text() == "the previous results\n"  # untouched until a run completes
    partial = Path(f"{out}.partial")
    assert partial.is_file() and '"complete": false' in err
    with partial.open("a") as f:  # and a torn last row, as a kill -9 mid-write leaves
        f.write("/half/a/row" if fmt == "csv" else '{"path": "/half')
    monkeypatch.undo()
    code, stdout, err = run([folder, "--model", artifact, f"--{fmt}", out, "--resume", "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert (summary["skipped"], summary["files"], summary["complete"]) == (3, 4, True)
    if fmt == "csv":
        paths = [r["path"] for r in csv_rows(out)]
    else:
        paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert sorted(paths) == sorted(str(folder / f"{i}.png") for i in range(7))  # each exactly once
    assert not partial.exists()
    code, stdout, _ = run([folder, "--model", artifact, f"--{fmt}", out, "--resume", "--json"])
    again = json.loads(stdout)
    assert (again["skipped"], again["files"]) == (7, 0)  # a complete run: nothing left to do

    partial.write_text("left by some interrupted run\n")
    code, stdout, err = run(
        [folder, "--model", artifact, f"--{fmt}", out, "--json"]
    )  # no --resume: start over
    assert code == 0 and "starting over" in err and json.loads(stdout)["files"] == 7 and not partial.exists()


FILES = 20_000


@pytest.mark.timeout(120)
def test_a_real_sigint_leaves_whole_rows_marked_partial(artifact: Path, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    seeds = [png(tmp_path / f"seed{i}.png", seed=i) for i in range(7)]
    for i in range(FILES):  # hard links: a run long enough to interrupt, without writing 20,000 images
        os.link(seeds[i % 7], folder / f"{i:05}.png")
    out = tmp_path / "rows.csv"
    args = [str(folder), "--model", str(artifact), "--csv", str(out), "--batch-size", "1", "--workers", "1"]

    # A shell's background job inherits SIGINT ignored (so would this child): give it the default back.
    def restore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([*DETECT, *args], stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=restore)
    partial = Path(f"{out}.partial")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not partial.exists() or partial.read_text().count("\n") < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err
    rows = csv_rows(partial)
    assert 4 <= len(rows) < FILES and all(r["probability"] and r["label"] for r in rows)
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "1.5", "NaN"])
def test_threshold_must_be_a_probability(artifact: Path, tmp_path: Path, value: str) -> None:
    code, _, err = run([png(tmp_path / "x.png"), "--model", artifact, "--threshold", value])
    assert code == 2 and "is not a probability in [0, 1]" in err


def test_resume_needs_a_file(artifact: Path, tmp_path: Path) -> None:
    code, _, err = run([png(tmp_path / "x.png"), "--model", artifact, "--resume"])
    assert code == 2 and "--resume continues a --csv or --jsonl file" in err


@pytest.mark.parametrize("sizes", ["100000", "1,2048", "8,1025"])
def test_bench_batch_sizes_are_bounded(artifact: Path, sizes: str) -> None:
    result = CliRunner().invoke(bench, ["--model", str(artifact), "--batch-sizes", sizes])
    assert result.exit_code == 2 and "batch sizes go up to 1024" in result.stderr


def test_bench_batch_bytes_are_bounded(tmp_path: Path) -> None:
    big = make_artifact(tmp_path / "big.i2p", size=1024, fp16=False)  # 12 MB per image
    result = CliRunner().invoke(bench, ["--model", str(big), "--batch-sizes", "1,100"])
    assert result.exit_code == 2 and "at 1024x1024, batch sizes go up to 85" in result.stderr


def test_nothing_found_says_what_is_there(artifact: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run([empty, "--model", artifact])
    assert code == 1 and f"{empty}: no image files directly in it; found nothing" in err

    dataset = tmp_path / "dataset"
    for sub in ("glide/0_real", "glide/1_fake", "dalle/0_real"):
        (dataset / sub).mkdir(parents=True)
        png(dataset / sub / "a.png")
    (dataset / "README.txt").write_text("about")
    code, _, err = run([dataset, "--model", artifact])
    assert code == 1 and "1 other file(s), 2 subdirectories (dalle, glide)" in err and "--recursive" in err
    code, out, _ = run([dataset, "--model", artifact, "--recursive", "--json"])
    assert code == 0 and len(out.splitlines()) == 3


def test_a_checkpoint_given_as_model_is_named(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(b"\x02\0\0\0\0\0\0\0{}")
    code, _, err = run([png(tmp_path / "x.png"), "--model", ckpt])
    assert code == 1 and "training checkpoint" in err and "i2p-export --ckpt" in err  # as in i2p eval


def test_resume_refuses_a_file_that_is_not_its_output(artifact: Path, tmp_path: Path) -> None:
    image = png(tmp_path / "x.png")
    for name, option, text in (
        ("notes.csv", "--csv", "name,age\nbob,3\n"),
        ("rows.csv", "--csv", '{"path": "a.png"}\n'),
        ("rows.jsonl", "--jsonl", "path,probability,label,error\n"),
    ):
        Path(f"{tmp_path / name}.partial").write_text(text)
        code, _, err = run([image, "--model", artifact, option, tmp_path / name, "--resume"])
        assert code == 1 and "not an i2p-detect" in err and "--resume appends only" in err
        assert Path(f"{tmp_path / name}.partial").read_text() == text  # left as it was
