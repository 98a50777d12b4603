"""``i2p-train``, ``i2p layers``, and ``i2p eval`` with checkpoints (``--ckpt``) as well as artifacts."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout, suppress
from pathlib import Path

import click

from i2p.evaluation.cli import eval_command, run_cli

from .augment import AugmentConfig
from .config import ADAPTERS, TrainConfig

DEFAULTS = TrainConfig(data="")


def data_options(f):
    """Options shared by every command that reads a training set and a backbone."""
    options = [
        click.option(
            "--data", required=True, type=click.Path(exists=True), help="Image folder or CSV manifest."
        ),
        click.option(
            "--val", type=click.Path(exists=True), help="Validation folder/CSV (default: split --data)."
        ),
        click.option("--val-fraction", default=DEFAULTS.val_fraction, show_default=True),
        click.option(
            "--model",
            default=DEFAULTS.model,
            show_default=True,
            help="Backbone: an open_clip or timm model name or an i2p config (`i2p backbones` lists them).",
        ),
        click.option(
            "--pretrained",
            required=True,
            help="Weights file (.safetensors/.pt/.bin, open_clip full or visual-only), an open_clip tag "
            "(downloads: you asked), or 'none' (random init, for tests and demos).",
        ),
        click.option(
            "--calib-size",
            default=DEFAULTS.calib_size,
            show_default=True,
            help="Images per split to score layers.",
        ),
        click.option("--layer", default="auto", show_default=True, help="auto | last | block number."),
        click.option(
            "--layer-tolerance",
            type=float,
            help="L* = shallowest layer within this of the best normalized importance "
            "[default: 0 for --layer-rule robust, 0.05 for clean].",
        ),
        click.option(
            "--layer-rule",
            type=click.Choice(["robust", "clean"]),
            default=DEFAULTS.layer_rule,
            show_default=True,
            help="robust: the layer with the best worst-case probe AUC over clean validation images and "
            "copies degraded by JPEG 75, half size and blur 1 (measured best in docs/evaluation.md); "
            "clean: Fisher ratio + clean AUC, preferring middle layers.",
        ),
        click.option("--batch-size", default=DEFAULTS.batch_size, show_default=True),
        click.option("--workers", default=DEFAULTS.workers, show_default=True, help="DataLoader processes."),
        click.option("--device", default="auto", show_default=True),
        click.option("--seed", default=DEFAULTS.seed, show_default=True),
        click.option(
            "--out", default=DEFAULTS.out, show_default=True, type=click.Path(), help="Run directory."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(**kw) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in kw.items() if k in fields and v is not None})
    except ValueError as e:
        raise click.UsageError(str(e)) from e


@click.command("train")
@data_options
@click.option(
    "--rank",
    default=DEFAULTS.rank,
    show_default=True,
    help="Subspace directions per linear map (0 = head only).",
)
@click.option(
    "--sensitivity", type=click.Choice(["singular", "fisher"]), default="singular", show_default=True
)
@click.option(
    "--baseline", is_flag=True, help="UnivFD recipe: frozen full tower, final embedding, linear head."
)
@click.option(
    "--adapter",
    type=click.Choice(ADAPTERS),
    default=DEFAULTS.adapter,
    show_default=True,
    help="subspace: I2P low-sensitivity subspace; lora: LoRA of --rank on the same maps; full: every "
    "weight of blocks 1..L*. All merge and export alike.",
)
@click.option(
    "--target-fpr",
    type=float,
    help="Calibrate the threshold for at most this fraction of validation reals called fake (e.g. 0.01); "
    "default: balanced accuracy. Every named operating point is stored either way.",
)
@click.option("--epochs", default=DEFAULTS.epochs, show_default=True)
@click.option("--lr", default=DEFAULTS.lr, show_default=True)
@click.option("--weight-decay", default=DEFAULTS.weight_decay, show_default=True)
@click.option("--warmup-fraction", default=DEFAULTS.warmup_fraction, show_default=True)
@click.option("--max-steps-per-epoch", default=0, help="Cap steps per epoch (0 = all).")
@click.option(
    "--feature-views",
    default=DEFAULTS.feature_views,
    show_default=True,
    help="Head-only runs (--baseline, --rank 0): the frozen tower runs once per image per view and the "
    "head trains on the cached features; epoch e uses augmented view e mod N. N >= --epochs reproduces "
    "fresh augmentation every epoch at its cost; 1 reuses one augmented view every epoch (cheapest, "
    "less augmentation diversity). Ignored when the tower trains.",
)
@click.option(
    "--align",
    metavar="SPEC",
    help="Format-aligned training: re-encode every training image, real and fake alike, through one pipeline "
    "with strengths drawn per image, e.g. jpeg:60-100,resize:0.5-1.0 (JPEG quality range, downscale range; "
    "applied left to right, before augmentation), so format, quality and size cannot carry the label. "
    "Recorded in the checkpoint.",
)
@click.option("--no-augment", is_flag=True, help="Train without blur/JPEG/crop/flip augmentation.")
@click.option("--no-amp", is_flag=True, help="Disable mixed precision on CUDA.")
@click.option("--embed-base", is_flag=True, help="Copy the frozen base weights into the checkpoint.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last complete epoch.")
@click.option(
    "--json", "as_json", is_flag=True, help="Progress to stderr; the final metadata as JSON on stdout."
)
def train(no_augment: bool, no_amp: bool, resume: bool, as_json: bool, **kw) -> None:
    """Train an I2P detector: pick the critical layer, tune a low-sensitivity subspace, calibrate."""
    started = time.time()  # the run's reported time includes loading torch
    augment = (
        AugmentConfig(blur_prob=0.0, jpeg_prob=0.0, resize_prob=0.0, flip=False, scale_jitter=1.0)
        if no_augment
        else AugmentConfig()
    )
    cfg = _config(**kw, augment=augment, amp=not no_amp)  # options are checked before torch loads (seconds)
    from .loop import train as run

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # open_clip's INFO chatter stays out
    logging.getLogger("i2p").setLevel(logging.INFO)
    with (
        _exit_on_signals(),
        _removed_if_left_empty(Path(cfg.out)),
        redirect_stdout(sys.stderr if as_json else sys.stdout),
    ):
        meta = run_cli(run, cfg, resume, started)
    if as_json:
        click.echo(meta.to_json())


@contextmanager
def _exit_on_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM (``kill``, a scheduler's stop) unwind, so cleanups run: exit status 130 / 143."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _removed_if_left_empty(out: Path) -> Iterator[None]:
    """A failed run does not leave behind an empty --out directory that it created."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed:
            with suppress(OSError):  # not empty: whatever it holds stays
                out.rmdir()
        raise


@click.command("layers")
@data_options
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def layers(as_json: bool, **kw) -> None:
    """Stage 1 alone: score every block and write layer_importance.json + .png to --out."""
    from .importance import importance_table
    from .stages import profile_layers

    cfg = _config(**kw)
    profile = run_cli(profile_layers, cfg)
    json_path, png_path = profile.save(Path(cfg.out))
    if as_json:
        click.echo(json.dumps(profile.to_dict(), indent=2))
    else:
        click.echo(importance_table(profile))
        click.echo(f"L* = {profile.layer} ({profile.mode}); wrote {json_path} and {png_path}")


def _evaluate_checkpoint(*args):
    """``i2p eval --ckpt``: loads torch only when a checkpoint is evaluated."""
    from .checkpoint_scoring import evaluate_checkpoint

    return evaluate_checkpoint(*args)


evaluate = eval_command(_evaluate_checkpoint)
