"""A scan at scale: ``i2p-detect -r --json`` over 100,000 small generated files, watched from outside.

    .venv/bin/python -m benchmarks.scan [--files 100000] [--model ART.i2p] [--work DIR] [--threads 2]

Writes ``--files`` small JPEGs (a few hundred distinct 48x48 images, so the files are real and cheap to
make) into 100 folders, runs the real ``i2p-detect --json`` command on the tree, timestamps its rows as
they stream out (one flushed JSON line each) and samples its process's RSS every 0.25 s. From that:

- throughput of the first 10% of rows (counted from the 100th, after start-up) and of the last 10%
  (goal: last >= 0.9 x first: nothing in the scan grows with the number of files seen);
- RSS growth from the end of the first 10% to the peak afterwards (goal < 50 MB);
- rows == files (every file gets exactly one row; unreadable ones an error row).

The model is a tiny random-weight detector (i2p-tiny-vit, exported here) unless ``--model`` is given:
the point is the scan machinery (walk, decode threads, batching, output), not the network.
Prints one JSON object (the last line); benchmarks/perf.py runs it for docs/performance.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

FOLDERS = 100
DISTINCT = 256
GOAL_FLATNESS, GOAL_RSS_MB = 0.9, 50.0


def make_files(root: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs (48x48, q90) spread over FOLDERS folders; contents cycle over DISTINCT images."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(DISTINCT):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    for f in range(FOLDERS):
        (root / f"{f:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"{i % FOLDERS:03d}" / f"{i:06d}.jpg").write_bytes(blobs[i % DISTINCT])


def tiny_artifact(work: Path) -> Path:
    """i2p-tiny-vit with random weights, exported by i2p-export (FP32 + the default CPU model)."""
    from benchmarks.perf import write_checkpoint

    ckpt = write_checkpoint("i2p-tiny-vit", 2, work / "tiny.safetensors")
    out = work / "tiny.i2p"
    exe = str(Path(sys.executable).with_name("i2p-export"))
    subprocess.run(
        [exe, "--ckpt", str(ckpt), "--out", str(out), "--samples", "4", "--engine", "no", "--force"],
        check=True,
        capture_output=True,
    )
    return out


def watch(
    cmd: list[str], env: dict[str, str]
) -> tuple[list[tuple[float, int]], list[tuple[float, float]], list[dict]]:
    """Run ``cmd`` (JSON rows on stdout, flushed per row); (seconds, rows) every 100 rows, (seconds, RSS MB)
    every 0.25 s, and the rows."""
    rows: list[dict] = []
    progress: list[tuple[float, int]] = [(0.0, 0)]
    memory: list[tuple[float, float]] = []
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)

    def read() -> None:
        for line in proc.stdout:
            rows.append(json.loads(line))
            if len(rows) % 100 == 0:
                progress.append((time.perf_counter() - start, len(rows)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            memory.append((time.perf_counter() - start, proc.memory_info().rss / 2**20))
        except psutil.Error:
            break
        time.sleep(0.25)
    reader.join()
    progress.append((time.perf_counter() - start, len(rows)))
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return progress, memory, rows


def time_at(progress: list[tuple[float, int]], rows: float) -> float:
    """When the ``rows``-th row arrived (linear between the every-100-rows marks)."""
    return float(np.interp(rows, [r for _, r in progress], [t for t, _ in progress]))


def analyse(
    progress: list[tuple[float, int]], memory: list[tuple[float, float]], files: int
) -> dict[str, Any]:
    tenth = files / 10
    # from the 100th row: the process start (imports, model load) is not scan throughput
    first = tenth / (time_at(progress, tenth + 100) - time_at(progress, 100))
    last = tenth / (time_at(progress, files) - time_at(progress, files - tenth))
    t10 = time_at(progress, tenth)
    rss_at_10 = float(np.interp(t10, [t for t, _ in memory], [m for _, m in memory]))
    peak_after = max(m for t, m in memory if t >= t10)
    return {
        "first_10pct_images_per_s": first,
        "last_10pct_images_per_s": last,
        "flatness": last / first,
        "rss_at_10pct_mb": rss_at_10,
        "rss_peak_after_10pct_mb": peak_after,
        "rss_growth_mb": peak_after - rss_at_10,
        "rss_samples": len(memory),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--model", type=Path, help="artifact to scan with (default: a tiny one exported here)")
    ap.add_argument("--work", type=Path, help="where files and output go (default: a temp dir, removed)")
    ap.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="i2p-scan-"))
    work.mkdir(parents=True, exist_ok=True)
    tree = work / "files"
    try:
        t0 = time.perf_counter()
        if not tree.is_dir() or sum(1 for _ in tree.rglob("*.jpg")) != args.files:
            shutil.rmtree(tree, ignore_errors=True)
            make_files(tree, args.files)
        made_s = time.perf_counter() - t0
        model = args.model or tiny_artifact(work)
        exe = str(Path(sys.executable).with_name("i2p-detect"))
        cmd = [exe, str(tree), "-r", "--model", str(model), "--json", "--threads", str(args.threads)]
        progress, memory, rows = watch(cmd, {**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        result = {
            "command": " ".join(["i2p-detect", *cmd[1:]]).replace(str(work), "WORK"),
            "model": "i2p-tiny-vit (random weights)" if args.model is None else str(args.model),
            "files": args.files,
            "rows": len(rows),
            "unique_paths": len({r["path"] for r in rows}),
            "errors": sum(1 for r in rows if r["error"]),
            "wall_s": progress[-1][0],
            "make_files_s": made_s,
            "threads": args.threads,
            **analyse(progress, memory, args.files),
        }
        result["goals"] = {
            "flat": result["flatness"] >= GOAL_FLATNESS,
            "rss": result["rss_growth_mb"] < GOAL_RSS_MB,
            "rows": result["rows"] == result["unique_paths"] == args.files,
        }
        print(json.dumps(result))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
