"""What a sweep says about single verdicts: which ones flip when only the delivery changes (a re-save, EXIF
stripped, a small resize: ``i2p eval --shortcuts``), and which ones the artifact flags uncertain (its
out-of-distribution output), among the wrong verdicts and the right ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from i2p.base.tables import format_table

from .perturb import CLEAN

if TYPE_CHECKING:  # robustness reports these shares in SweepResult.to_dict, so it imports this module
    from .robustness import SweepResult


@dataclass(frozen=True)
class UncertainShare:
    """How many verdicts of one condition the artifact flags uncertain (ood above its threshold): overall,
    per generator, and among the wrong verdicts vs the right ones (a useful flag catches the first)."""

    condition: str
    n: int
    flagged: float  # share of all scored images
    per_generator: dict[str, float]
    wrong: float  # share of the wrong verdicts (at the sweep's threshold) flagged; NaN with none wrong
    right: float
    n_wrong: int

    def to_dict(self) -> dict[str, Any]:
        return _json(self)


def uncertain_shares(result: SweepResult) -> list[UncertainShare]:
    """Per condition whose scores carry uncertain flags (an artifact with the OOD output): the shares flagged."""
    out = []
    for name, s in result.scores.items():
        if s.uncertain is None:
            continue
        flags = s.uncertain.astype(bool)
        wrong = (s.probabilities >= result.threshold) != s.labels.astype(bool)
        gens = np.asarray(s.generators, dtype=object)
        out.append(
            UncertainShare(
                name,
                len(flags),
                _mean(flags),
                {g: _mean(flags[gens == g]) for g in sorted(set(s.generators))},
                _mean(flags[wrong]),
                _mean(flags[~wrong]),
                int(wrong.sum()),
            )
        )
    return out


def uncertain_table(shares: Sequence[UncertainShare]) -> str:
    """One row per condition: the share flagged overall, per generator, among wrong and right verdicts."""
    return format_table(
        [
            {
                "condition": s.condition,
                "n": s.n,
                "uncertain": s.flagged,
                **s.per_generator,
                "of wrong": s.wrong,
                "of right": s.right,
                "wrong": s.n_wrong,
            }
            for s in shares
        ]
    )


@dataclass(frozen=True)
class ShortcutEffect:
    """How much one change of delivery (a re-save, EXIF stripped, a small resize) moves the verdicts."""

    condition: str
    n: int  # images scored both clean and under the condition
    flip_rate: float  # share whose verdict (probability >= threshold) changed
    flip_rate_real: float  # among reals: new false positives and fixed ones
    flip_rate_fake: float
    mean_abs_delta: float  # mean |probability - clean probability|
    max_abs_delta: float

    def to_dict(self) -> dict[str, Any]:
        return _json(self)


def shortcut_effects(result: SweepResult, conditions: Sequence[str]) -> list[ShortcutEffect]:
    """Per condition: the verdict flip rate and mean |Δprobability| against the clean scores of the same
    images (paired by path; an image unreadable in either is left out)."""
    clean = result.scores[CLEAN.name]
    base = dict(zip(clean.paths, clean.probabilities, strict=True))
    labels = dict(zip(clean.paths, clean.labels, strict=True))
    out = []
    for name in conditions:
        got = result.scores[name]
        paired = [
            (base[p], q, labels[p]) for p, q in zip(got.paths, got.probabilities, strict=True) if p in base
        ]
        before, after, y = (np.array(v, dtype=np.float64) for v in zip(*paired, strict=True)) if paired else (
            np.empty(0), np.empty(0), np.empty(0))  # fmt: skip
        flips = (before >= result.threshold) != (after >= result.threshold)
        delta = np.abs(after - before)
        out.append(
            ShortcutEffect(
                name,
                len(paired),
                _mean(flips),
                _mean(flips[y == 0]),
                _mean(flips[y == 1]),
                _mean(delta),
                float(delta.max()) if len(delta) else math.nan,
            )  # fmt: skip
        )
    return out


def _json(share: UncertainShare | ShortcutEffect) -> dict[str, Any]:
    """The fields as JSON: an undefined share (NaN, e.g. of no wrong verdicts) is null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in share.__dict__.items()}


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan


def shortcut_table(effects: Sequence[ShortcutEffect]) -> str:
    return format_table(
        [
            {
                "change": e.condition,
                "n": e.n,
                "flip rate": e.flip_rate,
                "flips reals": e.flip_rate_real,
                "flips fakes": e.flip_rate_fake,
                "mean |Δp|": e.mean_abs_delta,
                "max |Δp|": e.max_abs_delta,
            }
            for e in effects
        ]
    )
