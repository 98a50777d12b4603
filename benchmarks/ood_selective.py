"""Does the OOD score earn its place? Which verdicts it flags on unseen generators and perturbed copies.

    python -m benchmarks.ood_selective --pretrained ~/.cache/i2p/clip-vit-b16.safetensors \\
        --out runs/ood_selective --train-per-class 200 --val-per-class 72 --test-per-class 50

1. ``i2p-train --baseline`` (frozen CLIP ViT-B/16, linear head on cached features) on ``--train-per-class``
   images a class of sid-mini's train/ldm_sd, validated on val/ldm_sd: the checkpoint holds the OOD density
   and its threshold (the validation 95th percentile).
2. Every test image (``--test-per-class`` a class of each test generator, glide and dalle_mini, which
   training never saw) under each ``--conditions`` (evaluation/perturb.py), scored by the checkpoint's
   PyTorch model: the verdict at its threshold, and three signals of distrust:
   - ``ood``: the network's own OOD output (train/density.py);
   - ``|logit|``: low confidence, -|logit|;
   - ``views``: |p(view 1) - p(view 2)|, the disagreement of two degraded copies (JPEG 60, downscale 0.5):
     two extra passes of the network per image.
   Each signal flags an image above its validation 95th percentile (the same 5% budget on validation).
3. Per condition and signal: the share of wrong verdicts flagged, the share of right ones flagged, and the
   accuracy on the images the signal trusts most at 80% and 90% coverage (selective accuracy).

Prints a Markdown table and writes ``OUT/results.json``. The training step is kept if ``OUT`` has it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.support.provenance import git_commit
from i2p.evaluation.labels import discover
from i2p.evaluation.perturb import parse_condition
from i2p.runtime.preprocess import fit_aspect, load_image, normalize, resize_crop
from i2p.train import density
from i2p.train.checkpoint import load_model, read_checkpoint

SID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sid-mini"
VIEWS = ("jpeg:60", "resize:0.5")
SIGNALS = ("ood", "|logit|", "views")


def sample(root: Path, per_class: int, seed: int) -> list:
    out = []
    for label in (0, 1):
        chosen = [s for s in discover(root) if s.label == label]
        keep = np.sort(np.random.default_rng(seed).permutation(len(chosen))[:per_class])
        out += [chosen[i] for i in keep]
    return out


def copy_subset(samples: list, dst: Path) -> None:
    for s in samples:
        target = dst / ("0_real" if s.label == 0 else "1_fake") / Path(s.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.path, target)


@torch.no_grad()
def score(model, fitted, spec, samples: list, condition: str, batch: int = 32) -> dict[str, np.ndarray]:
    """Per image: logit, ood, and the two degraded views' probabilities, under ``condition``."""
    cond = parse_condition(condition) if condition != "clean" else None
    views = [parse_condition(v) for v in VIEWS]
    rows: dict[str, list] = {"logit": [], "ood": [], "p1": [], "p2": []}
    for i in range(0, len(samples), batch):
        imgs = []
        for s in samples[i : i + batch]:
            img = load_image(s.path).convert("RGB")
            imgs.append(cond(img) if cond else img)
        stacks = [imgs, *([v(img) for img in imgs] for v in views)]
        outs = []
        for group in stacks:
            x = torch.from_numpy(
                np.stack([normalize(np.asarray(resize_crop(fit_aspect(g), spec)), spec) for g in group])
            )
            feats = model.forward_features(x)
            outs.append((model.forward_head(feats), fitted.score(density.head_features(model, feats))))
        rows["logit"].append(outs[0][0].numpy())
        rows["ood"].append(outs[0][1].numpy())
        rows["p1"].append(torch.sigmoid(outs[1][0]).numpy())
        rows["p2"].append(torch.sigmoid(outs[2][0]).numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in rows.items()}


def signals(s: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Higher = trust less."""
    return {"ood": s["ood"], "|logit|": -np.abs(s["logit"]), "views": np.abs(s["p1"] - s["p2"])}


def selective_accuracy(distrust: np.ndarray, right: np.ndarray, coverage: float) -> float:
    keep = np.argsort(distrust, kind="stable")[: max(1, int(round(coverage * len(right))))]
    return float(right[keep].mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True)
    p.add_argument("--model", default="ViT-B-16-quickgelu")
    p.add_argument("--data", type=Path, default=SID)
    p.add_argument("--out", type=Path, default=Path("runs/ood_selective"))
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=72)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--conditions", default="clean,jpeg:75,blur:1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = args.out
    ckpt = out / "run" / "checkpoint.safetensors"
    if not ckpt.exists():
        copy_subset(sample(args.data / "train", args.train_per_class, args.seed), out / "train")
        copy_subset(sample(args.data / "val", args.val_per_class, args.seed), out / "val")
        cmd = [sys.executable, "-m", "i2p.cli", "train", "--data", str(out / "train"), "--val"]
        cmd += [str(out / "val"), "--out", str(out / "run"), "--baseline", "--model", args.model]
        cmd += ["--pretrained", args.pretrained, "--epochs", "3", "--workers", "0", "--batch-size", "32"]
        subprocess.run(cmd, check=True)
    model, meta = load_model(ckpt)
    fitted = density.stored(read_checkpoint(ckpt))
    spec, threshold = meta.preprocess, meta.threshold
    val = discover(out / "val")
    val_signals = signals(score(model, fitted, spec, val, "clean"))
    cut = {k: float(np.quantile(v, 0.95)) for k, v in val_signals.items()}
    cut["ood"] = meta.ood.threshold  # what the artifact ships (equal up to the view passes' images)
    test = []
    for gen in sorted(d.name for d in (args.data / "test").iterdir()):
        test += sample(args.data / "test" / gen, args.test_per_class, args.seed)
    labels = np.array([s.label for s in test])
    results = {}
    for condition in args.conditions.split(","):
        s = score(model, fitted, spec, test, condition)
        right = ((1 / (1 + np.exp(-s["logit"])) >= threshold).astype(int) == labels).astype(float)
        row = {"accuracy": float(right.mean()), "n": len(right), "wrong": int((right == 0).sum())}
        for name, distrust in signals(s).items():
            flagged = distrust > cut[name]
            row[name] = {
                "wrong_flagged": float(flagged[right == 0].mean()) if (right == 0).any() else None,
                "right_flagged": float(flagged[right == 1].mean()) if (right == 1).any() else None,
                "sel_acc_90": selective_accuracy(distrust, right, 0.9),
                "sel_acc_80": selective_accuracy(distrust, right, 0.8),
            }
        results[condition] = row
        print(condition, json.dumps(row), flush=True)
    commit = git_commit()
    record = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "args": vars(args) | {"data": str(args.data), "out": str(out)},
        "cuts": cut,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(table(results))


def table(results: dict) -> str:
    lines = [
        "| condition | acc | wrong | signal | wrong flagged | right flagged | sel. acc @90% | sel. acc @80% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cond, row in results.items():
        for name in SIGNALS:
            r = row[name]
            f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(
                f"| {cond} | {row['accuracy']:.3f} | {row['wrong']}/{row['n']} | {name} | {f(r['wrong_flagged'])} | "
                f"{f(r['right_flagged'])} | {f(r['sel_acc_90'])} | {f(r['sel_acc_80'])} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
