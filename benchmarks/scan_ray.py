"""``i2p scan`` on Ray Data against ``i2p-detect`` on the same images and cores, 1 -> 2 actors, RSS per actor.

    .venv/bin/python -m benchmarks.scan_ray [--files 2000] [--cpus 2] [--model ART.i2p] [--images DIR]

Writes ``--files`` 256x256 JPEGs (q95, as sid-mini) unless ``--images`` names a folder, and uses a small
random-weight artifact at 224x224 (benchmarks/support/fake_artifact.py) unless ``--model`` is given.
Then, on ``--cpus`` cores (the process and its children pinned to them):

- ``i2p-detect DIR --csv`` (``--workers`` = cpus): its own images/s, from its --json summary;
- ``i2p scan``'s ``scan()`` on a local Ray instance of ``--cpus`` CPUs with 1 and with ``cpus`` actors
  (fresh output folders, shards of 200): images/s from the first submitted batch to the last shard
  written (each actor's start-up and model load included, where i2p-detect's figure starts from a
  loaded model; Ray's own start-up, ~8 s here, is not), and the peak RSS of each actor process,
  sampled every 0.1 s with psutil;
- ratio = scan (cpus actors) / i2p-detect (goal >= 0.9) and scaling = scan(cpus) / scan(1).

Prints a table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
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

GOAL_RATIO = 0.9


def make_images(root: Path, count: int, seed: int = 0) -> None:
    """``count`` distinct 256x256 JPEGs (q95): smooth gradients plus noise, like re-encoded photos."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:256].astype(np.float32)
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        img = np.stack([128 + 100 * np.sin(x / (9 + k) + y / (13 + k) + phase[k]) for k in range(3)], axis=2)
        img += rng.normal(0, 6, img.shape)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
        (root / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def run_detect(images: Path, model: Path, out: Path, cpus: int) -> dict[str, Any]:
    """The real ``i2p-detect`` command; its --json summary (the last stderr line with --csv)."""
    cmd = [
        sys.executable, "-m", "i2p.cli", "detect", str(images), "--model", str(model), "--csv", str(out),
        "--workers", str(cpus), "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"i2p-detect failed: {proc.stderr[-2000:]}")
    return json.loads([line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("{")][-1])


class ActorRss:
    """Peak RSS of the Ray actor processes (``ray::MapWorker...``) started while sampling (not another
    session's, nor a previous scan's)."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self._since = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ActorRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for proc in psutil.process_iter(["pid", "name", "create_time"]):
                try:
                    if (proc.info["name"] or "").startswith("ray::MapWorker") and proc.info[
                        "create_time"
                    ] >= self._since - 1:
                        self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), proc.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue


def run_scans(paths: list[str], model: Path, work: Path, cpus: int) -> dict[int, dict[str, Any]]:
    from i2p.runtime.ray_scan import scan
    from i2p.runtime.scan_cli import ray_session

    results = {}
    with ray_session(None, cpus):
        for actors in sorted({1, cpus}):
            with ActorRss() as rss:
                summary = scan(
                    paths, model, work / f"scan-{actors}", workers=actors, batch_size=32, shard_size=200
                )
            assert summary.scored == len(paths), summary
            results[actors] = {
                "images_per_s": round(summary.scored / summary.seconds, 1),
                "seconds": round(summary.seconds, 2),
                "actor_peak_rss_mb": sorted(round(v / 2**20) for v in rss.peak.values()),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--model", type=Path, help="an artifact (default: a random 224x224 stand-in)")
    parser.add_argument("--images", type=Path, help="a folder of images (default: generated)")
    args = parser.parse_args()
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cpus]))  # children inherit it
    with tempfile.TemporaryDirectory(prefix="i2p-scan-ray-") as tmp:
        work = Path(tmp)
        images = args.images or work / "images"
        if not args.images:
            make_images(images, args.files)
        model = args.model
        if model is None:
            from benchmarks.support.fake_artifact import make_artifact

            model = make_artifact(work / "bench.i2p", size=224)
        from i2p.runtime.scan_sources import list_inputs

        paths = list_inputs(str(images)).paths
        detect = run_detect(images, model, work / "detect.csv", args.cpus)
        scans = run_scans(paths, model, work, args.cpus)
    top = scans[args.cpus]["images_per_s"]
    report = {
        "files": len(paths),
        "cpus": args.cpus,
        "detect_images_per_s": detect["images_per_s"],
        "scan_images_per_s": {str(k): v["images_per_s"] for k, v in scans.items()},
        "ratio_scan_to_detect": round(top / detect["images_per_s"], 3),
        "goal_ratio": GOAL_RATIO,
        "scaling_1_to_n_actors": round(top / scans[1]["images_per_s"], 2) if args.cpus > 1 else None,
        "actor_peak_rss_mb": {str(k): v["actor_peak_rss_mb"] for k, v in scans.items()},
        "backend": detect["backend"],
        "precision": detect["precision"],
    }
    print(f"i2p-detect ({args.cpus} decode threads): {detect['images_per_s']} images/s")
    for actors, r in scans.items():
        print(
            f"i2p scan, {actors} actor(s): {r['images_per_s']} images/s, actor peak RSS {r['actor_peak_rss_mb']} MB"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
