"""Stage 1, critical-layer perception: how well each block's layer feature separates real from generated.

The layer feature is the CLS token (the mean patch token for a tower without one; see
``i2p.train.backbones``). Scores per block, on those features of a calibration subset (fit) and the validation images (score):

* **Fisher ratio** (training-free): mean over feature dimensions of (μ_fake − μ_real)² / (σ²_real + σ²_fake).
* **Linear-probe AUC**: a logistic regression on the LayerNorm'ed CLS token (the head's own form),
  fit on the clean calibration features and scored on validation features.
* **Degraded-probe AUC** (``rule="robust"``): the same probe scored on validation copies after the
  degradations a deployment sees (by default JPEG q75, half size, Gaussian blur σ 1; see
  ``i2p.evaluation.perturb``): a layer whose separation one JPEG re-encode destroys scores low here.

The rule for L* (``--layer auto``) is ``LAYER_RULE`` below. Every profile stores that text in the
checkpoint, so it is a constant: it changes when the rule does, never with this docstring (and
``python -OO``, which drops docstrings, stores the same).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from i2p.base.files import write_json_atomic
from i2p.base.tables import format_table
from i2p.evaluation.metrics import roc_auc

from . import backbones

LAYER_RULE = (
    "(``--layer auto``): min-max normalize the scores across layers into an importance and take\n"
    "the *shallowest* layer whose importance is within ``tolerance`` of the best. ``robust`` (the default):\n"
    "the importance is each layer's worst-case probe AUC over the clean and degraded validation copies,\n"
    "tolerance 0 (the most robust layer; ties to the shallowest). ``clean``: the mean of Fisher ratio and\n"
    "clean AUC, tolerance 0.05 (the rule before robustness was measured; it prefers middle layers, whose\n"
    "separation one JPEG re-encode erodes). docs/evaluation.md measures the rules on sid-mini."
)


@dataclass(frozen=True)
class LayerScore:
    layer: int  # 1-based block index
    fisher: float
    probe_auc: float
    probe_loss: float  # validation binary cross-entropy of the probe
    importance: float  # the combined score the rule reads
    degraded_auc: dict[str, float] = field(default_factory=dict)  # probe AUC per degraded validation copy


@dataclass(frozen=True)
class ImportanceProfile:
    scores: tuple[LayerScore, ...]
    layer: int  # the chosen L*
    mode: str  # "auto" | "last" | "fixed"
    tolerance: float
    n_calib: int
    n_val: int
    criterion: str = "clean"  # "robust" | "clean": which scores the importance averages
    # measured speed of the tower truncated after each block, relative to the whole tower (empty: not measured)
    relative_speed: tuple[float, ...] = ()

    def worst_auc(self, s: LayerScore) -> float:
        """The probe AUC that survives every degradation scored (the clean AUC without any)."""
        return min([s.probe_auc, *s.degraded_auc.values()])

    def faster_alternative(self, within: float = 0.01) -> LayerScore | None:
        """The shallowest block before L* whose worst-case AUC is within ``within`` of L*'s, else L* - 1."""
        if self.layer <= 1:
            return None
        floor = self.worst_auc(self.scores[self.layer - 1]) - within
        shallower = self.scores[: self.layer - 1]
        return next((s for s in shallower if self.worst_auc(s) >= floor), shallower[-1])

    def cost_line(self) -> str:
        """The pick and its nearest faster alternative, with the command that gets it and what it costs."""
        n = len(self.scores)
        text = f"L* = {self.layer}/{n}: keeps {100 * self.layer / n:.0f}% of the tower's blocks"
        alt = self.faster_alternative()
        if alt is None:
            return text + " (the shallowest possible)"
        delta = self.worst_auc(alt) - self.worst_auc(self.scores[self.layer - 1])
        speed = (
            f"{self.relative_speed[alt.layer - 1] / self.relative_speed[self.layer - 1]:.2f}x faster"
            if self.relative_speed
            else f"{self.layer / alt.layer:.2f}x fewer blocks"
        )
        return text + f". Faster alternative: `--layer {alt.layer}`: {speed}, worst-case AUC {delta:+.4f}"

    def to_dict(self) -> dict:
        return {**asdict(self), "rule": LAYER_RULE}

    @classmethod
    def from_dict(cls, d: dict) -> ImportanceProfile:
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        speed = tuple(fields.pop("relative_speed", ()))
        return cls(
            **{**fields, "scores": tuple(LayerScore(**s) for s in d["scores"]), "relative_speed": speed}
        )

    def save(self, out_dir: Path) -> tuple[Path, Path]:
        """layer_importance.json and layer_importance.png in ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, png_path = out_dir / "layer_importance.json", out_dir / "layer_importance.png"
        write_json_atomic(json_path, self.to_dict())
        plot(self, png_path)
        return json_path, png_path


@torch.no_grad()
def block_cls_features(
    tower: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer feature (CLS token, or mean patch token: the family's pool) after every block:
    features [L, N, width] (float32, CPU) and labels [N]."""
    family = backbones.for_tower(tower)
    feats, labels = [], []
    for x, y in batches:
        feats.append(torch.stack([t.float().cpu() for t in family.layer_features(tower, x.to(device))]))
        labels.append(y.float())
    return torch.cat(feats, dim=1), torch.cat(labels)


