"""Frozen-tower training (``i2p-train --baseline``): an epoch with every epoch's own augmented view against
one reused view, on real CLIP ViT-B/16 weights and a sid-mini subset, CPU.

    .venv/bin/python -m benchmarks.perf_baseline --threads 2 --work /tmp/perf-baseline

Draws ``--train`` training and ``--val`` validation images from sid-mini (half real, half generated,
fixed seed) into CSV manifests, then runs ``i2p-train --baseline`` for ``--epochs`` epochs twice, each in
its own process: ``--feature-views EPOCHS`` (each epoch extracts its own augmented view: the tower cost
and augmentation of the uncached loop) and ``--feature-views 1`` (one view, reused). Epoch times come
from the time stamps of the run's progress lines (from "L* = ..." to each "epoch k/N: ..." line), so
they include feature extraction and validation. The uncached loop also re-ran the tower on the
validation images every epoch; ``uncached_estimate_mean_epoch_s`` adds that (the measured validation
extraction time, once per later epoch) to the per-epoch-views run. Prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.support.provenance import git_commit
from i2p.evaluation.labels import Sample, discover

REPO = Path(__file__).resolve().parents[1]
SID_MINI = REPO.parent / "shared" / "data" / "sid-mini"
WEIGHTS_SCRIPT = REPO.parent / "shared" / "fixtures" / "clip_vit_b16.py"
MODEL = "ViT-B-16-quickgelu"
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): ")
VAL_LINE = re.compile(r"^features: validation: \d+ images in ([\d.]+) s")


def draw(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    """``n`` samples, half of each label (as far as each has), drawn by ``seed``; kept in input order."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in (0, 1):
        members = [i for i, s in enumerate(samples) if s.label == label]
        want = n // 2 + (n % 2 if label == 1 else 0)
        keep += rng.permutation(members)[:want].tolist()
    return [samples[i] for i in sorted(keep)]


def write_manifest(path: Path, samples: list[Sample]) -> Path:
    """A ``path,label,generator`` CSV with absolute paths (i2p-train's --data/--val read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "generator"])
        writer.writerows([Path(s.path).resolve().as_posix(), s.label, s.generator] for s in samples)
    return path


def epoch_times(stamped: list[tuple[float, str]]) -> dict[str, Any]:
    """Seconds per epoch and of the validation extraction, from (time, line) pairs of a training run."""
    start = next(t for t, line in stamped if line.startswith("L* = "))
    ends = [t for t, line in stamped if EPOCH_LINE.match(line)]
    if not ends:
        raise ValueError("the run printed no 'epoch k/N:' line")
    val = [float(m.group(1)) for _, line in stamped if (m := VAL_LINE.match(line))]
    return {"epoch_s": np.diff([start, *ends]).tolist(), "val_extract_s": val[0] if val else None}


def train_once(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``i2p-train ... --json``: wall time, time-stamped progress lines, and the final metadata."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        stamped = [(time.perf_counter(), line.rstrip("\n")) for line in proc.stderr]
        proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        stdout = out.read()
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in stamped[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    meta = json.loads(stdout)
    times = epoch_times(stamped)
    return {
        "wall_s": wall,
        **times,
        "mean_epoch_s": float(np.mean(times["epoch_s"])),
        "val_auc": meta["metrics"]["val"]["mean"]["auc"],
    }


def weights_path() -> str:
    """The real CLIP ViT-B/16 weights (the shared fixture prints the path; converts once if missing)."""
    proc = subprocess.run([sys.executable, str(WEIGHTS_SCRIPT)], capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]


def train_command(
    train_csv: Path, val_csv: Path, out: Path, weights: str, epochs: int, views: int
) -> list[str]:
    args = ["--data", str(train_csv), "--val", str(val_csv), "--model", MODEL, "--pretrained", weights]
    args += ["--baseline", "--epochs", str(epochs), "--feature-views", str(views), "--batch-size", "32"]
    args += ["--workers", "1", "--device", "cpu", "--seed", "0", "--out", str(out), "--json"]
    return [sys.executable, "-m", "i2p.cli", "train", *args]


def summarize(per_epoch: dict[str, Any], one_view: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The two runs, their epoch-time ratio, and the estimate of the uncached loop's epoch."""
    val = per_epoch["val_extract_s"] or 0.0
    uncached = per_epoch["mean_epoch_s"] + val * (epochs - 1) / epochs
    return {
        f"views_{epochs}": per_epoch,
        "views_1": one_view,
        "epoch_ratio": per_epoch["mean_epoch_s"] / one_view["mean_epoch_s"],
        "wall_ratio": per_epoch["wall_s"] / one_view["wall_s"],
        "uncached_estimate_mean_epoch_s": uncached,
        "uncached_estimate_ratio": uncached / one_view["mean_epoch_s"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--work", type=Path, default=None, help="Manifests and run directories (default: a temp dir)."
    )
    ap.add_argument("--data", type=Path, default=SID_MINI)
    ap.add_argument(
        "--weights", help="open_clip ViT-B/16 weights (default: ../shared/fixtures/clip_vit_b16.py)."
    )
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--val", type=int, default=72)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.epochs < 2:
        ap.error("--epochs must be >= 2 (one view per epoch against one reused view)")
    work = a.work or Path(tempfile.mkdtemp(prefix="perf-baseline-"))
    train_csv = write_manifest(work / "train.csv", draw(discover(a.data / "train"), a.train, a.seed))
    val_csv = write_manifest(work / "val.csv", draw(discover(a.data / "val"), a.val, a.seed))
    weights = a.weights or weights_path()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    runs = {}
    for views in (a.epochs, 1):
        out = work / f"views{views}"
        cmd = train_command(train_csv, val_csv, out, weights, a.epochs, views)
        runs[views] = train_once(cmd, env)
        runs[views]["command"] = " ".join(["i2p-train", *cmd[4:]])
        print(
            f"--feature-views {views}: {runs[views]['mean_epoch_s']:.1f} s/epoch", file=sys.stderr, flush=True
        )
    result = {
        "model": MODEL,
        "train_images": a.train,
        "val_images": a.val,
        "epochs": a.epochs,
        "threads": a.threads,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg": os.getloadavg(),
        **summarize(runs[a.epochs], runs[1], a.epochs),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
