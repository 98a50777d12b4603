"""INT8 vs FP32 of one real detector: accuracy per generator on a test set, and i2p-detect's images/s.

    .venv/bin/python -m benchmarks.perf_int8 --ckpt runs/sid-mini/c_i2p/checkpoint.safetensors \\
        --calib ../shared/data/sid-mini/val --test ../shared/data/sid-mini/test [--work DIR] [--threads 2]

1. ``i2p-export --ckpt CKPT --calib-images CALIB`` (the default export: model.cpu.onnx, and
   model.int8.onnx if its decisions on CALIB pass the gate); the gate's verdict is read from parity.json.
2. ``i2p-detect TEST -r --csv ... --json`` with ``--precision fp32`` (the fused FP32 CPU model) and with
   the default choice (INT8 when the artifact has it), alternating ``--rounds`` times: images/s from its
   own summary (median) and their ratio; from the rows, AUC, AP and accuracy at the artifact's threshold
   per generator and mean (i2p.evaluation.metrics).

Prints one JSON object (the last line); benchmarks/perf.py puts it into docs/performance.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from i2p.evaluation.metrics import evaluate
from i2p.runtime import Detector
from i2p.runtime.sources import iter_images

GOALS = {"mean_auc_delta": 0.005, "generator_auc_delta": 0.01, "speedup": 1.8}


def labelled(test: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Files of ``TEST/<generator>/{0_real,1_fake}/``, labels (1 = fake) and generator names."""
    files, labels, gens = [], [], []
    for path in sorted(iter_images([test], recursive=True)):
        rel = Path(path).relative_to(test).parts
        if len(rel) < 3 or rel[-2] not in ("0_real", "1_fake"):
            continue
        files.append(path)
        labels.append(int(rel[-2] == "1_fake"))
        gens.append(rel[0])
    return files, np.array(labels), gens


def detect(artifact: Path, test: Path, precision: str | None, threads: int, work: Path) -> tuple[float, dict]:
    """One ``i2p-detect`` run over ``test``: its images/s and the probability of every path."""
    exe = str(Path(sys.executable).with_name("i2p-detect"))
    rows = work / f"rows-{precision or 'default'}.csv"
    cmd = [exe, str(test), "-r", "--model", str(artifact), "--threads", str(threads)]
    cmd += ["--csv", str(rows), "--json"]
    cmd += ["--precision", precision] if precision else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    with open(rows, newline="") as f:
        table = list(csv.DictReader(f))
    bad = [r for r in table if r["error"]]
    if bad:
        raise RuntimeError(f"{len(bad)} test images failed, e.g. {bad[0]}")
    return float(summary["images_per_s"]), {r["path"]: float(r["probability"]) for r in table}


def accuracy(probs: dict[str, float], test: Path, threshold: float) -> dict[str, Any]:
    """AUC, AP and accuracy at ``threshold`` per generator and mean (i2p.evaluation.metrics)."""
    files, y, gens = labelled(test)
    p = np.array([probs[f] for f in files])
    metrics = evaluate(y, p, gens, threshold)
    return {
        "images": len(files),
        "metrics": {g: {"auc": m.auc, "ap": m.ap, "acc": m.acc} for g, m in metrics.items()},
        "probabilities": p,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, type=Path)
    ap.add_argument("--calib", required=True, type=Path, help="--calib-images for the export (the gate)")
    ap.add_argument("--test", required=True, type=Path, help="<generator>/{0_real,1_fake}/ test folder")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse the artifact already in --work")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="i2p-int8-"))
    work.mkdir(parents=True, exist_ok=True)
    artifact = work / f"{args.ckpt.parent.name or 'model'}.i2p"
    export = [str(Path(sys.executable).with_name("i2p-export")), "--ckpt", str(args.ckpt)]
    export += ["--out", str(artifact), "--calib-images", str(args.calib), "--engine", "no", "--force"]
    if not (args.reuse and (artifact / "manifest.json").is_file()):
        subprocess.run(export, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    parity = json.loads((artifact / "parity.json").read_text())
    int8 = [c for c in parity["comparisons"] + parity.get("rejected", []) if c["precision"] == "int8"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    kept = any(m["precision"] == "int8" for m in manifest["models"])

    threshold = manifest["threshold"]
    speed: dict[str, list[float]] = {"fp32": [], "default": []}
    probs: dict[str, dict] = {}
    for _ in range(args.rounds):  # alternate, so load on the machine hits both alike
        for name, precision in (("fp32", "fp32"), ("default", None)):
            ips, probs[name] = detect(artifact, args.test, precision, args.threads, work)
            speed[name].append(ips)
    with Detector(artifact, backend="onnxruntime", precision="fp32") as a, Detector(artifact) as b:
        models = {"fp32": a.backend.model_path.name, "default": b.backend.model_path.name}
    fp32, default = (
        accuracy(probs[k], args.test, threshold) | {"model": models[k]} for k in ("fp32", "default")
    )
    f, d = fp32["metrics"], default["metrics"]
    deltas = {g: d[g]["auc"] - f[g]["auc"] for g in f}
    p32, p8 = fp32.pop("probabilities"), default.pop("probabilities")
    result = {
        "export_command": " ".join(["i2p-export", *export[1:]]).replace(" --force", ""),
        "int8_kept": kept,
        "int8_gate": [
            {
                k: c.get(k)
                for k in ("inputs", "samples", "status", "agreement", "flips", "decisive_flips", "note")
            }
            | {f"{k}_abs_logit": (c.get("logit") or {}).get(f"{k}_abs") for k in ("max", "mean")}
            for c in int8
        ],
        "fp32": fp32,
        "default": default,
        "auc_delta": deltas,
        "test_decision_agreement": float(np.mean((p32 >= threshold) == (p8 >= threshold))),
        "test_max_abs_probability_delta": float(np.abs(p32 - p8).max()),
        "detect_images_per_s": speed,
        "speedup": float(np.median(speed["default"]) / np.median(speed["fp32"])),
        "threads": args.threads,
        "rounds": args.rounds,
    }
    gens = [g for g in deltas if g != "mean"]
    result["goals"] = {
        "mean_auc": abs(deltas["mean"]) <= GOALS["mean_auc_delta"],
        "every_generator_auc": all(abs(deltas[g]) <= GOALS["generator_auc_delta"] for g in gens),
        "speedup": result["speedup"] >= GOALS["speedup"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