@torch.no_grad()
def truncated_speed(
    blocks: list[torch.nn.Module], run: Callable[[], object], repeats: int = 3
) -> tuple[float, ...]:
    """Speed of the tower cut after each block, relative to the whole tower, timed on this machine.

    One forward (``run``) is timed block by block with hooks, ``repeats`` times (median): the patch
    embedding and what follows the blocks count as fixed costs. This is the PyTorch tower on this
    machine, not the exported network; the ratios carry over because the blocks are the same.
    """
    marks: list[tuple[int, float]] = []
    hooks = [
        h
        for i, block in enumerate(blocks)
        for h in (
            block.register_forward_pre_hook(lambda *_, i=i: marks.append((i, time.perf_counter()))),
            block.register_forward_hook(lambda *_, i=i: marks.append((i, time.perf_counter()))),
        )
    ]
    runs = []
    try:
        for _ in range(repeats):
            marks.clear()
            start = time.perf_counter()
            run()
            end = time.perf_counter()
            if len(marks) != 2 * len(blocks):
                return ()  # the blocks did not all run once (stop_early, a wrapper): no honest figure
            per_block = [marks[2 * k + 1][1] - marks[2 * k][1] for k in range(len(blocks))]
            runs.append((end - start, marks[0][1] - start, per_block))
    finally:
        for h in hooks:
            h.remove()
    total, fixed, per_block = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    fixed += total - fixed - sum(per_block)  # embedding + what follows the last block
    return tuple(round(total / (fixed + sum(per_block[: k + 1])), 3) for k in range(len(blocks)))


