"""``i2p eval``: metrics of a checkpoint or an exported artifact on a labelled set, clean and degraded.

The artifact path (``--model``) runs on the torch-free runtime. The checkpoint path (``--ckpt``) needs
PyTorch, so training hands its scorer in (``eval_command(evaluate_checkpoint)`` in ``i2p.train.train_cli``):
this layer never imports the one above it.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from pathlib import Path

import click

from i2p.runtime import ArtifactError, BackendUnavailableError
from i2p.runtime.detect_cli import threshold_option
from i2p.runtime.manifest import PRECISIONS

from .metrics import TABLE_COLUMNS, metrics_table
from .perturb import SHORTCUTS, Condition, parse_sweeps
from .report import write_report
from .robustness import SweepResult, evaluate_artifact, plot_sweep, sweep_table
from .verdicts import shortcut_effects, shortcut_table, uncertain_shares, uncertain_table

# (ckpt, data, backbone weights, threshold, options, conditions, operating point) -> result
CheckpointEvaluator = Callable[
    [str, str, "str | None", "float | None", dict, Sequence[Condition], "str | None"], SweepResult
]


def run_cli(fn, *args):
    """Turn the package's own errors into clean CLI errors; keep tracebacks for real bugs.

    Backbone, checkpoint and data errors are ValueErrors.
    """
    try:
        return fn(*args)
    except (ArtifactError, BackendUnavailableError, FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from e


def eval_command(evaluate_checkpoint: CheckpointEvaluator | None = None) -> click.Command:
    """The ``i2p eval`` command; ``evaluate_checkpoint`` scores ``--ckpt`` (None: artifacts only)."""

    @click.command("eval")
    @click.option(
        "--ckpt", type=click.Path(exists=True, dir_okay=False), help="checkpoint.safetensors (PyTorch)."
    )
    @click.option(
        "--model",
        "artifact",
        type=click.Path(exists=True),
        help="An exported NAME.i2p artifact instead: the deployed model, through the torch-free runtime.",
    )
    @click.option("--data", required=True, type=click.Path(exists=True), help="Image folder or CSV manifest.")
    @click.option(
        "--perturb",
        multiple=True,
        help="Also evaluate under degradations, e.g. jpeg:95,75,50  resize:0.5  blur:1,2  social  "
        "resize:0.5+jpeg:90 (a chain). Repeatable; the same degradation for real and generated images.",
    )
    @click.option(
        "--shortcuts",
        is_flag=True,
        help="Also score every image after a lossless PNG re-save, a JPEG 95 re-save, EXIF stripped, and a "
        "resize by -10%/+10%; report each change's verdict flip rate and mean |Δprobability|.",
    )
    @click.option(
        "--plot", type=click.Path(dir_okay=False), help="Write the metric-vs-strength plot (PNG) here."
    )
    @click.option(
        "--report",
        type=click.Path(dir_okay=False),
        help="Write one self-contained HTML page here (no network): metrics per generator, ROC and DET curves, "
        "score histograms, calibration, the sweep, and the most confident mistakes as thumbnails.",
    )
    @click.option("--metric", default="auc", show_default=True, help="Metric of the sweep table and plot.")
    @click.option(
        "--operating-point",
        help="Use a named threshold (balanced, fpr_1pct, fpr_5pct, ...) stored at training.",
    )
    @click.option(
        "--threshold",
        type=float,
        callback=lambda ctx, param, v: threshold_option(v),
        help="Override the calibrated threshold (a probability in [0, 1]).",
    )
    @click.option(
        "--backbone", type=click.Path(exists=True, dir_okay=False), help="Base weights if they moved."
    )
    @click.option("--backend", default="auto", show_default=True, help="Runtime backend for --model.")
    @click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        help="Model file of --model to measure (default: the Detector's choice, e.g. int8 on a CPU when the "
        "artifact has it); compare --precision fp32 against it.",
    )
    @click.option("--batch-size", default=32, show_default=True)
    @click.option("--workers", default=2, show_default=True, help="Decoding threads.")
    @click.option("--device", default="auto", show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    def evaluate(
        ckpt: str | None,
        artifact: str | None,
        data: str,
        perturb: tuple[str, ...],
        shortcuts: bool,
        plot: str | None,
        report: str | None,
        metric: str,
        operating_point: str | None,
        threshold: float | None,
        backbone: str | None,
        backend: str,
        precision: str | None,
        as_json: bool,
        **kw,
    ) -> None:
        """Metrics of a checkpoint or exported artifact on a labelled set: per generator and mean, clean and degraded."""
        if (ckpt is None) == (artifact is None):
            raise click.UsageError(
                "pass exactly one of --ckpt (a checkpoint) or --model (an exported artifact)"
            )
        if precision and artifact is None:
            raise click.UsageError("--precision picks a model file of --model (an exported artifact)")
        if metric not in TABLE_COLUMNS or metric == "n":
            raise click.UsageError(f"--metric must be one of {', '.join(TABLE_COLUMNS[1:])}")
        try:  # a bad --perturb value is a usage error (2), like every other option's
            conditions = parse_sweeps(perturb + (SHORTCUTS if shortcuts else ()))
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        if report and not Path(report).parent.is_dir():  # before the evaluation, which may take hours
            raise click.BadParameter(f"folder {Path(report).parent} does not exist", param_hint="--report")
        if artifact is None and evaluate_checkpoint is None:
            raise click.UsageError("--ckpt needs the training extra: pip install 'i2p-detector[train]'")
        with redirect_stdout(sys.stderr):  # what scoring says (skipped files) never mixes into --json
            if artifact is not None:
                run = functools.partial(
                    evaluate_artifact, backend=backend, precision=precision, operating_point=operating_point
                )
                result = run_cli(
                    run, artifact, data, conditions, threshold, kw["batch_size"], None, kw["workers"]
                )
            else:
                result = run_cli(
                    evaluate_checkpoint, ckpt, data, backbone, threshold, kw, conditions, operating_point
                )
        title = f"{Path(ckpt or artifact).name} on {data}"
        if plot:
            plot_sweep(result, Path(plot), metric, title=title)
        if report:
            run_cli(write_report, result, Path(report), title, metric)
        if as_json:
            clean = next(iter(result.metrics.values()))
            body = {"metrics": {g: m.to_dict() for g, m in clean.items()}, **result.to_dict()}
            if shortcuts:
                body["shortcuts"] = [e.to_dict() for e in shortcut_effects(result, SHORTCUTS)]
            shares = uncertain_shares(result)
            if shares:  # an artifact with the OOD output; per condition also under conditions.<c>.uncertain
                body["uncertain"] = shares[0].to_dict()
            click.echo(json.dumps(body, indent=2))
            return
        for name, metrics in result.metrics.items():
            if len(result.metrics) > 1:
                click.echo(f"== {name}")
            click.echo(metrics_table(metrics))
        if len(result.metrics) > 1:
            click.echo(f"== {metric} under each condition\n" + sweep_table(result, metric))
        if shortcuts:
            click.echo("== verdict flips after a change of delivery (--shortcuts)")
            click.echo(shortcut_table(shortcut_effects(result, SHORTCUTS)))
        shares = uncertain_shares(result)
        if shares:
            click.echo(
                "== verdicts flagged uncertain (ood above the artifact's OOD threshold): share of images"
            )
            click.echo(uncertain_table(shares))
        for path, reason in result.skipped:
            click.echo(f"skipped {path}: {reason}", err=True)
        scorer = f"; {result.scorer['backend']}, {result.scorer['precision']}" if result.scorer else ""
        click.echo(
            f"threshold {result.threshold:.4f}"
            + (f" ({operating_point})" if operating_point else "")
            + scorer
        )

    return evaluate


evaluate = eval_command()  # artifacts only: the lean install's `i2p eval --model`
