"""The ablation in one command: (a) UnivFD, (b) L* head, (c) I2P subspace, (d) LoRA, (e) full fine-tuning.

    python -m benchmarks.ablation --data ../shared/data/sid-mini --out runs/ablation

Same backbone (real CLIP ViT-B/16), data, seed and L* for every recipe; each row gives trainable
parameters, wall time, and test metrics clean and under the sweep. Two protocols, because two shared
CPU cores cannot train five recipes on the whole set:

* (a), (b): logistic probes on cached frozen features (``benchmarks.ablation_features`` +
  ``benchmarks.ablation_probes``), all of sid-mini/train, every test image; exact for a frozen tower.
* (c), (d), (e): ``i2p train --adapter subspace|lora|full`` on class-balanced subsets of train and val
  (``--train-per-class``, ``--val-per-class``), ``--epochs``, fixed ``--layer`` (stage 1 then only
  warm-starts the head), evaluated by ``i2p eval --perturb`` on a class-balanced test subset
  (``--test-per-class`` per generator). (b) is trained the same way (``--rank 0``) as the reference
  for this reduced protocol.

Results land in ``<out>/ablation.json``; the markdown table is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from i2p.evaluation.labels import discover

RECIPES = {  # name -> i2p train options (learning rates: each method's usual one)
    "b_head_only": ["--rank", "0", "--lr", "1e-3"],
    "c_i2p_subspace": ["--adapter", "subspace", "--rank", "16", "--lr", "1e-3"],
    "d_lora": ["--adapter", "lora", "--rank", "16", "--lr", "1e-3"],
    "e_full_ft": ["--adapter", "full", "--lr", "1e-5"],
}
EVAL_PERTURB = ["jpeg:75", "resize:0.5+jpeg:90"]


def balanced_csv(root: Path, per_class: int, path: Path, seed: int = 0) -> Path:
    """A CSV manifest of ``per_class`` images per (generator, label) of ``root``, drawn by seed."""
    samples = discover(root)
    rng = np.random.default_rng(seed)
    rows = []
    for key in sorted({(s.generator, s.label) for s in samples}):
        members = [s for s in samples if (s.generator, s.label) == key]
        rows += [members[i] for i in sorted(rng.permutation(len(members))[:per_class])]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "generator"])
        w.writerows([str(s.path.resolve()), s.label, s.generator] for s in rows)
    return path


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with output to ``log``; returns wall seconds; raises with the log's tail on failure."""
    t0 = time.time()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); {log}:\n" + "\n".join(tail))
    return time.time() - t0


def train_and_eval(name: str, a: argparse.Namespace, train_csv: Path, val_csv: Path, test_csv: Path) -> dict:
    out = a.out / name
    ckpt = out / "checkpoint.safetensors"
    i2p = [str(Path(sys.executable).parent / "i2p")]  # the console script of this environment
    if not (out / "metrics.json").exists():
        cmd = [*i2p, "train", "--data", str(train_csv), "--val", str(val_csv), "--model", a.model,
               "--pretrained", a.pretrained, "--layer", str(a.layer), "--layer-rule", "clean", "--epochs", str(a.epochs),
               "--batch-size", str(a.batch_size), "--workers", "1", "--seed", "0", "--calib-size",
               str(a.calib_size), "--out", str(out), *RECIPES[name]]  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        run(cmd, out / "train.log")
    perturb = [x for c in EVAL_PERTURB for x in ("--perturb", c)]
    if not (out / "test.json").exists():
        cmd = [*i2p, "eval", "--ckpt", str(ckpt), "--data", str(test_csv), "--workers", "1", *perturb,
               "--json", "--plot", str(out / "sweep.png")]  # fmt: skip
        with (out / "test.json").open("w") as f:
            subprocess.run(cmd, stdout=f, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "parameters": metrics["parameters"],
        "wall_time_s": metrics["wall_time_s"],
        "test": json.loads((out / "test.json").read_text()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/sid-mini"))
    ap.add_argument("--model", default="ViT-B-16-quickgelu")
    ap.add_argument("--pretrained", default=str(Path("~/.cache/i2p/clip-vit-b16.safetensors").expanduser()))
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--layer", type=int, required=True, help="L* for every recipe (the default rule's pick)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--train-per-class", type=int, default=64)
    ap.add_argument("--val-per-class", type=int, default=72)
    ap.add_argument("--test-per-class", type=int, default=25)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    a = ap.parse_args()
    train_csv = balanced_csv(a.data / "train", a.train_per_class, a.out / "train_subset.csv")
    val_csv = balanced_csv(a.data / "val", a.val_per_class, a.out / "val_subset.csv")
    test_csv = balanced_csv(a.data / "test", a.test_per_class, a.out / "test_subset.csv")
    results = {}
    for name in a.recipes.split(","):
        results[name] = train_and_eval(name, a, train_csv, val_csv, test_csv)
        (a.out / "ablation.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))


def markdown(results: dict) -> str:
    conds = ["clean", *EVAL_PERTURB]
    lines = [
        "| recipe | trainable params | wall s | " + " | ".join(f"AUC {c}" for c in conds)
        + " | TPR@5%FPR clean | acc real/fake clean |",
        "|" + "---|" * (5 + len(conds)),
    ]  # fmt: skip
    for name, r in results.items():
        cs = r["test"]["conditions"]
        mean = {c: cs[c]["metrics"]["mean"] for c in conds}
        lines.append(
            f"| {name} | {r['parameters']['trainable']:,} | {r['wall_time_s']:.0f} | "
            + " | ".join(f"{mean[c]['auc']:.3f}" for c in conds)
            + f" | {mean['clean']['tpr_5pct_fpr']:.3f} | {mean['clean']['acc_real']:.3f} / {mean['clean']['acc_fake']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