def fisher_ratio(x: torch.Tensor, y: torch.Tensor) -> float:
    real, fake = x[y == 0].double(), x[y == 1].double()
    num = (fake.mean(0) - real.mean(0)) ** 2
    den = real.var(0, unbiased=False) + fake.var(0, unbiased=False) + 1e-12
    return float((num / den).mean())


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, steps: int = 100, normalize: bool = True
) -> torch.nn.Linear:
    """Logistic regression on F.layer_norm(x): the same function as a fresh Head, so it can warm-start one.

    ``normalize=False`` fits on ``x`` itself (the UnivFD head on CLIP's already normalized embedding).
    """
    z = F.layer_norm(x.float(), x.shape[-1:]) if normalize else x.float()
    probe = torch.nn.Linear(x.shape[1], 1)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(probe(z).squeeze(-1), y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe.requires_grad_(False)


def probe_logits(probe: torch.nn.Linear, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    return probe(F.layer_norm(x.float(), x.shape[-1:]) if normalize else x.float()).squeeze(-1)


def choose_layer(importance: list[float], tolerance: float) -> int:
    """1-based index of the shallowest layer within ``tolerance`` of the best importance."""
    best = max(importance)
    return next(i + 1 for i, v in enumerate(importance) if v >= best - tolerance)


def _minmax(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [0.0 if hi - lo < 1e-12 else (v - lo) / (hi - lo) for v in values]


DEFAULT_TOLERANCE = {"robust": 0.0, "clean": 0.05}  # in units of the normalized importance


def combine(
    criterion: str, fisher: list[float], aucs: list[float], degraded: dict[str, list[float]]
) -> list[float]:
    """Per-layer importance in [0, 1]: see the module docstring for what each criterion reads."""
    if criterion == "robust" and degraded:
        return _minmax([min(a, *(v[i] for v in degraded.values())) for i, a in enumerate(aucs)])
    return [(a + f) / 2 for a, f in zip(_minmax(aucs), _minmax(fisher), strict=True)]


def profile(
    calib: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    layer: str | int = "auto",
    tolerance: float | None = None,
    degraded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    rule: str = "robust",
) -> tuple[ImportanceProfile, torch.nn.Linear]:
    """Score every block and pick L*; also returns the probe at L* (the head's warm start).

    ``degraded`` maps a condition name to the validation features after that degradation; without
    any, the robust rule reduces to the clean one (and the profile says so). ``tolerance`` None: the
    rule's own default (``DEFAULT_TOLERANCE``).
    """
    (xc, yc), (xv, yv) = calib, val
    if len(torch.unique(yc)) < 2 or len(torch.unique(yv)) < 2:
        raise ValueError(
            "layer importance needs real and generated images in both calibration and validation"
        )
    probes = [fit_probe(xc[i], yc) for i in range(xc.shape[0])]
    fisher = [fisher_ratio(xc[i], yc) for i in range(xc.shape[0])]
    aucs, losses = [], []
    for i, probe in enumerate(probes):
        logits = probe_logits(probe, xv[i])
        aucs.append(roc_auc(yv.numpy(), logits.numpy()))
        losses.append(float(F.binary_cross_entropy_with_logits(logits, yv)))
    degraded_aucs = {
        name: [roc_auc(yd.numpy(), probe_logits(p, xd[i]).numpy()) for i, p in enumerate(probes)]
        for name, (xd, yd) in (degraded or {}).items()
    }
    criterion = "robust" if rule == "robust" and degraded_aucs else "clean"
    importance = combine(criterion, fisher, aucs, degraded_aucs)
    tolerance = DEFAULT_TOLERANCE[criterion] if tolerance is None else tolerance
    n = len(probes)
    if layer == "auto":
        chosen, mode = choose_layer(importance, tolerance), "auto"
    elif layer == "last":
        chosen, mode = n, "last"
    else:
        chosen, mode = int(layer), "fixed"
        if not 1 <= chosen <= n:
            raise ValueError(f"--layer {chosen} is outside 1..{n} for this backbone")
    scores = tuple(
        LayerScore(
            i + 1, fisher[i], aucs[i], losses[i], importance[i], {k: v[i] for k, v in degraded_aucs.items()}
        )
        for i in range(n)
    )
    result = ImportanceProfile(scores, chosen, mode, tolerance, int(yc.numel()), int(yv.numel()), criterion)
    return result, probes[chosen - 1]


def plot(p: ImportanceProfile, path: Path) -> None:
    """Left: raw probe AUC per block, clean and on each degraded copy. Right: the normalized scores and L*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s.layer for s in p.scores]
    fig, (raw, ax) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=120)
    raw.plot(layers, [s.probe_auc for s in p.scores], "o-", lw=2, label="clean")
    for name in p.scores[0].degraded_auc:
        raw.plot(layers, [s.degraded_auc[name] for s in p.scores], ".--", label=name)
    raw.set_title("validation probe AUC per block", fontsize=9)
    raw.set_ylabel("AUC")
    raw.legend(fontsize=7)
    ax.plot(layers, _minmax([s.probe_auc for s in p.scores]), "o-", label="probe AUC, clean (normalized)")
    ax.plot(layers, _minmax([s.fisher for s in p.scores]), "s-", label="Fisher ratio (normalized)")
    if p.scores[0].degraded_auc:
        worst = [p.worst_auc(s) for s in p.scores]
        ax.plot(layers, _minmax(worst), "^-", label="probe AUC, worst of clean + degraded (normalized)")
    ax.plot(layers, [s.importance for s in p.scores], "k-", lw=2, label=f"importance ({p.criterion})")
    ax.axvline(p.layer, color="tab:red", ls="--", label=f"L* = {p.layer} ({p.mode})")
    best = max(p.scores, key=lambda s: s.probe_auc)
    ax.set_title(
        f"L* = {p.layer}/{len(p.scores)} (best clean probe AUC {best.probe_auc:.3f} at block {best.layer})",
        fontsize=9,
    )
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    if p.relative_speed:
        speed = ax.twinx()
        speed.plot(layers, p.relative_speed, ":", color="tab:gray", label="speed vs whole tower (measured)")
        speed.set_ylabel("speed of the tower cut here (x)", fontsize=8)
        speed.legend(fontsize=7, loc="upper right")
    for a in (raw, ax):
        a.set_xlabel("block")
        a.set_xticks(layers)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def importance_table(p: ImportanceProfile) -> str:
    """One row per block, L* marked: what ``i2p layers`` and ``i2p-train`` print."""
    rows = [
        {
            "layer": s.layer,
            "probe_auc": s.probe_auc,
            "probe_loss": s.probe_loss,
            "fisher": s.fisher,
            **{f"auc {k}": v for k, v in s.degraded_auc.items()},
            "worst_auc": p.worst_auc(s),
            "compute": f"{100 * s.layer / len(p.scores):.0f}%",
            **({"speed": f"{p.relative_speed[s.layer - 1]:.2f}x"} if p.relative_speed else {}),
            "importance": s.importance,
            "chosen": "<- L*" if s.layer == p.layer else "",
        }
        for s in p.scores
    ]
    return format_table(rows) + "\n" + p.cost_line()
