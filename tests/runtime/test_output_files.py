"""The --csv/--jsonl file as a record that can be trusted and continued: exact paths that read back,
output files opened without following planted links, bounded --resume reads, the model that scored the
rows, one writer at a time, a closed stdout as a failure, format characters escaped."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from i2p.runtime.cells import display, path_cell, read_path
from tests.runtime.test_outputs import png, run
from tests.support.fake_artifact import make_artifact

REPO = Path(__file__).resolve().parents[2]
DETECT = [sys.executable, "-c", "from i2p.runtime.detect_cli import detect; detect()"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact") / "a.i2p")


# Pairs of names that the escaped display shows alike: one file of each pair, then both.
LOOKALIKES = [
    ("a\tb.png", "a\\tb.png"),
    ("n\nl.png", "n\\nl.png"),
    ("=a.png", "'=a.png"),
    (os.fsdecode(b"caf\xe9.png"), "caf\\xe9.png"),
    ("r\u202egnp.png", "r\\u202egnp.png"),
    ("%41.png", "A.png"),
    ("cr\r.png", "cr\\r.png"),
]


def file_paths(out: Path) -> list[str]:
    """The exact paths of an output, read back with the csv/json modules and the documented decoding."""
    if out.suffix == ".csv":
        with out.open(newline="", encoding="utf-8") as f:
            return [read_path(r["path"]) for r in csv.DictReader(f)]
    return [read_path(json.loads(line)["path"]) for line in out.read_text(encoding="utf-8").splitlines()]


# -- exact paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [n for pair in LOOKALIKES for n in pair]
    + ["\x00x", "\ud800.png", "-1.png", "+1.png", "@a.png", "\u2066x\u2069.png", "z\u200b.png", "é.png"],
)
def test_path_cells_are_exact_and_inert(name: str) -> None:
    cell = path_cell(name)
    if "\x00" not in name and "\ud800" not in name:  # names a file system can hold read back exactly
        assert read_path(cell) == name
        assert os.fsdecode(urllib.parse.unquote_to_bytes(cell)) == name  # the documented recipe
    cell.encode("utf-8")  # strict UTF-8
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert all(c.isprintable() for c in cell), cell  # no control, format or separator character


def test_path_cells_differ_for_lookalikes() -> None:
    for a, b in LOOKALIKES:
        assert display(a) == display(b) or a.startswith("=") or a.startswith("%")  # the display merges them
        assert path_cell(a) != path_cell(b)
    assert path_cell("plain/dir/x.png") == "plain/dir/x.png"  # ordinary names unchanged


@pytest.mark.parametrize(
    "char", ["\u202e", "\u202a", "\u2066", "\u200b", "\u200e", "\ufeff", "\u00ad", "\U000e0041", "\u061c"]
)
def test_format_characters_are_escaped_in_display(char: str) -> None:
    shown = display(f"a{char}b.png")
    assert char not in shown and shown.startswith("a\\") and shown.isprintable()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_lookalike_names_are_distinct_rows_and_resume_exactly(
    artifact: Path, tmp_path: Path, fmt: str
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (a, b) in enumerate(LOOKALIKES):
        png(folder / a, seed=i)
        png(folder / b, seed=i + 100)
    out = tmp_path / f"rows.{fmt}"
    first = [folder / a for a, _ in LOOKALIKES]
    code, _, err = run(["--model", artifact, f"--{fmt}", out, "--", *first])
    assert code == 0, err
    assert file_paths(out) == [os.fsdecode(p) for p in first]
    code, stdout, err = run(["--model", artifact, f"--{fmt}", out, "--resume", "--json", "--", folder])
    assert code == 0, err
    summary = json.loads(stdout)
    assert (summary["skipped"], summary["files"]) == (len(LOOKALIKES), len(LOOKALIKES))
    expected = sorted(os.fsdecode(folder / n) for pair in LOOKALIKES for n in pair)
    assert sorted(file_paths(out)) == expected  # every file exactly once


def test_csv_cells_hold_no_format_characters(artifact: Path, tmp_path: Path) -> None:
    names = ["r\u202egnp.png", "a\u2066b.png", "z\u200bw.png"]
    for i, name in enumerate(names):
        png(tmp_path / name, seed=i)
    (tmp_path / "\u202ebroken.png").write_bytes(b"nope")
    names.append("\u202ebroken.png")
    out = tmp_path / "rows.csv"
    code, _, err = run(["--model", artifact, "--csv", out, "--", *(tmp_path / n for n in names)])
    assert code == 0, err
    text = out.read_text(encoding="utf-8")
    assert not any(c in text for c in "\u202e\u2066\u200b")
    code, stdout, _ = run(["--model", artifact, "--", *(tmp_path / n for n in names)])
    assert code == 0 and "\u202e" not in stdout and "\\u202e" in stdout
    code, stdout, _ = run(["--model", artifact, "--json", "--", *(tmp_path / n for n in names)])
    assert code == 0 and "\u202e" not in stdout and "\\u202e" not in stdout.replace("\\\\u202e", "")


# -- planted files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_a_planted_partial_symlink_is_never_followed(artifact: Path, tmp_path: Path, resume: bool) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "rows.csv"
    Path(f"{out}.partial").symlink_to(victim)
    code, _, err = run(
        [png(tmp_path / "x.png"), "--model", artifact, "--csv", out, *(["--resume"] if resume else [])]
    )
    assert code == 1 and "symbolic link" in err and "Traceback" not in err and "rows written" not in err
    assert victim.read_text() == "precious\n" and not out.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resume", [False, True])
def test_a_planted_partial_fifo_is_refused_without_hanging(
    artifact: Path, tmp_path: Path, resume: bool
) -> None:
    out = tmp_path / "rows.jsonl"
    os.mkfifo(f"{out}.partial")
    code, _, err = run(
        [png(tmp_path / "x.png"), "--model", artifact, "--jsonl", out, *(["--resume"] if resume else [])]
    )
    assert code == 1 and "not a regular file" in err


def test_a_hard_linked_partial_is_refused(artifact: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.csv"
    victim.write_text("precious\n")
    out = tmp_path / "rows.csv"
    os.link(victim, f"{out}.partial")
    code, _, err = run([png(tmp_path / "x.png"), "--model", artifact, "--csv", out])
    assert code == 1 and "hard link" in err and victim.read_text() == "precious\n"


def test_a_symlinked_output_is_replaced_not_written_through(artifact: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.csv"
    victim.write_text("precious\n")
    out = tmp_path / "rows.csv"
    out.symlink_to(victim)
    code, _, err = run([png(tmp_path / "x.png"), "--model", artifact, "--csv", out, "--resume"])
    assert code == 1 and "symbolic link" in err and victim.read_text() == "precious\n"
    code, _, err = run([png(tmp_path / "x.png"), "--model", artifact, "--csv", out])
    assert code == 0, err
    assert victim.read_text() == "precious\n" and not out.is_symlink() and len(file_paths(out)) == 1


@pytest.mark.timeout(60)
def test_a_fifo_output_nobody_reads_is_refused_without_hanging(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    os.mkfifo(out)
    code, _, err = run([png(tmp_path / "x.png"), "--model", artifact, "--csv", out])
    assert code == 1 and "nothing is reading" in err


# -- bounded --resume ----------------------------------------------------------------------------------------


def _complete(artifact: Path, tmp_path: Path, fmt: str, n: int = 3) -> tuple[Path, Path]:
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        png(folder / f"{i}.png", seed=i)
    out = tmp_path / f"rows.{fmt}"
    code, _, err = run([folder, "--model", artifact, f"--{fmt}", out])
    assert code == 0, err
    return folder, out


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resuming_a_complete_output_does_not_copy_it(artifact: Path, tmp_path: Path, fmt: str) -> None:
    folder, out = _complete(artifact, tmp_path, fmt)
    inode = out.stat().st_ino
    png(folder / "new.png", seed=9)
    code, stdout, err = run([folder, "--model", artifact, f"--{fmt}", out, "--resume", "--json"])
    assert code == 0, err
    assert (json.loads(stdout)["skipped"], json.loads(stdout)["files"]) == (3, 1)
    assert out.stat().st_ino == inode and len(file_paths(out)) == 4  # continued in place, not copied


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("torn", [2 << 20, (1 << 20) + 1, 5])
def test_a_long_torn_last_line_is_dropped(artifact: Path, tmp_path: Path, fmt: str, torn: int) -> None:
    folder, out = _complete(artifact, tmp_path, fmt)
    partial = Path(f"{out}.partial")
    out.rename(partial)
    with partial.open("ab") as f:
        f.write(b'"' + b"x" * torn)  # a kill mid-row, after a long cell
    png(folder / "new.png", seed=9)
    code, stdout, err = run([folder, "--model", artifact, f"--{fmt}", out, "--resume", "--json"])
    assert code == 0, err
    assert (json.loads(stdout)["skipped"], json.loads(stdout)["files"]) == (3, 1)
    assert len(file_paths(out)) == 4


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_huge_first_line_is_refused_unread(artifact: Path, tmp_path: Path, fmt: str) -> None:
    """A 1 GiB sparse file without a newline: refused from its first 64 KiB, in a real process (RSS)."""
    out = tmp_path / f"rows.{fmt}"
    with open(f"{out}.partial", "wb") as f:
        f.truncate(1 << 30)
    code = (
        "import sys\n"
        "from benchmarks.support.memory import peak_rss_mb\n"
        "from i2p.runtime.detect_cli import detect\n"
        "try:\n    detect()\n"
        "finally:\n    print('RSS', peak_rss_mb(), file=sys.stderr)\n"
    )
    args = [str(png(tmp_path / "x.png")), "--model", str(artifact), f"--{fmt}", str(out), "--resume"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 1 and "not an i2p-detect" in proc.stderr, proc.stderr
    rss_mb = float(proc.stderr.rsplit("RSS ", 1)[1].split()[0])
    assert rss_mb < 600, rss_mb  # the model and ONNX Runtime; not the 1 GiB line
    assert os.path.getsize(f"{out}.partial") == 1 << 30  # refused, untouched


BAD_JSONL = [
    b"[1, 2]\n",
    b'"a string"\n',
    b"null\n",
    b'{"path": 5, "model": "x", "threshold": 0.5}\n',
    b"[" * 100_000 + b"]" * 100_000 + b"\n",
    b'{"path": {"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"\n",
    b"\xff\xfe not utf-8\n",
    b"{not json\n",
]


@pytest.mark.parametrize("line", BAD_JSONL, ids=range(len(BAD_JSONL)))
def test_a_malformed_jsonl_row_is_refused_by_line(artifact: Path, tmp_path: Path, line: bytes) -> None:
    folder, out = _complete(artifact, tmp_path, "jsonl", n=2)
    partial = Path(f"{out}.partial")
    out.rename(partial)
    with partial.open("ab") as f:
        f.write(line)
    code, _, err = run([folder, "--model", artifact, "--jsonl", out, "--resume"])
    assert code == 1 and f"{partial}: line 3" in err and "Traceback" not in err, err


BAD_CSV = [
    b"a,b\n",  # too few cells
    b'"' + b"y" * 200_000 + b'",0.5,real,,x,0.5\n',  # a 200 KB cell (over csv's field limit)
    b'"open quote,0.5\n',
    b"\xff\xfe,0.5,real,,x,0.5\n",
]


@pytest.mark.parametrize("line", BAD_CSV, ids=range(len(BAD_CSV)))
def test_a_malformed_csv_row_is_refused_by_line(artifact: Path, tmp_path: Path, line: bytes) -> None:
    folder, out = _complete(artifact, tmp_path, "csv", n=2)
    partial = Path(f"{out}.partial")
    out.rename(partial)
    with partial.open("ab") as f:
        f.write(line + b"more,0.5,real,,x,0.5\n")
    code, _, err = run([folder, "--model", artifact, "--csv", out, "--resume"])
    assert code == 1 and f"{partial}: line" in err and "Traceback" not in err, err


# -- which model scored it ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_record_the_model_and_resume_refuses_another(artifact: Path, tmp_path: Path, fmt: str) -> None:
    folder, out = _complete(artifact, tmp_path, fmt)
    if fmt == "csv":
        with out.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    manifest_sha = __import__("hashlib").sha256((artifact / "manifest.json").read_bytes()).hexdigest()
    assert {r["model"] for r in rows} == {f"sha256:{manifest_sha}"}
    assert {float(r["threshold"]) for r in rows} == {0.5}
    other = make_artifact(tmp_path / "other.i2p", seed=3)
    png(folder / "new.png", seed=9)
    for args, what in (
        (["--model", other], "model"),
        (["--model", artifact, "--threshold", "0.7"], "threshold"),
    ):
        code, _, err = run([folder, *args, f"--{fmt}", out, "--resume"])
        assert code == 1 and "--resume would mix" in err and what in err, err
    code, _, err = run([folder, "--model", artifact, "--threshold", "0.5", f"--{fmt}", out, "--resume"])
    assert code == 0, err  # the same model and threshold, given explicitly


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("csv", "path,probability,label,error\r\n/x/a.png,0.5,fake,\r\n"),
        ("csv", "path,probability,label,error\r\n"),
        ("jsonl", '{"path": "/x/a.png", "probability": 0.5, "label": "fake", "error": null}\n'),
    ],
)
def test_an_output_of_the_previous_version_is_refused_with_the_reason(
    artifact: Path, tmp_path: Path, fmt: str, text: str
) -> None:
    out = tmp_path / f"rows.{fmt}"
    Path(f"{out}.partial").write_bytes(text.encode())
    code, _, err = run([png(tmp_path / "x.png"), "--model", artifact, f"--{fmt}", out, "--resume"])
    assert code == 1 and "earlier i2p-detect" in err and "without --resume" in err, err
    assert Path(f"{out}.partial").read_bytes() == text.encode()


# -- one writer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_writer_is_refused(artifact: Path, tmp_path: Path, resume: bool) -> None:
    folder, out = _complete(artifact, tmp_path, "csv")
    partial = Path(f"{out}.partial")
    out.rename(partial)
    before = partial.read_bytes()
    with open(partial, "rb") as held:  # what a running i2p-detect holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run([folder, "--model", artifact, "--csv", out, *(["--resume"] if resume else [])])
    assert code == 1 and "another i2p-detect is writing" in err and "rows written so far" not in err, err
    assert partial.read_bytes() == before  # not truncated, not appended to


def test_a_second_real_process_is_refused_while_the_first_runs(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    partial = Path(f"{out}.partial")
    script = (
        "import fcntl, os, sys, time\n"
        "from i2p.runtime import outputs\n"
        "from i2p.runtime.outputs import Scorer, file_sink\n"
        f"with file_sink({str(out)!r}, 'csv', False, Scorer('sha256:x', 0.5)) as (write, done):\n"
        "    print('ready', flush=True); sys.stdin.read()\n"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert first.stdout.readline().strip() == "ready"
        code, _, err = run([png(tmp_path / "x.png"), "--model", artifact, "--csv", out])
        assert code == 1 and "another i2p-detect is writing" in err and partial.exists()
    finally:
        first.communicate("", timeout=60)
    assert first.returncode == 0 and out.exists()


# -- standard output -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--json"], [], ["--csv", "{tmp}/rows.csv"]])
def test_a_closed_or_broken_stdout_is_a_failure(artifact: Path, tmp_path: Path, extra: list[str]) -> None:
    image = png(tmp_path / "x.png")
    args = [*DETECT, str(image), "--model", str(artifact), *(a.format(tmp=tmp_path) for a in extra)]
    closed = subprocess.run(
        args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert closed.returncode == 1 and "standard output" in closed.stderr, closed.stderr
    assert "Traceback" not in closed.stderr
    r, w = os.pipe()
    os.close(r)  # nobody will read: EPIPE
    try:
        broken = subprocess.run(args, stdout=w, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
    finally:
        os.close(w)
    assert broken.returncode == 1 and "standard output: cannot write" in broken.stderr, broken.stderr
    assert "Traceback" not in broken.stderr


def test_the_nothing_found_hint_escapes_names(artifact: Path, tmp_path: Path) -> None:
    folder = tmp_path / "evil\u202egnp.dir"
    (folder / "sub\u2066dir").mkdir(parents=True)
    code, _, err = run([folder, "--model", artifact])
    assert code == 1 and "\u202e" not in err and "\u2066" not in err and "\\u202e" in err and "\\u2066" in err
