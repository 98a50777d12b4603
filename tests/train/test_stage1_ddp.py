"""Stage 1 under DDP runs once, on rank 0; every rank gets the same profile and probe (gloo, 2 CPU processes)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from i2p.train import importance, stages
from i2p.train.backbone import load_backbone
from i2p.train.distributed import Placement

WIDTH = 64  # i2p-tiny-vit's width


def _profile() -> importance.ImportanceProfile:
    scores = tuple(importance.LayerScore(i, 0.1 * i, 0.5 + 0.1 * i, 0.7, 0.2 * i) for i in (1, 2, 3))
    return importance.ImportanceProfile(scores, 2, "auto", 0.05, 10, 10)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []

    def perceive(cfg, tower, spec, splits, rt):  # stands in for the full-tower passes
        calls.append(rt.rank)
        torch.manual_seed(7)
        return _profile(), torch.nn.Linear(WIDTH, 1).requires_grad_(False)

    stages.perceive = perceive
    tower, _ = load_backbone("i2p-tiny-vit", "none", seed=0)  # a real tower: ranks > 0 size the probe from it
    profile, probe = stages.perceive_once(
        None, tower, None, None, Placement(torch.device("cpu"), rank, world)
    )
    Path(out, f"{rank}.json").write_text(
        json.dumps(
            {
                "calls": calls,
                "profile": profile.to_dict(),
                "probe": probe.weight.tolist() + [probe.bias.tolist()],
            }
        )
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_stage1_is_computed_on_rank_0_and_broadcast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"] == [0] and r1["calls"] == []
    assert r1["profile"] == r0["profile"] == json.loads(json.dumps(_profile().to_dict()))
    assert r1["probe"] == r0["probe"]
