"""``i2p demo``: the whole pipeline end to end on images it draws itself, in a few minutes on a CPU.

synthetic images -> ``i2p-train`` (tiny random-init ViT) -> ``i2p-export --fp16`` -> ``Detector`` on
held-out images. It proves that the stages run and connect; it is not a useful detector.

``--out`` must be new, empty, or a previous demo's output (marked by ``.i2p-demo``): the demo only ever
deletes the entries it writes itself, never a directory it did not create.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import click
import numpy as np

from i2p.base.tables import format_table
from i2p.evaluation.metrics import Metrics, evaluate, metrics_table
from i2p.synthetic import Row, make_image_folder
from i2p.train.config import TrainConfig

NOTICE = (
    "This demo trains a tiny random-init ViT on synthetic images to show the pipeline working end to end.\n"
    "It is not a useful detector: for that, train on real data with real CLIP weights (see README)."
)
MARKER = ".i2p-demo"  # written first: says the directory is a demo's output, safe to redo
ENTRIES = ("data", "run", "demo.i2p", MARKER)  # everything the demo writes under --out


def prepare_out(out: Path) -> None:
    """Make ``out`` ready: refuse a file or a non-empty directory that is not a demo's output."""
    if out.exists() and not out.is_dir():
        raise click.BadParameter(
            f"{out} is a file; give a directory for the demo's outputs", param_hint="--out"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise click.BadParameter(
            f"{out} is not empty and not a previous demo output (no {MARKER} in it); the demo would "
            "overwrite it. Choose a new or empty directory",
            param_hint="--out",
        )
    for name in ENTRIES:  # a previous demo's outputs; anything else the user put there stays
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `i2p demo`: `i2p demo --out` may delete what it wrote here\n")


def command_path(name: str) -> str:
    """``name`` as it runs from any shell: the script beside this interpreter (``.venv/bin/i2p-detect``).

    The Quickstart never activates the venv, so a bare ``i2p-detect`` would be "command not found".
    """
    script = Path(sys.executable).parent / name
    return str(script.absolute()) if script.is_file() else name


def next_commands(out: Path) -> list[str]:
    """What to run next on the demo's own outputs, each runnable as printed (absolute, quoted paths)."""
    art, ckpt, test = out / "demo.i2p", out / "run" / "checkpoint.safetensors", out / "data" / "test"
    train = out / "data" / "train"
    commands = [
        ["i2p-detect", test, "--recursive", "--model", art, "--csv", out / "detections.csv"],
        ["i2p-bench", "--model", art, "--batch-sizes", "1,8"],
        ["i2p", "eval", "--ckpt", ckpt, "--data", test],
        [
            "i2p",
            "layers",
            "--data",
            train,
            "--model",
            "i2p-tiny-vit",
            "--pretrained",
            "none",
            "--out",
            out / "layers",
        ],
    ]
    return [
        shlex.join(
            [command_path(str(c[0])), *(str(a.absolute()) if isinstance(a, Path) else a for a in c[1:])]
        )
        for c in commands
    ]


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option(
    "--images",
    default=48,
    show_default=True,
    type=click.IntRange(6, 10_000),
    help="Training images per class and generator.",
)
@click.option("--json", "as_json", is_flag=True, help="Progress to stderr; a JSON summary on stdout.")
def demo(out: Path, epochs: int, images: int, as_json: bool) -> None:
    """Run train -> export -> detect on synthetic images (demonstrates the pipeline, not a detector)."""
    prepare_out(out)
    with redirect_stdout(sys.stderr if as_json else sys.stdout):
        summary = _run(out, epochs, images)
    if as_json:
        click.echo(json.dumps(summary, indent=2))


def _run(out: Path, epochs: int, images: int) -> dict:
    from i2p.export.pipeline import ExportOptions, run_export
    from i2p.train.loop import train

    click.echo(NOTICE + "\n")
    start = time.perf_counter()
    click.echo(f"[1/4] drawing synthetic images into {out / 'data'}")
    cfg, test = _draw_data(out, epochs, images)

    click.echo("\n[2/4] i2p-train: critical layer + low-sensitivity subspace tuning")
    meta = train(cfg)

    click.echo("\n[3/4] i2p-export --fp16")
    result = run_export(
        ExportOptions(ckpt=out / "run" / "checkpoint.safetensors", out=out / "demo.i2p", fp16=True),
        echo=click.echo,
    )

    click.echo(f"\n[4/4] Detector({result.artifact}) on {len(test)} held-out images of an unseen 'generator'")
    det, metrics = _detect(result.artifact, test)
    elapsed = time.perf_counter() - start
    commands = next_commands(out)
    click.echo(
        f"\nbackend {det.backend.name} ({det.backend.precision}); demo finished in {elapsed:.0f} s. "
        f"Outputs in {out}.\n{NOTICE}\n\nNext, on these outputs:\n" + "\n".join(f"  {c}" for c in commands)
    )
    return {
        "out": str(out),
        "checkpoint": str(out / "run" / "checkpoint.safetensors"),
        "artifact": str(result.artifact),
        "layer": meta.layer,
        "threshold": det.threshold,
        "backend": det.backend.name,
        "metrics": {g: m.to_dict() for g, m in metrics.items()},
        "seconds": round(elapsed, 1),
        "next": commands,
    }


def _draw_data(out: Path, epochs: int, images: int) -> tuple[TrainConfig, list[Row]]:
    """Synthetic train/val folders (two generators) and a held-out test folder (a third): the config and test rows."""
    data = out / "data"
    make_image_folder(data / "train", n_per_class=images, size=(96, 80), seed=1)
    make_image_folder(data / "val", n_per_class=images // 3, size=(96, 80), seed=2)
    test = make_image_folder(
        data / "test", n_per_class=images // 3, generators=("gen_c",), size=(96, 80), seed=3
    )
    cfg = TrainConfig(
        data=str(data / "train"),
        val=str(data / "val"),
        out=str(out / "run"),
        model="i2p-tiny-vit",
        pretrained="none",
        rank=4,
        epochs=epochs,
        batch_size=32,
        workers=0,
    )
    return cfg, test


def _detect(artifact: Path, test: list[Row]) -> tuple[Any, dict[str, Metrics]]:
    """The Detector on the test rows: a sample table and the metrics at its threshold, printed."""
    from i2p.runtime import Detector

    det = Detector(artifact)
    preds = det.predict([path for path, _, _ in test])
    y = np.array([label for _, label, _ in test])
    p = np.array([r.probability for r in preds])
    sample = list(zip(preds, y, strict=True))[:: max(1, len(preds) // 8)]
    rows = [
        {"path": r.source, "truth": "fake" if t else "real", "probability": r.probability, "verdict": r.label}
        for r, t in sample
    ]
    click.echo(format_table(rows))
    metrics = evaluate(y, p, [g for _, _, g in test], det.threshold)
    click.echo("\n" + metrics_table(metrics))
    return det, metrics
