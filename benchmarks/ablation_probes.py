"""Studies on cached frozen features (``benchmarks.ablation_features``): seconds of numpy, no forward pass.

1. Per-layer probes: a logistic probe on every block's CLS token (and on CLIP's final embedding, the
   UnivFD recipe), fit on sid-mini/train clean, scored on val and test, clean and degraded.
2. Layer rules: which L* each rule picks from train/val statistics alone, and how that layer does on
   test (unseen generators) clean and under the sweep.
3. Augmentation: the L* probe fit on clean train features plus degraded copies (JPEG, downscale, blur)
   versus clean alone.
4. Operating points: thresholds calibrated on val (balanced, 1% and 5% FPR) applied to test.

    python -m benchmarks.ablation_probes --features runs/features --out docs/evaluation

Writes ``<out>/probes.json`` and figures, and prints the markdown tables docs/evaluation.md quotes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.ablation_features import GOAL, SWEEP, load_cached
from i2p.evaluation.metrics import MEAN, calibrate_threshold, evaluate, operating_points, roc_auc
from i2p.evaluation.perturb import parse_condition
from i2p.evaluation.robustness import SweepResult, plot_sweep
from i2p.train import importance
from i2p.train.importance import choose_layer, combine, fisher_ratio, fit_probe, probe_logits

FINAL = 13  # index used for CLIP's final embedding (the UnivFD feature) next to blocks 1..12
VAL_DEGRADE = ("jpeg:75", "resize:0.5", "blur:1")


class Features:
    """Cached features by (split, condition); ``x(split, cond, layer)`` is [N, width] float32."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def has(self, split: str, cond: str) -> bool:
        return (self.root / split / f"{cond}.safetensors").exists()

    def get(self, split: str, cond: str) -> dict:
        if (split, cond) not in self.cache:
            self.cache[(split, cond)] = load_cached(self.root / split / f"{cond}.safetensors")
        return self.cache[(split, cond)]

    def x(self, split: str, cond: str, layer: int) -> torch.Tensor:
        d = self.get(split, cond)
        return torch.from_numpy(d["final"] if layer == FINAL else d["features"][layer - 1])

    def y(self, split: str, cond: str) -> np.ndarray:
        return self.get(split, cond)["labels"]

    def rows_of(self, split: str, cond: str) -> np.ndarray:
        """Indices into the clean features of the images cached under ``cond`` (a subset for some)."""
        where = {path: i for i, path in enumerate(self.get(split, "clean")["paths"])}
        return np.array([where[path] for path in self.get(split, cond)["paths"]])


def fit(xs: list[torch.Tensor], ys: list[np.ndarray], layer: int) -> Callable[[torch.Tensor], np.ndarray]:
    """A probe on the concatenated training sets; returns x -> probabilities."""
    norm = layer != FINAL
    probe = fit_probe(torch.cat(xs), torch.from_numpy(np.concatenate(ys)).float(), normalize=norm)
    return lambda x: torch.sigmoid(probe_logits(probe, x, normalize=norm)).numpy().astype(np.float64)


def test_metrics(f: Features, score, threshold: float, conditions: list[str]) -> dict[str, dict]:
    """Test metrics per condition, and ``<cond>|clean``: clean metrics on the same (sub)set of images."""
    out = {}
    clean = score("clean")
    for cond in conditions:
        d = f.get("test", cond)
        out[cond] = evaluate(d["labels"], score(cond), d["generators"], threshold)
        if cond != "clean":
            rows = f.rows_of("test", cond)
            out[f"{cond}|clean"] = evaluate(d["labels"], clean[rows], d["generators"], threshold)
    return out


def layer_study(f: Features, conditions: list[str]) -> list[dict]:
    """Per layer: train Fisher ratio, val AUC clean/degraded, test mean metrics per condition."""
    rows = []
    ytr = f.y("train", "clean")
    for layer in [*range(1, 13), FINAL]:
        score = fit([f.x("train", "clean", layer)], [ytr], layer)
        val = {
            c: roc_auc(f.y("val", c), score(f.x("val", c, layer)))
            for c in ("clean", *VAL_DEGRADE)
            if f.has("val", c)
        }
        pv = score(f.x("val", "clean", layer))
        points = operating_points(f.y("val", "clean"), pv)
        tm = test_metrics(
            f, lambda c, s=score, n=layer: s(f.x("test", c, n)), points["balanced"].threshold, conditions
        )
        fpr5 = points["fpr_5pct"].threshold
        rows.append({
            "layer": layer,
            "fisher": fisher_ratio(f.x("train", "clean", layer), torch.from_numpy(ytr)) if layer != FINAL else None,
            "val_auc": val,
            "test": {c: m[MEAN].to_dict() for c, m in tm.items()},
            "test_tpr_at_val_fpr5": {
                c: float(np.mean(score(f.x("test", c, layer))[f.y("test", c) == 1] >= fpr5)) for c in conditions
            },
            "test_fpr_at_val_fpr5": {
                c: float(np.mean(score(f.x("test", c, layer))[f.y("test", c) == 0] >= fpr5)) for c in conditions
            },
        })  # fmt: skip
    return rows


