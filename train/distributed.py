"""Where a training process runs: its device, its DDP rank and world size, and rank-aware output.

The same code runs in one process or under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPU); only rank 0
prints, shows progress bars and writes files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from i2p.base.progress import Progress, write


@dataclass
class Placement:
    """Where this process runs: device and DDP rank/world size (world 1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> Placement:
    """The device (``auto`` picks CUDA when present) and, under torchrun, the process group."""
    if device_name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_name)
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Placement(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Placement(device, dist.get_rank(), dist.get_world_size())


def say(rt: Placement, msg: str) -> None:
    """A line on rank 0 that does not break a running progress bar."""
    if rt.main:
        write(msg)


def progress(rt: Placement, iterable: Iterable | None, **kw: Any) -> Progress:
    """Progress on rank 0: a bar on a terminal, heartbeat lines with rate and ETA in a log."""
    return Progress(iterable, enabled=rt.main, **kw)


def batch_is_empty(n: int, rt: Placement) -> bool:
    """Skip a step on every rank together: one rank skipping alone would hang DDP's all-reduce."""
    if rt.world == 1:
        return n == 0
    flag = torch.tensor([float(n == 0)], device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def broadcast_json(rt: Placement, value: Any) -> Any:
    """Rank 0's JSON-serializable ``value`` on every rank (UTF-8 bytes in a tensor: no pickle)."""
    if rt.world == 1:
        return value
    data = json.dumps(value).encode() if rt.main else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=rt.device)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=rt.device)
    if rt.main:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def broadcast_tensors(rt: Placement, tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite every rank's ``tensors`` (same shapes everywhere, on ``rt.device``) with rank 0's."""
    if rt.world == 1:
        return
    for t in tensors:
        dist.broadcast(t, src=0)
