"""``i2p backbones``: the supported backbone families and what each model of them is.

Towers are built on PyTorch's meta device (shapes only, no memory, nothing downloaded) to count
parameters; the weights column says where weights come from: always a local file (``--pretrained
PATH``), or a library tag that downloads on request.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import click

from i2p.base.tables import format_table

from . import backbones
from .backbones import BackboneError

# One or two models per family the issue names; any other name can be given as an argument.
LISTED = (
    "ViT-B-16",
    "ViT-L-14",
    "vit_small_patch14_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_small_patch16_dinov3",
    "vit_base_patch16_dinov3",
    "eva02_base_patch14_224",
    "ViT-B-16-SigLIP2",
    "PE-Core-B-16",
)


@dataclass(frozen=True)
class BackboneRow:
    model: str
    family: str
    layers: int
    width: int
    input_size: int
    params_m: float  # millions, the whole image tower
    pool: str
    weights: str  # where weights come from besides a local file
    preprocessing: (
        str  # resize mode, filter and crop fraction from the library's config, or why it is refused
    )


def describe(model: str) -> BackboneRow:
    """What ``model`` is, built on the meta device (no weights allocated, nothing downloaded)."""
    family = backbones.for_model(model)
    tower = family.build(model, "meta")
    try:
        spec = family.preprocess(model)
        crop = f", crop_pct {spec.crop_pct:g}" if spec.crop_pct != 1.0 else ""
        preprocessing = f"{spec.resize}, {spec.interpolation}{crop}"
    except BackboneError as e:
        preprocessing = str(e).split(": ", 1)[-1]
    return BackboneRow(
        model=model,
        family=family.name,
        layers=len(family.blocks(tower)),
        width=family.width(tower),
        input_size=family.image_size(tower),
        params_m=round(sum(p.numel() for p in tower.parameters()) / 1e6, 1),
        pool=family.pool(tower),
        weights=family.weight_sources(model),
        preprocessing=preprocessing,
    )


@click.command("backbones")
@click.argument("models", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
def backbones_command(models: tuple[str, ...], as_json: bool) -> None:
    """List the supported backbone families (or describe MODELS): layers, width, input size, parameters,
    the layer feature's pooling and where weights come from."""
    try:
        rows = [describe(m) for m in models or LISTED]
    except BackboneError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        table = [
            asdict(r)
            | {
                "params_m": f"{r.params_m:.1f}",
                "weights": _short(r.weights, 60),
                "preprocessing": _short(r.preprocessing, 70),
            }
            for r in rows
        ]
        click.echo(format_table(table))
        click.echo(
            "Every family also takes --pretrained PATH: a safetensors file or a plain torch state dict."
        )


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
