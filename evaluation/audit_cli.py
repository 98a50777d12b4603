"""``i2p audit DATA``: the shortcut audit (``i2p.evaluation.audit``) as a table, JSON or a plot."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import click

from i2p.base.tables import format_table

from .audit import DEFAULT_LIMIT, FEATURES, WARN_AUC, AuditResult, Feature, audit
from .cli import run_cli
from .labels import discover


def _cell(values: list[Any], f: Feature) -> str:
    """The two commonest values with their shares, or a number's range when it is spread out."""
    counts = Counter(values)
    top = counts.most_common(2)
    nums = sorted(v for v in values if v is not None)
    if f.numeric and nums and top[0][1] / len(values) < 0.9:
        return f"{nums[0]:g}-{nums[-1]:g} (median {nums[len(nums) // 2]:g})"
    shown = ", ".join(f"{'-' if v is None else v} {100 * n / len(values):.0f}%" for v, n in top)
    return shown + (", ..." if len(counts) > 2 else "")


def distribution_table(result: AuditResult) -> str:
    """One row per generator and class: every feature's distribution."""
    rows = []
    for g in sorted({s.generator for s in result.samples}):
        for label, name in ((0, "real"), (1, "fake")):
            n = len(result.values("format", g, label))
            if n:
                row: dict[str, Any] = {"generator": g, "class": name, "n": n}
                row |= {f.name: _cell(result.values(f.name, g, label), f) for f in FEATURES}
                rows.append(row)
    return format_table(rows)


def auc_table(result: AuditResult) -> str:
    rows = [{"feature": "all (classifier)", "auc": result.classifier_auc}]
    rows += [{"feature": k, "auc": v} for k, v in sorted(result.feature_auc.items(), key=lambda kv: -kv[1])]
    return format_table(rows)


def plot_audit(result: AuditResult, path: Path) -> Path:
    """One panel per feature: the share of reals and of fakes at each value (numbers: histograms).

    Needs matplotlib, installed with the [train] extra.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise click.ClickException("--plot needs matplotlib: pip install 'i2p-detector[train]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(FEATURES) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, f in zip(axes.flat, FEATURES, strict=False):
        per_class = [result.values(f.name, label=label) for label in (0, 1)]
        levels = [v for v, _ in Counter(per_class[0] + per_class[1]).most_common(8)]
        for offset, (values, name) in enumerate(zip(per_class, ("real", "fake"), strict=True)):
            shares = [values.count(v) / max(1, len(values)) for v in levels]
            ax.bar([i + 0.4 * offset for i in range(len(levels))], shares, width=0.4, label=name)
        ax.set_xticks(
            [i + 0.2 for i in range(len(levels))], [str(v) for v in levels], rotation=30, fontsize=7
        )
        ax.set_title(f"{f.name} (AUC {result.feature_auc[f.name]:.2f})", fontsize=9)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(FEATURES) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"metadata-only classifier AUC {result.classifier_auc:.2f} (warning at {WARN_AUC})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@click.command("audit")
@click.argument("data", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
@click.option(
    "--plot", type=click.Path(dir_okay=False), help="Write the per-feature distributions (PNG) here."
)
@click.option(
    "--limit",
    default=DEFAULT_LIMIT,
    show_default=True,
    type=click.IntRange(min=0),
    help="Audit a random subset of at most this many images (0: all).",
)
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 256), help="Reading threads.")
def audit_command(data: str, as_json: bool, plot: str | None, limit: int, workers: int) -> None:
    """Shortcut audit: can file metadata alone (format, JPEG quality, size, EXIF, ...) tell real from fake?"""
    if plot and not Path(plot).parent.is_dir():
        raise click.BadParameter(f"folder {Path(plot).parent} does not exist", param_hint="--plot")
    samples = run_cli(discover, data)
    result = run_cli(audit, samples, limit, 0, workers)
    if not result.samples:
        raise click.ClickException(
            f"{data}: no image header could be read ({len(result.skipped)} unreadable)"
        )
    if plot:
        plot_audit(result, Path(plot))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(distribution_table(result))
    click.echo("\nAUC of each feature alone and of all together (5-fold cross-validated):")
    click.echo(auc_table(result))
    for path, reason in result.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    subset = (
        f" (a random {len(result.samples) + len(result.skipped)} of {result.listed})"
        if result.listed > len(result.samples) + len(result.skipped)
        else ""
    )
    click.echo(f"\n{len(result.samples)} images audited{subset}.")
    for line in result.warnings:
        click.echo(f"warning: {line}")
    if not result.warnings and math.isnan(result.classifier_auc):
        click.echo("no shortcut check: it needs readable images of both classes (2 or more of each)")
    elif not result.warnings:
        click.echo(
            f"no shortcut found: metadata-only AUC {result.classifier_auc:.2f} (warning at {WARN_AUC})"
        )