def rules(rows: list[dict]) -> dict[str, int]:
    """Layer picked by each candidate rule from train/val statistics only (blocks 1..12).

    "clean" and "robust" are ``i2p.train.importance``'s own rules (``combine`` + ``choose_layer``);
    the others are alternatives measured next to them.
    """
    blocks = [r for r in rows if r["layer"] != FINAL]
    fisher = [r["fisher"] for r in blocks]
    clean = [r["val_auc"]["clean"] for r in blocks]
    degraded = {c: [r["val_auc"][c] for r in blocks] for c in VAL_DEGRADE if c in blocks[0]["val_auc"]}
    every = [list(r["val_auc"].values()) for r in blocks]
    robust = combine("robust", fisher, clean, degraded)
    return {
        "clean: Fisher + val AUC, tolerance 0.05 (the old default)": choose_layer(combine("clean", fisher, clean, {}), 0.05),
        "robust: worst-case val AUC over clean + degraded, tolerance 0 (new default)": choose_layer(robust, 0.0),
        "robust, tolerance 0.05 (cheaper L*)": choose_layer(robust, 0.05),
        "best clean val AUC": int(np.argmax(clean)) + 1,
        "best mean val AUC, clean + degraded": int(np.argmax([np.mean(v) for v in every])) + 1,
        "last block (12)": 12,
        "final embedding (UnivFD)": FINAL,
    }  # fmt: skip


def augmentation_study(f: Features, layer: int, conditions: list[str]) -> dict[str, dict]:
    """The L* probe fit on clean train features plus degraded copies (subsets), scored on test."""
    variants = {"clean only": []}
    degraded = [c for c in VAL_DEGRADE if f.has("train", c)]
    variants.update({f"clean + {c}": [c] for c in degraded})
    if len(degraded) > 1:
        variants["clean + " + " + ".join(degraded)] = degraded
    out = {}
    for name, extra in variants.items():
        score = fit(
            [f.x("train", "clean", layer)] + [f.x("train", c, layer) for c in extra],
            [f.y("train", "clean")] + [f.y("train", c) for c in extra],
            layer,
        )
        t = calibrate_threshold(f.y("val", "clean"), score(f.x("val", "clean", layer)))
        tm = test_metrics(f, lambda c, s=score: s(f.x("test", c, layer)), t, conditions)
        out[name] = {c: m[MEAN].to_dict() for c, m in tm.items()}
    return out


