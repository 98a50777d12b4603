"""Measured cost of one model per backbone family (issue 23 item 4), random weights, CPU.

    .venv/bin/python -m benchmarks.perf_families --out /tmp/families.jsonl [--models A,B] [--quick]

For each model at its default input size, one JSON line in ``--out``:

- ``params``: parameters of the image tower (random init through ``load_backbone``);
- for L* = N/2 and L* = N (N = the tower's blocks): a checkpoint with random weights and rank-4 subspace
  deltas (``benchmarks.support.checkpoints.make_checkpoint``, the code training uses), exported to FP32
  ONNX only (``run_export``: no model.cpu.onnx, no INT8, no engine) with the export's wall time and the
  ONNX size, then images/s of the artifact through ``Detector.predict_batch`` (ONNX Runtime CPU,
  ``--threads`` threads) on random input of the right size, batch 1 and 8, median of ``--repeats``;
- ``train``: one training step of I2P's subspace mode (``benchmarks/perf_train.py``, i2p-train's step)
  at L* = N/2, batch ``--train-batch``, in its own process: its peak RSS with the model and batch in memory (``VmHWM``) and step time.

Resumable: a model whose line is already in ``--out`` is skipped, so a slow machine can run it in parts.
``--quick`` measures the small variant of each family instead of the default one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Entry:
    family: str  # the family as the docs name it
    model: str  # the name i2p-train --model takes
    quick: str  # the small variant --quick measures


# Fastest first, so a run cut short still covers the most families. DINOv2's default is the small model:
# at 518 px (1,369 tokens) the base model's export and throughput runs take too long on 2 shared cores.
ENTRIES: tuple[Entry, ...] = (
    Entry("CLIP (open_clip ViT)", "ViT-B-16", "ViT-S-16"),
    Entry("SigLIP 2", "ViT-B-16-SigLIP2", "ViT-B-32-SigLIP2-256"),
    Entry("PE-Core", "PE-Core-B-16", "PE-Core-T-16-384"),
    Entry("EVA-02", "eva02_base_patch14_224", "eva02_small_patch14_224"),
    Entry("DINOv3", "vit_base_patch16_dinov3", "vit_small_patch16_dinov3"),
    Entry("DINOv2", "vit_small_patch14_dinov2", "vit_small_patch14_dinov2"),
    Entry("DINOv2 with registers", "vit_small_patch14_reg4_dinov2", "vit_small_patch14_reg4_dinov2"),
)
BATCHES = (1, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, required=True, help="JSON lines file; models already in it are skipped"
    )
    ap.add_argument("--models", default=None, help="comma-separated model names (default: one per family)")
    ap.add_argument("--quick", action="store_true", help="the small variant of each family")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median reported)")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--table", action="store_true", help="print --out as the docs' Markdown table; measure nothing"
    )
    args = ap.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.train_batch < 1:
        ap.error("--threads, --repeats and --train-batch must be >= 1")
    args.model_list = chosen_models(args.models, args.quick)
    return args


def chosen_models(models: str | None, quick: bool) -> list[str]:
    """The models to measure, in order: --models as given, else one per family (small ones with quick)."""
    if models is None:
        return [e.quick if quick else e.model for e in ENTRIES]
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise SystemExit("--models names no model")
    return list(dict.fromkeys(names))


def family_of(model: str) -> str:
    """The family name the docs use for ``model`` (its library family when it is none of ENTRIES)."""
    for entry in ENTRIES:
        if model in (entry.model, entry.quick):
            return entry.family
    return "other"


def done_models(out: Path) -> set[str]:
    """Models whose line is in ``out`` already; a torn last line (a run killed mid-write) is ignored."""
    return {row["model"] for row in read_rows(out)}


def run(
    models: Iterable[str],
    out: Path,
    measure: Callable[[str], dict[str, Any]],
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Measure each model not yet in ``out`` and append its line; return the models measured now.

    A model that fails gets a line with its error (so a rerun skips it too: delete the line to retry)."""
    done = done_models(out)
    measured = []
    for model in models:
        if model in done:
            echo(f"{model}: already in {out}, skipped")
            continue
        t0 = time.perf_counter()
        try:
            row = measure(model)
        except Exception as e:  # one model's failure is recorded, the others still run
            row = {"model": model, "error": f"{type(e).__name__}: {e}"}
        row = {
            "model": model,
            "family": family_of(model),
            **row,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        torn = out.exists() and out.stat().st_size and not out.read_bytes().endswith(b"\n")
        with out.open("a") as f:  # after a torn last line (a killed run), the new line starts its own
            f.write(("\n" if torn else "") + json.dumps(row) + "\n")
        echo(json.dumps(row))
        measured.append(model)
    return measured


COLUMNS = (
    "family",
    "model",
    "params (M)",
    "input",
    "L* = N/2, N",
    "export s",
    "ONNX MB",
    "images/s batch 1",
    "images/s batch 8",
    "train peak RSS MB",
    "train step s",
)


def table(rows: Iterable[dict[str, Any]]) -> str:
    """The Markdown table of docs/performance.md: one row per model, "N/2 value / N value" cells."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            cells = [row["family"], f"`{row['model']}`", f"failed: {row['error']}"] + [""] * (
                len(COLUMNS) - 3
            )
        else:
            layers = sorted({max(1, row["layers"] // 2), row["layers"]})
            per = [row[f"L{n}"] for n in layers]

            def pair(key: str, per: list[dict] = per) -> str:  # 3 significant digits, thousands separated
                return " / ".join(f"{float(f'{p[key]:.3g}'):,g}" for p in per)

            train = row["train"]
            cells = [
                row["family"],
                f"`{row['model']}`",
                f"{row['params'] / 1e6:.1f}",
                f"{row['input_size']} px",
                " / ".join(str(n) for n in layers),
                pair("export_s"),
                pair("onnx_mb"),
                pair("images_per_s_b1"),
                pair("images_per_s_b8"),
                f"{train['peak_rss_mb']:,}",
                f"{train['step_s']}",
            ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def read_rows(out: Path) -> list[dict[str, Any]]:
    """The measured lines of ``out`` (torn or foreign lines skipped, as ``done_models`` does)."""
    rows = []
    for line in out.read_text().splitlines() if out.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("model"), str):
            rows.append(row)
    return rows


def measure(model: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every figure of one model (see the module docstring)."""
    from i2p.train.backbone import load_backbone

    tower, info = load_backbone(model, "none", seed=0)
    params = sum(p.numel() for p in tower.parameters())
    from i2p.train import backbones

    family = backbones.for_tower(tower)
    layers, size = len(family.blocks(tower)), family.image_size(tower)
    del tower
    row: dict[str, Any] = {
        "library_family": info.family,
        "pool": info.pool,
        "params": params,
        "layers": layers,
        "input_size": size,
        "threads": args.threads,
    }
    for layer in sorted({max(1, layers // 2), layers}):
        row[f"L{layer}"] = export_and_time(model, layer, size, args, work / f"{model}_L{layer}")
    row["train"] = train_step(model, max(1, layers // 2), args)
    return row


def export_and_time(model: str, layer: int, size: int, args: argparse.Namespace, folder: Path) -> dict:
    import numpy as np

    from benchmarks.support.checkpoints import make_checkpoint
    from i2p.export.options import ExportOptions
    from i2p.export.pipeline import run_export
    from i2p.runtime.detector import Detector

    ckpt = make_checkpoint(folder, layer=layer, backbone=model)
    artifact = folder / "artifact.i2p"
    t0 = time.perf_counter()
    run_export(
        ExportOptions(ckpt=ckpt, out=artifact, cpu=False, int8=False, engine="no", force=True),
        echo=lambda _: None,
    )
    export_s = time.perf_counter() - t0
    onnx_bytes = sum(p.stat().st_size for p in artifact.iterdir() if ".onnx" in p.name)
    result: dict[str, Any] = {"export_s": round(export_s, 1), "onnx_mb": round(onnx_bytes / 2**20, 1)}
    rng = np.random.default_rng(0)
    with Detector(artifact, backend="onnxruntime", threads=args.threads, batch_size=max(BATCHES)) as det:
        result["precision"] = det.backend.precision
        for batch in BATCHES:
            x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
            det.predict_batch(x)  # warm-up
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                det.predict_batch(x)
                times.append(time.perf_counter() - t)
            median = float(np.median(times))
            result[f"images_per_s_b{batch}"] = round(batch / median, 3)
    shutil.rmtree(folder, ignore_errors=True)  # ViT-B checkpoints and ONNX files are ~0.7 GB per layer
    return result


def train_step(model: str, layer: int, args: argparse.Namespace) -> dict[str, Any]:
    """One subspace training step in its own process: its peak RSS from the model built on (VmHWM)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.perf_train",
        "--mode=subspace",
        f"--model={model}",
        f"--layer={layer}",
        "--rank=16",
        f"--batch={args.train_batch}",
        "--steps=1",
        "--warmup=0",
        f"--threads={args.threads}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_train.py exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    step = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "layer": layer,
        "batch": args.train_batch,
        "rank": 16,
        "step_s": round(step["step_s"][0], 2),
        "peak_rss_mb": round(step["peak_rss_mb"]),
        "trainable_parameters": step["trainable_parameters"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print(table(read_rows(args.out)))
        return
    import torch

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="i2p-perf-families-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(args.model_list, args.out, lambda m: measure(m, args, work))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
