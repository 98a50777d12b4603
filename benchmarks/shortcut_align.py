"""Does ``i2p-train --align`` remove a format shortcut? A deliberately biased training set, trained twice.

    python -m benchmarks.shortcut_align --pretrained "$(python ../shared/fixtures/clip_vit_b16.py)" \\
        --out runs/shortcut_align

1. From ``../shared/data/sid-mini`` (every image a 256² JPEG q95), a biased set: fakes saved as PNG from
   their decoded pixels, reals saved again as JPEG quality ``--real-quality`` (80: sid-mini's reals are
   already JPEG 95 like its fakes, so keeping their bytes would leave the classes' pixels alike and there
   would be no shortcut to learn; a second, lower-quality JPEG is what web photos carry). Train and
   validation alike, ``--train-per-class`` / ``--val-per-class`` images a class drawn at random.
2. ``i2p-train``, once as is and once with ``--align``: ``--recipe baseline`` (the default:
   ``--baseline``, frozen CLIP ViT-B/16 and a linear head on cached features, minutes on a CPU) or
   ``--recipe i2p`` (the default recipe: stage 1 picks L*, the subspace of blocks 1..L* trains; with
   ``--calib-size`` and ``--max-steps-per-epoch`` to fit a CPU). ``i2p audit`` of the training set is
   printed by both.
3. ``i2p eval --ckpt`` of both on: the test generators as sid-mini has them (AUC), and the same real test
   photos saved as PNG, as JPEG 95 and as JPEG 75 (false-positive rate at each checkpoint's threshold).

Prints a Markdown table and writes ``OUT/results.json``. Steps already done in ``OUT`` are kept.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.support.provenance import git_commit
from i2p.evaluation.labels import discover

RESAVES = {"png": ("PNG", {}), "jpeg95": ("JPEG", {"quality": 95}), "jpeg75": ("JPEG", {"quality": 75})}


def subset(samples: list, label: int, n: int, seed: int) -> list:
    chosen = [s for s in samples if s.label == label]
    keep = np.sort(np.random.default_rng(seed).permutation(len(chosen))[:n]) if n else range(len(chosen))
    return [chosen[i] for i in keep]


def save(src: Path, dst: Path, fmt: str, **options) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as img:
        img.convert("RGB").save(dst, fmt, **options)


def biased_split(src: Path, dst: Path, per_class: int, real_quality: int, seed: int) -> None:
    """Fakes as PNG, reals as JPEG ``real_quality``: the container and the compression carry the label."""
    if dst.exists():
        return
    samples = discover(src)
    for s in subset(samples, 0, per_class, seed):
        save(s.path, dst / "0_real" / f"{s.path.stem}.jpg", "JPEG", quality=real_quality)
    for s in subset(samples, 1, per_class, seed):
        save(s.path, dst / "1_fake" / f"{s.path.stem}.png", "PNG")


def test_manifest(src: Path, dst: Path, per_class: int, seed: int) -> Path:
    """One CSV: the test generators as they are (generator = its name), and their reals re-saved as
    PNG / JPEG 95 / JPEG 75 (generator = ``reals as <kind>``)."""
    manifest = dst / "test.csv"
    if manifest.exists():
        return manifest
    rows = []
    samples = discover(src)
    for g in sorted({s.generator for s in samples}):
        mine = [s for s in samples if s.generator == g]
        for label in (0, 1):
            for s in subset(mine, label, per_class, seed):
                rows.append((str(s.path.resolve()), label, g))
                if label == 0:
                    for kind, (fmt, options) in RESAVES.items():
                        out = dst / kind / g / f"{s.path.stem}.{'png' if fmt == 'PNG' else 'jpg'}"
                        save(s.path, out, fmt, **options)
                        rows.append((str(out.resolve()), 0, f"reals as {kind}"))
    dst.mkdir(parents=True, exist_ok=True)
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "generator"])
        writer.writerows(rows)
    return manifest


def i2p(*args: str, log: Path) -> str:
    """Run an ``i2p`` subcommand, its stderr (progress, warnings) to ``log``; returns its stdout."""
    with log.open("a") as err:
        done = subprocess.run(
            [sys.executable, "-m", "i2p.cli", *args], stdout=subprocess.PIPE, stderr=err, text=True
        )
    if done.returncode:
        raise SystemExit(f"i2p {' '.join(args[:2])} failed ({done.returncode}); see {log}")
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/sid-mini"))
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--model", default="ViT-B-16-quickgelu")
    ap.add_argument("--out", type=Path, default=Path("runs/shortcut_align"))
    ap.add_argument("--align", default="jpeg:60-100")
    ap.add_argument("--real-quality", type=int, default=80)
    ap.add_argument("--train-per-class", type=int, default=200, help="0: all")
    ap.add_argument("--val-per-class", type=int, default=0, help="0: all")
    ap.add_argument("--test-per-class", type=int, default=50, help="per generator and class; 0: all")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--recipe", choices=("baseline", "i2p"), default="baseline")
    ap.add_argument("--calib-size", type=int, default=512, help="--recipe i2p: stage 1's images per split")
    ap.add_argument("--max-steps-per-epoch", type=int, default=0, help="--recipe i2p: 0 = whole epochs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    data = a.out / "data"
    biased_split(a.data / "train" / "ldm_sd", data / "train", a.train_per_class, a.real_quality, a.seed)
    biased_split(a.data / "val" / "ldm_sd", data / "val", a.val_per_class, a.real_quality, a.seed)
    manifest = test_manifest(a.data / "test", data / "test", a.test_per_class, a.seed)
    audit = json.loads(i2p("audit", str(data / "train"), "--json", log=a.out / "audit.log"))
    results = {"audit_auc": audit["classifier_auc"], "audit_warnings": audit["warnings"], "runs": {}}
    recipe = ["--baseline"] if a.recipe == "baseline" else [
        "--calib-size", str(a.calib_size), "--max-steps-per-epoch", str(a.max_steps_per_epoch)]  # fmt: skip
    for name, extra in (("biased", []), (f"--align {a.align}", ["--align", a.align])):
        run = a.out / ("aligned" if extra else "plain")
        ckpt = run / "checkpoint.safetensors"
        log = a.out / f"{run.name}.log"
        if not ckpt.exists():
            i2p("train", "--data", str(data / "train"), "--val", str(data / "val"), "--model", a.model,
                "--pretrained", a.pretrained, *recipe, "--epochs", str(a.epochs), "--workers",
                str(a.workers), "--seed", str(a.seed), "--out", str(run), *extra, log=log)  # fmt: skip
        evaluation = run / "eval.json"
        if not evaluation.exists():
            out = i2p("eval", "--ckpt", str(ckpt), "--data", str(manifest), "--json", "--workers", str(a.workers),
                      log=log)  # fmt: skip
            evaluation.write_text(out)
        metrics = json.loads(evaluation.read_text())["metrics"]
        row = {f"FPR reals as {k}": 1 - metrics[f"reals as {k}"]["acc_real"] for k in RESAVES}
        row |= {
            f"AUC {g}": metrics[g]["auc"]
            for g in sorted(metrics)
            if not g.startswith("reals") and g != "mean"
        }
        row["threshold"] = json.loads(evaluation.read_text())["threshold"]
        results["runs"][name] = row
    commit = git_commit()
    results |= {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "args": vars(a) | {"out": str(a.out)},
    }
    results["args"] = {k: str(v) for k, v in results["args"].items()}
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    cols = list(next(iter(results["runs"].values())))
    print(f"training-set audit: metadata-only AUC {results['audit_auc']}")
    print("| training | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in results["runs"].items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