def stage1_profile(f: Features) -> importance.ImportanceProfile:
    """Stage 1's own profile (default robust rule) on all of train (calibration) and val, from the cache."""

    def xy(split: str, cond: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = f.get(split, cond)
        return torch.from_numpy(d["features"]), torch.from_numpy(d["labels"]).float()

    degraded = {c: xy("val", c) for c in VAL_DEGRADE if f.has("val", c)}
    return importance.profile(xy("train", "clean"), xy("val", "clean"), "auto", None, degraded, "robust")[0]


def recipe_sweeps(f: Features, layers: dict[str, int], conditions: list[str], out: Path) -> dict[str, dict]:
    """Per-generator sweep (table rows + plot) of the probe recipes, through the runtime's sweep code."""
    results = {}
    for name, layer in layers.items():
        score = fit([f.x("train", "clean", layer)], [f.y("train", "clean")], layer)
        points = operating_points(f.y("val", "clean"), score(f.x("val", "clean", layer)))
        t = points["balanced"].threshold
        metrics = {
            c: evaluate(f.y("test", c), score(f.x("test", c, layer)), f.get("test", c)["generators"], t)
            for c in conditions
        }
        result = SweepResult(t, metrics, {c: parse_condition(c).strength for c in conditions}, [])
        plot_sweep(result, out / f"sweep_{name}.png", "auc", title=f"{name}: test AUC under each degradation")
        fpr5 = points["fpr_5pct"].threshold
        at5 = {}
        for c in conditions:
            p, y = score(f.x("test", c, layer)), f.y("test", c)
            at5[c] = {"tpr": float(np.mean(p[y == 1] >= fpr5)), "fpr": float(np.mean(p[y == 0] >= fpr5))}
        results[name] = {
            "layer": layer,
            **result.to_dict(),
            "at_val_fpr5": at5,
            "operating_points": {k: v.to_dict() for k, v in points.items()},
        }
    return results  # fmt: skip


def plot_layers(rows: list[dict], conditions: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    xs = [r["layer"] for r in rows]
    labels = [str(x) for x in xs[:-1]] + ["final"]
    for cond in ("clean", *VAL_DEGRADE):
        axes[0].plot(xs, [r["val_auc"].get(cond, np.nan) for r in rows], "o-", label=cond)
    axes[0].set_title("val (ldm_sd) probe AUC by layer: what stage 1 sees")
    for cond in conditions:
        axes[1].plot(xs, [r["test"][cond]["auc"] for r in rows], "o-", label=cond)
    axes[1].set_title("test (glide, dalle_mini) mean AUC by layer")
    for ax in axes:
        ax.set_xticks(xs, labels)
        ax.set_xlabel("block (probe fit on train clean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cell(m: dict, cond: str, metric: str = "auc") -> str:
    """``value`` for clean, ``value (Δ vs clean on the same images)`` for a degradation."""
    if cond == "clean":
        return f"{m['clean'][metric]:.3f}"
    return f"{m[cond][metric]:.3f} ({m[cond][metric] - m[cond + '|clean'][metric]:+.3f})"


def markdown(rows: list[dict], picks: dict[str, int], aug: dict, conditions: list[str]) -> str:
    name = {FINAL: "final"}
    head = " | ".join(f"test {c}" for c in conditions)
    lines = [
        f"| layer | val AUC clean | val AUC jpeg75 / half / blur1 | {head} |",
        "|" + "---|" * (3 + len(conditions)),
    ]
    for r in rows:
        v = r["val_auc"]
        deg = " / ".join(f"{v[c]:.3f}" for c in VAL_DEGRADE if c in v)
        lines.append(
            f"| {name.get(r['layer'], r['layer'])} | {v['clean']:.3f} | {deg} | "
            + " | ".join(_cell(r["test"], c) for c in conditions)
            + " |"
        )
    by_layer = {r["layer"]: r for r in rows}
    lines += [
        "",
        f"| rule | L* | {head} | TPR at val 5%-FPR threshold: " + " / ".join(conditions) + " |",
        "|" + "---|" * (3 + len(conditions)),
    ]
    for rule, layer in picks.items():
        r = by_layer[layer]
        tpr = " / ".join(f"{r['test_tpr_at_val_fpr5'][c]:.3f}" for c in conditions)
        lines.append(
            f"| {rule} | {name.get(layer, layer)} | "
            + " | ".join(_cell(r["test"], c) for c in conditions)
            + f" | {tpr} |"
        )
    lines += ["", f"| L* | probe training set | {head} |", "|" + "---|" * (2 + len(conditions))]
    for at, variants in aug.items():
        for variant, ms in variants.items():
            lines.append(f"| {at} | {variant} | " + " | ".join(_cell(ms, c) for c in conditions) + " |")
    return "\n".join(lines)  # fmt: skip


def recipes_markdown(sweeps: dict[str, dict]) -> str:
    """One row per (recipe, condition): AUC per generator and mean, AP, TPR@1%/5% FPR, and the val-5% point."""
    lines = [
        "| recipe | L* | condition | n | AUC dalle_mini / glide / mean | AP | TPR@1%FPR | TPR@5%FPR | ECE "
        "| val 5%-FPR threshold: TPR / FPR on test |",
        "|" + "---|" * 10,
    ]
    for name, r in sweeps.items():
        for cond, c in r["conditions"].items():
            m = c["metrics"]
            auc = " / ".join(f"{m[g]['auc']:.3f}" for g in (*[g for g in m if g != MEAN], MEAN))
            at5 = r["at_val_fpr5"][cond]
            lines.append(
                f"| {name} | {r['layer'] if r['layer'] != FINAL else 'final'} | {cond} | {m[MEAN]['n']} | {auc} "
                f"| {m[MEAN]['ap']:.3f} | {m[MEAN]['tpr_1pct_fpr']:.3f} | {m[MEAN]['tpr_5pct_fpr']:.3f} "
                f"| {m[MEAN]['ece']:.3f} | {at5['tpr']:.3f} / {at5['fpr']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, default=Path("runs/features"))
    ap.add_argument("--out", type=Path, default=Path("docs/evaluation"))
    ap.add_argument("--layer", type=int, help="L* for the augmentation study (default: the robust rule's)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    f = Features(a.features)
    conditions = ["clean", *[c for c in (*GOAL, *SWEEP) if f.has("test", c)]]
    conditions = list(dict.fromkeys(conditions))
    rows = layer_study(f, conditions)
    picks = rules(rows)
    layer = a.layer or next(v for k, v in picks.items() if k.startswith("robust"))
    aug = {f"L{n}": augmentation_study(f, n, conditions) for n in dict.fromkeys((7, layer))}
    a.out.mkdir(parents=True, exist_ok=True)
    stage1_profile(f).save(a.out)  # what `i2p layers` writes, from the cached features
    recipes = {"a_univfd_final": FINAL, "b_head_L7": 7, f"b_head_L{layer}_robust_default": layer}
    sweeps = recipe_sweeps(f, recipes, conditions, a.out)
    (a.out / "probes.json").write_text(json.dumps({"layers": rows, "rules": picks, "augmentation": aug, "recipes": sweeps}, indent=1))  # fmt: skip
    plot_layers(rows, conditions, a.out / "layers_clean_vs_degraded.png")
    print(markdown(rows, picks, aug, conditions))
    print()
    print(recipes_markdown(sweeps))


if __name__ == "__main__":
    main()
