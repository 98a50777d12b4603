"""``DetectImages`` and ``i2p scan`` on a real local Ray instance (127.0.0.1, 2 CPUs, started once here).

Checked: the same probabilities as ``Detector.predict`` to the last bit; one row per input (2,000 files,
40 corrupt); an actor killed mid-scan is retried with no row lost or doubled; an interrupted scan
completes on a re-run without scoring a shard twice; hostile files (bombs, truncations, FIFOs) are rows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install 'i2p-detector[ray]')")
pa = pytest.importorskip("pyarrow", reason="the [ray] extra is not installed")
import pyarrow.parquet as pq  # noqa: E402

from i2p.runtime import Detector  # noqa: E402
from i2p.runtime.preprocess import MAX_INPUT_BYTES  # noqa: E402
from i2p.runtime.ray_scan import ScanError, _dataset, plan_shards, scan  # noqa: E402
from i2p.runtime.ray_stage import RESULT_COLUMNS, DetectImages, read_uri  # noqa: E402
from i2p.runtime.scan_sources import SourceError, list_inputs  # noqa: E402
from tests.support.corpus import base_image, encode, make_bad_corpus  # noqa: E402
from tests.support.fake_artifact import make_artifact  # noqa: E402

CRASH_NAME = "img00150-crash.png"  # mid-shard: rows of its block were sent before the crash
pytestmark = pytest.mark.timeout(150)  # a Ray scheduling deadlock fails in minutes instead of hanging CI


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local Ray instance for this module: 127.0.0.1, 2 CPUs, no dashboard; its GCS address."""
    temp = Path("/tmp") / f"i2p-ray-test-{os.getpid()}"  # Ray's socket paths must stay short
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp),
        object_store_memory=150 * 2**20,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("art") / "fake.i2p")


