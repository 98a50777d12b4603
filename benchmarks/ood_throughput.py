"""What the OOD output costs i2p-detect: images/s of two artifacts of one checkpoint, with and without it.

    python -m benchmarks.ood_throughput --ckpt runs/x/checkpoint.safetensors --images DIR --out runs/ood_tp \\
        [--count 64] [--repeats 5]

1. ``OUT/no_ood.safetensors``: the checkpoint without its density (the ``ood.*`` tensors and ``meta.ood``
   dropped; the network is the same).
2. ``i2p-export --engine no --no-int8`` of both (FP32, model.cpu.onnx: what ``i2p-detect`` runs on a CPU).
3. ``i2p-detect`` (a subprocess, as a user runs it) on the same ``--count`` images with each artifact,
   alternating ``--repeats`` times (A B, B A, A B, ...) so the drift of a shared machine falls on both;
   images/s from the command's own ``--json`` summary. Prints the medians and their ratio as JSON, also in
   ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from benchmarks.support.provenance import git_commit
from i2p.runtime.sources import iter_images
from i2p.train.checkpoint import read_checkpoint
from i2p.train.density import PREFIX

BIN = Path(sys.executable).parent  # the environment's console scripts: i2p-export, i2p-detect


def strip_density(ckpt: Path, out: Path) -> Path:
    """The checkpoint without its OOD density: the export then has no ood output."""
    meta = dataclasses.replace(read_checkpoint(ckpt).meta, ood=None)
    tensors = {k: v for k, v in load_file(ckpt).items() if not k.startswith(PREFIX)}
    save_file(tensors, out, metadata={"i2p": meta.to_json()})
    return out


def export(ckpt: Path, out: Path) -> Path:
    if not (out / "manifest.json").exists():
        cmd = [str(BIN / "i2p-export"), "--ckpt", str(ckpt), "--out", str(out)]
        subprocess.run([*cmd, "--engine", "no", "--no-int8", "--samples", "4"], check=True)
    return out


def detect_rate(artifact: Path, folder: Path, workers: int) -> float:
    """images/s of one ``i2p-detect --json`` run: its summary's files / seconds (the scoring loop, not the
    model load; its images_per_s is rounded to 0.1)."""
    cmd = [str(BIN / "i2p-detect"), str(folder), "-m", str(artifact), "--json"]
    done = subprocess.run([*cmd, "--workers", str(workers)], check=True, capture_output=True)
    summary = json.loads(done.stderr.decode().strip().splitlines()[-1])  # rows on stdout, summary on stderr
    if summary["errors"]:
        raise RuntimeError(f"{artifact}: {summary['errors']} images failed; the rates would not compare")
    return summary["files"] / summary["seconds"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="a checkpoint with the OOD density")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("runs/ood_throughput"))
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if read_checkpoint(args.ckpt).meta.ood is None:
        sys.exit(f"{args.ckpt}: no OOD density in this checkpoint")
    plain = strip_density(args.ckpt, args.out / "no_ood.safetensors")
    artifacts = {
        "ood": export(args.ckpt, args.out / "ood.i2p"),
        "no_ood": export(plain, args.out / "no_ood.i2p"),
    }
    files = sorted(iter_images([args.images], recursive=True))[: args.count]
    folder = args.out / "images"  # the same files for both, as one folder argument
    folder.mkdir(exist_ok=True)
    for i, f in enumerate(files):
        (folder / f"{i:05d}{Path(f).suffix}").write_bytes(Path(f).read_bytes())
    rates: dict[str, list[float]] = {k: [] for k in artifacts}
    for r in range(args.repeats):
        for name in list(artifacts)[:: 1 if r % 2 == 0 else -1]:
            rates[name].append(detect_rate(artifacts[name], folder, args.workers))
            print(name, f"{rates[name][-1]:.3f} img/s", flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    commit = git_commit()
    record = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "images": len(files),
        "rates": rates,
        "median": median,
        "ratio_ood_over_no_ood": median["ood"] / median["no_ood"],
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
