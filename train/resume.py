"""What a resumed run needs besides the model: optimizer moments, schedule position, epoch — without pickle.

The moments are tensors (stored under ``resume.`` in the checkpoint); the rest is the small JSON
``ResumeInfo`` of the checkpoint metadata.
"""

from __future__ import annotations

import torch

from .checkpoint import RESUME, Checkpoint
from .config import TrainConfig
from .metadata import CheckpointError, ResumeInfo

OPTIM = "optim."


def resume_state(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int
) -> tuple[dict[str, torch.Tensor], ResumeInfo]:
    """Optimizer moments as tensors and the small rest as JSON: everything a resume needs, no pickle."""
    tensors, steps = {}, {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if key == "step":
                steps[str(idx)] = float(value)
            else:
                tensors[f"{OPTIM}{idx}.{key}"] = value
    return tensors, ResumeInfo(epoch=epoch, scheduler=scheduler.state_dict(), optimizer_steps=steps)


def restore_state(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, ckpt: Checkpoint
) -> int:
    """Put the stored optimizer and schedule back; returns the first epoch still to run."""
    info = ckpt.meta.resume
    if info is None:
        raise CheckpointError(f"{ckpt.path}: no resume state (epoch, optimizer, schedule) to continue from")
    sd = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ckpt.section(RESUME + OPTIM).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, step in info.optimizer_steps.items():
        state.setdefault(int(idx), {})["step"] = torch.tensor(step)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        scheduler.load_state_dict(info.scheduler)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt.path}: its resume state does not fit this run ({e})") from e
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # the scheduler's state does not carry the optimizer's current rate
    return info.epoch + 1


def check_resumable(ckpt: Checkpoint, cfg: TrainConfig) -> None:
    """A resumed run must use the settings that define the model and the data."""
    try:
        stored = TrainConfig.from_dict(ckpt.meta.config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: its stored training settings are malformed ({e})") from e
    changed = [k for k in TrainConfig.IDENTITY if getattr(stored, k) != getattr(cfg, k)]
    if changed:
        raise CheckpointError(
            f"{ckpt.path}: --resume with different settings {changed}; use the original ones"
        )
