"""``i2p-export``: turn a training checkpoint into a deployable artifact directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from i2p.base.tables import format_table
from i2p.runtime.model_files import TARGETS

from .options import DEFAULTS, ENGINE_CHOICES, ExportOptions  # light: --help needs no torch or onnx

if TYPE_CHECKING:
    from .pipeline import ExportResult


def _atol(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    atol = dict(DEFAULTS.atol)
    for v in values:
        precision, _, number = v.partition("=")
        if precision not in atol:
            raise click.BadParameter(f"{v!r}: expected fp32=VALUE or fp16=VALUE")
        try:
            atol[precision] = float(number)
        except ValueError:
            raise click.BadParameter(f"{v!r}: {number!r} is not a number") from None
    return atol


def _targets(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    targets = tuple(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown:
        raise click.BadParameter(f"{value!r}: give one or more of {', '.join(TARGETS)}, separated by commas")
    return targets


def _ops(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    return () if value.strip().lower() == "none" else tuple(s.strip() for s in value.split(",") if s.strip())


@click.command("export")
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="checkpoint.safetensors written by i2p-train.",
)
@click.option(
    "--fp16", is_flag=True, help="Also write model.fp16.onnx (FP16 compute, float32 inputs/outputs)."
)
@click.option(
    "--cpu/--no-cpu",
    default=DEFAULTS.cpu,
    show_default=True,
    help="Write model.cpu.onnx: FP32 fused for ONNX Runtime's CPU kernels, kept if parity passes "
    "(the Detector prefers it on the CPU).",
)
@click.option(
    "--int8/--no-int8",
    default=DEFAULTS.int8,
    show_default=True,
    help="Write model.int8.onnx (dynamic INT8, CPU only) when --calib-images is given, kept only if its "
    "decisions on those images agree with PyTorch FP32 (>= 99%, no flip beyond the int8 tolerance); "
    "the Detector prefers it on the CPU unless asked for precision fp32.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), help="Artifact directory [default: CKPT with suffix .i2p]."
)
@click.option(
    "--backbone",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The backbone weights file if it moved since training (checked against its sha256).",
)
@click.option(
    "--opset",
    type=click.IntRange(17),
    default=DEFAULTS.opset,
    show_default=True,
    help="ONNX opset (17+: LayerNormalization as one op).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=DEFAULTS.max_batch,
    show_default=True,
    help="Largest batch for the TensorRT profile and Triton.",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINE_CHOICES),
    default=DEFAULTS.engine,
    show_default=True,
    help="Build a TensorRT engine: where available (auto), or fail without TensorRT (yes).",
)
@click.option(
    "--calib-images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of real images for the parity check (besides random inputs).",
)
@click.option(
    "--calib-limit",
    type=click.IntRange(1),
    default=DEFAULTS.calib_limit,
    show_default=True,
    help="Use at most this many calibration images (spread evenly over the folder).",
)
@click.option(
    "--samples",
    type=click.IntRange(1),
    default=DEFAULTS.random_samples,
    show_default=True,
    help="Random inputs for the parity check.",
)
@click.option(
    "--triton",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write a Triton Inference Server model repository here: the ensemble 'i2p' (image bytes in; "
    "probability, label, error out) and its models (docs/serving.md).",
)
@click.option(
    "--triton-backend",
    type=click.Choice(["auto", "tensorrt", "onnxruntime", "python"]),
    default="auto",
    show_default=True,
    help="The network in the Triton repository: a TensorRT plan, ONNX Runtime, or the runtime's ONNX Runtime "
    "backend in a Python model (CPU-only servers); auto = the plan if an engine was built, else ONNX Runtime.",
)
@click.option(
    "--atol",
    multiple=True,
    callback=_atol,
    metavar="PRECISION=VALUE",
    help=f"Logit tolerance against PyTorch, e.g. fp16=0.1 [default: {', '.join(f'{k}={v:g}' for k, v in DEFAULTS.atol.items())}]; "
    "the probability tolerance is a quarter of it.",
)
@click.option(
    "--keep-fp32",
    default=",".join(DEFAULTS.keep_fp32),
    show_default=True,
    callback=_ops,
    help="ONNX op types kept in float32 inside the FP16 model (comma-separated, or 'none').",
)
@click.option(
    "--targets",
    default=",".join(DEFAULTS.targets),
    show_default=True,
    callback=_targets,
    help="Where the artifact will run; only the model files those load are shipped (each is still checked): "
    "cpu (the fastest CPU file that passed its gate), gpu and jetson (FP16 with --fp16, else FP32: ONNX "
    "Runtime's and TensorRT's source), triton (its network file). E.g. --targets cpu: one model file.",
)
@click.option(
    "--force", is_flag=True, help="Replace an existing artifact (never a directory that is not one)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (progress goes to stderr).")
def export(samples: int, as_json: bool, **options: Any) -> None:
    """Merge the trained deltas, truncate at L*, export ONNX (FP32, --fp16), check parity, write NAME.i2p/."""
    opts = ExportOptions(random_samples=samples, **options)
    from i2p.train.backbone import BackboneError  # torch loads here, after click has checked the options
    from i2p.train.metadata import CheckpointError

    from .network import ExportError
    from .pipeline import run_export

    try:
        result = run_export(opts, echo=lambda line: click.echo(line, err=as_json))
    except (ExportError, CheckpointError, BackboneError) as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(summary(result))


def summary(result: ExportResult) -> str:
    """Files and sizes, parity, compute kept: the human-readable end of an export."""
    m = result.manifest
    files = [
        {"file": f, "size": f"{size / 2**20:.2f} MB", "sha256": m.files[f][:16] if f in m.files else "-"}
        for f, size in result.files.items()
    ]
    lines = [
        "",
        f"artifact: {result.artifact}",
        format_table(files),
        "",
        result.parity.table(),
        "",
        f"compute kept: {m.layer}/{m.num_layers} transformer blocks ({m.layer / m.num_layers:.0%}), "
        f"threshold {m.threshold:.4g} on the probability",
        *result.notes,
    ]
    if result.triton:
        lines.append(f"Triton ensemble: {result.triton}")
    lines.append(f"export took {result.seconds:.1f} s")
    return "\n".join(lines)
