"""What a resumed run needs besides the model: optimizer moments, schedule position, epoch — without pickle.

The moments are tensors (stored under ``resume.`` in the checkpoint); the rest is the small JSON
``ResumeInfo`` of the checkpoint metadata.
"""

from __future__ import annotations

import math

import torch

from .backbone import tensor_problem
from .checkpoint import RESUME, Checkpoint
from .config import TrainConfig
from .metadata import CheckpointError, ResumeInfo

OPTIM = "optim."
SCHEDULE_KEYS = ("base_lrs", "last_epoch", "_last_lr")  # what a resumed schedule needs


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
    """Put the stored optimizer and schedule back, once checked to fit; returns the first epoch still to run."""
    info = ckpt.meta.resume
    if info is None:
        raise CheckpointError(f"{ckpt.path}: no resume state (epoch, optimizer, schedule) to continue from")
    state, problems = _stored_state(optimizer, ckpt.section(RESUME + OPTIM), info.optimizer_steps)
    problems += _schedule_problems(scheduler.state_dict(), info.scheduler)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(
            f"{ckpt.path}: the run in {ckpt.path.parent} cannot be resumed: its optimizer state does not "
            f"fit the model being trained ({'; '.join(problems[:5])}{more}). Start over with another --out"
        )
    try:
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        scheduler.load_state_dict(info.scheduler)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt.path}: its resume state does not fit this run ({e})") from e
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # the scheduler's state does not carry the optimizer's current rate
    return info.epoch + 1


def _moment_names(optimizer: torch.optim.Optimizer) -> set[str]:
    """The per-parameter tensors AdamW keeps (the training loop's optimizer)."""
    amsgrad = any(group.get("amsgrad") for group in optimizer.param_groups)
    return {"exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else [])}


def _stored_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], steps: dict[str, float]
) -> tuple[dict[int, dict[str, torch.Tensor]], list[str]]:
    """The optimizer state a checkpoint stores, and every way it does not fit ``optimizer``'s parameters.

    No state at all is a run that took no step yet; otherwise every parameter has each moment, of its
    own shape, finite (the second moments not negative), and a whole, finite step count.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names, problems, foreign = _moment_names(optimizer), [], []
    state: dict[int, dict[str, torch.Tensor]] = {}
    entries = [(key, "tensor", value) for key, value in tensors.items()]
    entries += [(f"{key}.step", "step", value) for key, value in steps.items()]
    for key, kind, value in entries:
        idx, _, name = key.partition(".")
        if not (idx.isascii() and idx.isdigit()) or int(idx) >= len(params) or name not in (names | {"step"}):
            foreign.append(f"{RESUME}{OPTIM}{key}")
            continue
        param = params[int(idx)]
        if kind == "step":
            if not (
                isinstance(value, (int, float))
                and math.isfinite(value)
                and value >= 0
                and value == int(value)
            ):
                problems.append(f"parameter {idx} has step count {value!r}, not a whole number >= 0")
                continue
            value = torch.tensor(float(value))
        elif (why := tensor_problem(value)) is not None:
            problems.append(f"{RESUME}{OPTIM}{key} {why}")
            continue
        elif value.shape != param.shape:
            problems.append(
                f"{RESUME}{OPTIM}{key} has shape {tuple(value.shape)}, parameter {idx} {tuple(param.shape)}"
            )
            continue
        elif name != "exp_avg" and bool((value < 0).any()):
            problems.append(f"{RESUME}{OPTIM}{key} has negative values (a second moment cannot)")
            continue
        state.setdefault(int(idx), {})[name] = value
    if foreign:  # the state of a model with other parameters (another adapter, a longer head) comes first
        more = "…" if len(foreign) > 3 else ""
        problems.insert(
            0,
            f"{len(foreign)} stored entries belong to no parameter of the {len(params)} being trained "
            f"({', '.join(foreign[:3])}{more})",
        )
    if state:
        for idx in range(len(params)):
            if missing := sorted((names | {"step"}) - set(state.get(idx, {}))):
                problems.append(f"parameter {idx} has no stored {', '.join(missing)}")
    return state, problems


def _schedule_problems(current: object, stored: object, where: str = "scheduler") -> list[str]:
    """Where the stored schedule state differs in structure or type from this run's (e.g. per group lists)."""
    if isinstance(current, dict):
        if not isinstance(stored, dict):
            return [f"{where} is {type(stored).__name__}, not an object"]
        # keys another torch version may lack are not required; the position in the schedule is
        missing = [f"{where}.{k} is missing" for k in SCHEDULE_KEYS if k in current and k not in stored]
        return missing + [
            p
            for k in current
            if k in stored
            for p in _schedule_problems(current[k], stored[k], f"{where}.{k}")
        ]
    if isinstance(current, list):
        if not isinstance(stored, list) or len(stored) != len(current):
            return [f"{where} must be a list of {len(current)} (one per parameter group), not {stored!r:.60}"]
        return [
            p
            for i, (c, s) in enumerate(zip(current, stored, strict=True))
            for p in _schedule_problems(c, s, f"{where}[{i}]")
        ]
    if isinstance(current, bool) or current is None or isinstance(current, str):
        return (
            []
            if type(stored) is type(current)
            else [f"{where} is {stored!r:.60}, not a {type(current).__name__}"]
        )
    if isinstance(current, (int, float)):
        number = isinstance(stored, (int, float)) and not isinstance(stored, bool) and math.isfinite(stored)
        if not number or (isinstance(current, int) and not isinstance(stored, int)):
            return [f"{where} is {stored!r:.60}, not a finite {type(current).__name__}"]
    return []


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