def write_images(folder: Path, n: int, corrupt_every: int = 0) -> tuple[list[str], set[str]]:
    """``n`` tiny PNGs (8x8, distinct); every ``corrupt_every``-th is broken in one of four ways."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, bad = [], set()
    for i in range(n):
        path = folder / f"img{i:05d}.png"
        data = encode(base_image(8, 8, seed=i), "PNG")
        if corrupt_every and i % corrupt_every == corrupt_every - 1:
            kind = (i // corrupt_every) % 4
            data = (data[: len(data) // 2], b"", b"not an image at all", data[:8] + bytes(40))[kind]
            bad.add(str(path))
        path.write_bytes(data)
        paths.append(str(path))
    return paths, bad


def read_out(out: Path) -> list[dict]:
    rows = []
    for part in sorted(out.glob("part-*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    return rows


@pytest.mark.slow
def test_stage_matches_detector_bitwise(cluster: str, artifact: Path, tmp_path: Path) -> None:
    """The documented map_batches call, over paths and over read_binary_files bytes: Detector's bits.

    One actor for the bytes: the read task needs a CPU of its own (two actors would hold both)."""
    paths, bad = write_images(tmp_path / "imgs", 120, corrupt_every=15)
    expected = {p.source: p for p in Detector(artifact).predict(paths)}
    by_path = (
        ray.data.from_items([{"path": p} for p in paths])
        .map_batches(
            DetectImages, fn_constructor_kwargs={"model": str(artifact)}, concurrency=2, batch_size=7
        )
        .take_all()
    )
    by_bytes = (
        ray.data.read_binary_files(str(tmp_path / "imgs"), include_paths=True)
        .map_batches(
            DetectImages, fn_constructor_kwargs={"model": str(artifact)}, concurrency=1, batch_size=5
        )
        .take_all()
    )
    for rows in (by_path, by_bytes):
        assert sorted(r["path"] for r in rows) == sorted(paths)
        for r in rows:
            want = expected[r["path"]]
            assert set(RESULT_COLUMNS) <= set(r) and "bytes" not in r
            if want.ok:
                assert r["error"] is None and r["verdict"] == want.label
                assert np.float64(r["probability"]).tobytes() == np.float64(want.probability).tobytes()
            else:
                assert r["path"] in bad and r["error"] and r["verdict"] is None and np.isnan(r["probability"])
    assert sum(r["error"] is not None for r in by_path) == len(bad)
    sha = Detector(artifact).manifest.files["model.onnx"]
    assert {r["model_sha256"] for r in by_path} == {sha}  # the CPU model the backend runs
    assert {r["threshold"] for r in by_bytes} == {0.5}


@pytest.mark.slow
def test_scan_one_row_per_input_2000_with_40_corrupt(cluster: str, artifact: Path, tmp_path: Path) -> None:
    paths, bad = write_images(tmp_path / "imgs", 2000, corrupt_every=50)
    assert len(bad) == 40
    summary = scan(paths, artifact, tmp_path / "out", workers=2, batch_size=64, shard_size=500)
    rows = read_out(tmp_path / "out")
    assert len(rows) == 2000 and sorted(r["path"] for r in rows) == paths
    assert {r["path"] for r in rows if r["error"]} == bad
    assert summary.scored == 2000 and summary.errors == 40 and summary.shards == 4
    expected = Detector(artifact).predict(paths[:100])
    got = {r["path"]: r["probability"] for r in rows}
    assert all(got[p.source] == p.probability for p in expected if p.ok)


class CrashOnce(DetectImages):
    """Kills its own actor process the first time it sees CRASH_NAME (a marker file records that)."""

    def __call__(self, batch):
        for path in batch["path"]:
            marker = Path(str(path) + ".crashed")
            if str(path).endswith(CRASH_NAME) and not marker.exists():
                marker.touch()
                os._exit(1)
        return super().__call__(batch)


@pytest.mark.slow
def test_killed_actor_is_retried_without_lost_or_doubled_rows(
    cluster: str, artifact: Path, tmp_path: Path
) -> None:
    paths, _ = write_images(tmp_path / "imgs", 300)
    crash = tmp_path / "imgs" / CRASH_NAME
    crash.write_bytes(encode(base_image(8, 8), "PNG"))
    paths = sorted([*paths, str(crash)])
    summary = scan(
        paths, artifact, tmp_path / "out", workers=2, batch_size=16, shard_size=100, stage=CrashOnce
    )
    assert Path(str(crash) + ".crashed").exists(), "the actor never crashed: the test tested nothing"
    rows = read_out(tmp_path / "out")
    assert sorted(r["path"] for r in rows) == paths  # each once
    assert all(r["error"] is None for r in rows) and summary.scored == len(paths)


def test_blocks_hold_at_most_a_batch_so_no_actor_idles_at_the_end(cluster: str) -> None:
    """Blocks are what one actor call takes: with one block per shard, 3 shards on 2 actors left one actor
    alone on the last shard. Blocks of a batch cut every shard; rows keep their shard and index."""
    shards = plan_shards([f"/x/{i:03d}.png" for i in range(25)], "key", shard_size=10)
    ds = _dataset(shards, block_rows=4)
    assert ds.num_blocks() == 3 + 3 + 2  # 10 -> 4+4+2, 10 -> 4+4+2, 5 -> 4+1
    rows = ds.to_pandas()
    assert sorted(zip(rows["shard"], rows["index"], strict=True)) == [
        (s.number, i) for s in shards for i in range(len(s.paths))
    ]
    assert rows["path"].tolist() == [p for s in shards for p in s.paths]


@pytest.mark.slow
def test_rerun_scores_nothing_twice_and_foreign_shards_are_refused(
    cluster: str, artifact: Path, tmp_path: Path
) -> None:
    paths, _ = write_images(tmp_path / "imgs", 60)
    out = tmp_path / "out"
    first = scan(paths, artifact, out, workers=2, shard_size=25, csv=True)
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert first.scored == 60 and len([f for f in files if f.endswith(".parquet")]) == 3
    assert len([f for f in files if f.endswith(".csv")]) == 3
    again = scan(paths, artifact, out, workers=2, shard_size=25, csv=True)
    assert (again.scored, again.shards_skipped) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files  # nothing rewritten
    with pytest.raises(ScanError, match="another scan"):  # another threshold: other rows
        scan(paths, artifact, out, workers=2, shard_size=25, threshold=0.9)
    with pytest.raises(ScanError, match="another scan"):  # other inputs
        scan(paths[:-1], artifact, out, workers=2, shard_size=25)


@pytest.mark.slow
def test_killed_scan_completes_on_rerun(cluster: str, artifact: Path, tmp_path: Path) -> None:
    """``i2p scan`` killed (SIGKILL) once some shards are on disk; the same command again finishes it."""
    write_images(tmp_path / "imgs", 400)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "i2p.cli", "scan", str(tmp_path / "imgs"), "--model", str(artifact),
        "--out", str(out), "--address", cluster, "--workers", "1", "--batch-size", "4", "--shard-size", "20",
        "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 2 <= len(written) < 20, "the scan was not caught mid-way"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["skipped shards"] == len(written) and summary["scored"] == 400 - 20 * len(written)
    assert {
        n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in out.glob("part-*")) if n in written
    } == written
    rows = read_out(out)
    assert len(rows) == 400 and len({r["path"] for r in rows}) == 400


def scan_bomb_jpeg(side: int = 1024, scans: int = 3000) -> bytes:
    """A progressive JPEG whose last scan repeats ``scans`` times: ~40 KB, seconds to minutes of decoding."""
    data = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)
    i, last = 2, None
    while data[i + 1] != 0xD9:
        end = i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if data[i + 1] == 0xDA:  # entropy-coded data runs to the next marker
            while not (data[end] == 0xFF and data[end + 1] not in (0, *range(0xD0, 0xD8))):
                end += 1
            last = (i, end)
        i = end
    return data[: last[1]] + data[last[0] : last[1]] * scans + b"\xff\xd9"


@pytest.mark.slow
def test_hostile_files_are_error_rows(cluster: str, artifact: Path, tmp_path: Path) -> None:
    cases = make_bad_corpus(tmp_path / "src")
    (tmp_path / "src" / "scan_bomb.jpg").write_bytes(scan_bomb_jpeg())
    good = tmp_path / "src" / "good.png"
    good.write_bytes(encode(base_image(), "PNG"))
    listing = tmp_path / "inputs.txt"  # named one by one: the folder walk would enter folder.jpg
    listing.write_text("".join(f"src/{name}\n" for name in [*cases, "scan_bomb.jpg", "good.png"]))
    inputs = list_inputs(str(listing))
    start = time.monotonic()
    scan(inputs.paths, artifact, tmp_path / "out", workers=2, shard_size=8)
    rows = {Path(r["path"]).name: r for r in read_out(tmp_path / "out")}
    assert len(rows) == len(inputs.paths) == len(cases) + 2
    for name, case in cases.items():
        if case.error:
            assert case.error in (rows[name]["error"] or ""), (name, rows[name])
        else:
            assert rows[name]["error"] is None, (name, rows[name])
    assert rows["scan_bomb.jpg"]["error"], rows["scan_bomb.jpg"]
    assert rows["good.png"]["error"] is None
    assert time.monotonic() - start < 60


def test_sources(tmp_path: Path) -> None:
    paths, _ = write_images(tmp_path / "imgs" / "deep", 3)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert list_inputs(str(tmp_path / "imgs")).paths == paths  # recursive, image names only, sorted
    assert list_inputs(str(tmp_path / "imgs" / "**" / "*1.png")).paths == [paths[1]]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# header\nimgs/deep/img00002.png\n\n{paths[0]}\n{paths[0]}\ns3://bucket/a.jpg\n")
    inputs = list_inputs(str(listing))
    assert inputs.paths == sorted([paths[0], paths[2], "s3://bucket/a.jpg"]) and inputs.duplicates == 1
    table = pa.table({"uri": ["imgs/deep/img00001.png", "gs://b/k.png"]})
    pq.write_table(table, tmp_path / "list.parquet")
    assert list_inputs(str(tmp_path / "list.parquet")).paths == sorted([paths[1], "gs://b/k.png"])
    uris = list_inputs(f"file://{tmp_path}/imgs").paths  # an object-store prefix, through pyarrow.fs
    assert uris == [f"file://{p}" for p in paths]


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"\xff\xfe not utf-8\n", "not UTF-8"),
        (b"x" * 10_000 + b"\n", "not a path"),
        (b"a.png\x00b.png\n", "not a path"),
    ],
)
def test_bad_list_files_name_the_file(tmp_path: Path, content: bytes, error: str) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(content)
    with pytest.raises(SourceError, match=error) as e:
        list_inputs(str(listing))
    assert str(listing) in str(e.value)


@pytest.mark.parametrize(
    "source", ["/no/such/folder", "file:///no/such/prefix", "notes.doc", "parquet-without-path"]
)
def test_unlistable_sources(tmp_path: Path, source: str) -> None:
    if source == "notes.doc":
        source = str(tmp_path / source)
        Path(source).write_text("x")
    elif source == "parquet-without-path":
        source = str(tmp_path / "x.parquet")
        pq.write_table(pa.table({"name": ["a.png"]}), source)
    with pytest.raises(SourceError):
        list_inputs(source)


def test_read_uri_is_bounded(tmp_path: Path) -> None:
    ok = tmp_path / "ok.png"
    ok.write_bytes(b"abc")
    assert read_uri(f"file://{ok}", {}) == b"abc"
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)
    with pytest.raises(ValueError, match="input limit"):
        read_uri(f"file://{huge}", {})


def test_unreadable_uri_is_an_error_row(artifact: Path, tmp_path: Path) -> None:
    """A URI the actor cannot read is that row's error, named by the URI; its batch-mates score."""
    good = tmp_path / "good.png"
    good.write_bytes(encode(base_image(8, 8), "PNG"))
    bad_uri = f"file://{tmp_path}/missing.png"
    was_running = ray.is_initialized()
    stage = DetectImages(model=str(artifact))
    assert ray.is_initialized() == was_running  # built outside Ray, it starts no Ray instance
    out = stage({"path": np.array([str(good), bad_uri, "s3:/", "nosuchscheme://host/x.png"], object)})
    assert out["error"][0] is None and out["verdict"][0] in ("real", "fake")
    assert out["error"][1].startswith(bad_uri)
    assert all(out["error"][2:]) and list(out["path"]) == [
        str(good),
        bad_uri,
        "s3:/",
        "nosuchscheme://host/x.png",
    ]


@pytest.mark.parametrize(
    ("problem", "code"),
    [("no source", 2), ("no glob match", 1), ("empty folder", 1), ("not an artifact", 1)],
)
def test_scan_command_refuses_before_starting_ray(
    artifact: Path, tmp_path: Path, problem: str, code: int
) -> None:
    """Problems are one clear line, found on the driver before any Ray instance starts; a SOURCE that
    does not exist is a usage error (2), as a missing path is in every command; nothing to scan (an
    empty folder, a glob matching nothing) and a bad artifact are 1."""
    from click.testing import CliRunner

    from i2p.cli import main

    (tmp_path / "empty").mkdir()
    source = {
        "no source": tmp_path / "missing",
        "no glob match": tmp_path / "missing-*.png",
        "empty folder": tmp_path / "empty",
    }.get(problem, tmp_path)
    model = tmp_path / "empty" if problem == "not an artifact" else artifact
    was_running = ray.is_initialized()
    result = CliRunner().invoke(
        main, ["scan", str(source), "--model", str(model), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    assert str(source if problem != "not an artifact" else model) in result.output
    assert ray.is_initialized() == was_running
