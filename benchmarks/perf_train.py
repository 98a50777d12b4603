"""Cost of one way of training the detector on the CPU: step time, peak RSS, trainable parameters.

    .venv/bin/python benchmarks/perf_train.py --mode subspace|full|probe [--model ViT-B-16-quickgelu --layer 8]

One process per configuration, so its peak RSS is its own. The step is i2p-train's (BCE on the
logit, backward, AdamW) on random images, random weights:

- ``subspace``: low-sensitivity subspace deltas of rank ``--rank`` on every linear map of blocks 1..L*
  plus the head (I2P);
- ``full``: every parameter of the same blocks plus the head (full fine-tuning of what I2P adapts);
- ``probe``: the head only, on the frozen tower (a linear probe at layer L*).

Prints one JSON object; run by benchmarks/perf.py.
"""

from __future__ import annotations

import argparse
import json
import time

import psutil
import torch
import torch.nn.functional as F

from benchmarks.support.memory import peak_rss_mb, reset_peak_rss
from i2p.train import subspace
from i2p.train.backbone import load_backbone
from i2p.train.model import I2PModel

MODES = ("subspace", "full", "probe")


def build(mode: str, model_name: str, layer: int, rank: int) -> I2PModel:
    tower, _ = load_backbone(model_name, "none")
    model = I2PModel(tower, layer)
    if mode == "subspace":
        model.add_deltas(subspace.choose_bases(model.blocks, rank))
    elif mode == "full":
        model.blocks.requires_grad_(True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--model", default="ViT-B-16-quickgelu")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.mode, args.model, args.layer, args.rank)
    model.train()
    model.tower.eval()  # as i2p-train: the frozen tower keeps dropout off
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    size = model.family.image_size(model.tower)  # any backbone family's input size
    x, y = torch.randn(args.batch, 3, size, size), torch.randint(0, 2, (args.batch,)).float()
    rss_before = psutil.Process().memory_info().rss / 2**20
    reset_peak_rss()
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    trainable, total = model.parameter_counts()
    print(
        json.dumps(
            {
                "mode": args.mode,
                "model": args.model,
                "layer": args.layer,
                "rank": args.rank if args.mode == "subspace" else None,
                "batch": args.batch,
                "threads": torch.get_num_threads(),
                "trainable_parameters": trainable,
                "total_parameters": total,
                "step_s": times,
                "rss_before_training_mb": rss_before,
                "peak_rss_mb": peak,
                "training_memory_mb": peak - rss_before,
            }
        )
    )


if __name__ == "__main__":
    main()
