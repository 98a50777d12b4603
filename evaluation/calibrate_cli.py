"""``i2p calibrate ART --reals DIR --target-fpr F --name NAME``: a named operating point from your own reals."""

from __future__ import annotations

import functools
import json

import click

from i2p.runtime.detector import BACKENDS
from i2p.runtime.manifest import PRECISIONS
from i2p.runtime.schema import SchemaError, point_name

from .calibrate import Calibration, calibrate
from .cli import run_cli


def _lines(result: Calibration) -> list[str]:
    p = result.point
    low, high = p.fpr_ci95 or (0.0, 1.0)
    lines = [
        f"operating point {result.name!r}: threshold {p.threshold:.6g} ({p.rule}, target FPR {p.target_fpr:g}); "
        f"scored by {result.backend}, {result.precision}",
        f"FPR on the {p.n_real} reals: {p.val_fpr:.4f} ({result.false_positives} called fake), "
        f"95% Clopper-Pearson interval [{low:.4f}, {high:.4f}]",
    ]
    if p.val_tpr is not None:
        lines.append(f"TPR on the {p.n_fake} fakes: {p.val_tpr:.4f}")
    for name, fpr in result.before.items():
        lines.append(f"  for comparison, point {name!r} calls {fpr:.4f} of these reals fake")
    lines.append(f"files sha256 {p.files_sha256}" + ("; now the default point" if result.default else ""))
    if result.ood is not None:
        lines.append(
            f"OOD threshold now {result.ood.threshold:.6g}, the {result.ood.quantile:.0%} quantile of these "
            f"{result.ood.n_val} reals' OOD scores (the old one flagged {result.ood_flagged_before:.4f} of "
            "them uncertain); it applies to every operating point"
        )
    return lines


def _target_fpr(value: float) -> float:
    """--target-fpr checked while the command line is parsed (NaN too): a usage error (exit 2)."""
    if not 0.0 < value < 1.0:  # False for NaN
        raise click.BadParameter(f"{value!r} is not a fraction in (0, 1), e.g. 0.01 for 1%")
    return value


def _point_name(value: str) -> str:
    """--name checked while the command line is parsed: a bad one is a usage error (exit 2)."""
    try:
        return point_name(value, "--name")
    except SchemaError as e:
        raise click.BadParameter(str(e).removeprefix("field '--name': ")) from None


@click.command("calibrate")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--reals",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Reference real images from your deployment (searched recursively).",
)
@click.option(
    "--fakes",
    type=click.Path(exists=True, file_okay=False),
    help="Generated images: report the TPR at the new point.",
)
@click.option(
    "--target-fpr",
    required=True,
    type=float,
    callback=lambda ctx, param, value: _target_fpr(value),
    help="At most this fraction of the reals called fake, e.g. 0.01 (needs >= 299 reals).",
)
@click.option(
    "--name",
    required=True,
    callback=lambda ctx, param, value: _point_name(value),
    help="The point's name (letters, digits, _ . + -), e.g. uploads_1pct.",
)
@click.option("--default", "make_default", is_flag=True, help="Also make it the artifact's default point.")
@click.option("--replace", "replace_point", is_flag=True, help="Replace an existing point of this name.")
@click.option(
    "--ood",
    is_flag=True,
    help="Also take the artifact's OOD threshold on these reals, so 'uncertain' means unlike your traffic.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="Score with the backend you deploy.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Score with the model file you deploy (default: the Detector's choice).",
)
@click.option("--device", type=click.IntRange(0), default=0, show_default=True, help="GPU index.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Decoding threads.")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON on stdout.")
def calibrate_command(artifact: str, reals: str, fakes: str | None, target_fpr: float, name: str,
                      make_default: bool, replace_point: bool, ood: bool, backend: str, precision: str | None,
                      device: int, batch_size: int, workers: int, as_json: bool) -> None:  # fmt: skip
    """Add an operating point to ARTIFACT at a target false-positive rate on your own real images.

    Torch-free: the images are scored by the artifact's own Detector. Unreadable files are listed on
    stderr and left out. The manifest is rewritten atomically and re-checked; other points are kept.
    """
    options = {"backend": backend, "precision": precision, "device": device, "batch_size": batch_size}
    run = functools.partial(calibrate, workers=workers, ood=ood, **options)
    # run_cli: ArtifactError and ValueError (CalibrationError, a refused option) become clean errors
    result = run_cli(run, artifact, reals, target_fpr, name, fakes, make_default, replace_point)
    for error in result.errors:
        click.echo(f"excluded {error}", err=True)
    if result.errors:
        click.echo(f"{len(result.errors)} file(s) could not be scored and were left out", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo("\n".join(_lines(result)))
