"""Cache the frozen backbone's CLS token after every block, per split and per perturbation, once.

The layer-rule study, the linear-probe recipes (UnivFD baseline, L* head only) and their robustness
tables need only these features, so the expensive part (a ViT forward per image and condition) runs
once and every later analysis is seconds of numpy:

    python -m benchmarks.ablation_features --data ../shared/data/sid-mini \\
        --pretrained ~/.cache/i2p/clip-vit-b16.safetensors --out runs/features

Writes ``<out>/<split>/<condition>.safetensors`` with ``features`` [L, N, width] (float32), ``final``
[N, embed] (CLIP's own ln_post + projection of the last block's CLS: the UnivFD feature), ``labels`` [N]
and metadata (paths, generators, model, weights sha256). Existing files are kept (resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from i2p.evaluation.perturb import Condition, parse_condition
from i2p.runtime.preprocess import load_image, normalize, resize_crop
from i2p.train.backbone import load_backbone, preprocess_spec
from i2p.train.data import discover

SWEEP = ["jpeg:95", "jpeg:75", "jpeg:50", "resize:0.5", "blur:1", "blur:2", "social", "resize:0.5+jpeg:90"]
GOAL = ("jpeg:75", "resize:0.5+jpeg:90")  # the two goal conditions: on every test image
DEGRADE = ["jpeg:75", "resize:0.5", "blur:1"]  # what stage 1 and the augmentation study score on
# (split, condition, images per generator and class or None = all) in the order they are computed:
# what the studies need most comes first; 2 CPU cores shared by six people did 0.4-1.1 images/s,
# hence the subsets.
PLAN = [
    *[(split, "clean", None) for split in ("test", "val", "train")],
    *[("val", c, None) for c in DEGRADE],
    *[("test", c, 50) for c in GOAL],
    *[("train", c, 50) for c in DEGRADE],
    *[("test", c, 25) for c in SWEEP if c not in GOAL],
]


def subset(samples: list, n: int | None, seed: int = 0) -> list:
    """``n`` samples of every (generator, label), drawn by seed, in their original order."""
    if n is None:
        return samples
    rng = np.random.default_rng(seed)
    keep = set()
    for key in sorted({(s.generator, s.label) for s in samples}):
        members = [i for i, s in enumerate(samples) if (s.generator, s.label) == key]
        keep.update(rng.permutation(members)[:n].tolist())
    return [s for i, s in enumerate(samples) if i in keep]


def load_cached(path: Path) -> dict:
    """features, final, labels (numpy) and the metadata (generators, paths) of one cache file."""
    arrays = load_file(path)
    with safe_open(path, "np") as f:
        meta = f.metadata()
    return {**arrays, "generators": json.loads(meta["generators"]), "paths": json.loads(meta["paths"])}


@torch.no_grad()
def extract(tower, spec, samples, condition: Condition, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-block CLS [L, N, W] and the final embedding [N, E] of ``samples`` under ``condition``."""

    def load(s):
        return normalize(np.asarray(resize_crop(condition(load_image(s.path)), spec, str(s.path))), spec)

    feats, finals = [], []
    t0 = time.time()
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(samples), batch):
            x = torch.from_numpy(np.stack(list(pool.map(load, samples[start : start + batch]))))
            h = tower._embeds(x)
            per_block = []
            for block in tower.transformer.resblocks:
                h = block(h)
                per_block.append(h[:, 0].float())
            feats.append(torch.stack(per_block).numpy())
            finals.append((tower.ln_post(h[:, 0]) @ tower.proj).numpy())
            done = min(start + batch, len(samples))
            rate = done / (time.time() - t0)
            print(
                f"  {condition.name}: {done}/{len(samples)} ({rate:.1f} img/s)", file=sys.stderr, flush=True
            )
    return np.concatenate(feats, axis=1), np.concatenate(finals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/sid-mini"))
    ap.add_argument("--model", default="ViT-B-16-quickgelu")
    ap.add_argument("--pretrained", default=str(Path("~/.cache/i2p/clip-vit-b16.safetensors").expanduser()))
    ap.add_argument("--out", type=Path, default=Path("runs/features"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tower, info = load_backbone(a.model, a.pretrained)
    for split, text, n in PLAN:
        samples = subset(discover(a.data / split), n)
        path = a.out / split / f"{text}.safetensors"
        if not path.exists():
            save(path, tower, info, samples, text)


def save(path: Path, tower, info, samples, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    feats, final = extract(tower, preprocess_spec(info.model), samples, parse_condition(text))
    meta = {
        "generators": json.dumps([s.generator for s in samples]),
        "paths": json.dumps([str(s.path) for s in samples]),
        "model": info.model,
        "sha256": info.sha256,
        "condition": text,
        "seconds": f"{time.time() - t0:.1f}",
    }
    labels = np.array([s.label for s in samples], dtype=np.int64)
    tmp = path.with_suffix(".part")
    save_file({"features": feats, "final": final, "labels": labels}, str(tmp), metadata=meta)
    tmp.replace(path)
    print(f"{path.parent.name}/{text}: {len(samples)} images in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
