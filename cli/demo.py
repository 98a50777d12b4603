"""``i2p demo``: the whole pipeline end to end on images it draws itself, in a few minutes on a CPU.

synthetic images -> ``i2p-train`` (tiny random-init ViT) -> ``i2p-export --fp16`` -> ``Detector`` on
held-out images. It proves that the stages run and connect; it is not a useful detector.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click
import numpy as np

from i2p.base.tables import format_table
from i2p.train.config import TrainConfig
from i2p.train.metrics import evaluate, metrics_table
from i2p.train.synthetic import make_image_folder

NOTICE = (
    "This demo trains a tiny random-init ViT on synthetic images to show the pipeline working end to end.\n"
    "It is not a useful detector: for that, train on real data with real CLIP weights (see README)."
)


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--epochs", default=3, show_default=True)
@click.option("--images", default=48, show_default=True, help="Training images per class and generator.")
def demo(out: Path, epochs: int, images: int) -> None:
    """Run train -> export -> detect on synthetic images (demonstrates the pipeline, not a detector)."""
    from i2p.export.pipeline import ExportOptions, run_export
    from i2p.runtime import Detector
    from i2p.train.loop import train

    click.echo(NOTICE + "\n")
    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    click.echo(f"[1/4] drawing synthetic images into {data}")
    make_image_folder(data / "train", n_per_class=images, size=(96, 80), seed=1)
    make_image_folder(data / "val", n_per_class=images // 3, size=(96, 80), seed=2)
    test = make_image_folder(
        data / "test", n_per_class=images // 3, generators=("gen_c",), size=(96, 80), seed=3
    )

    click.echo("\n[2/4] i2p-train: critical layer + low-sensitivity subspace tuning")
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
    train(cfg)

    click.echo("\n[3/4] i2p-export --fp16")
    result = run_export(
        ExportOptions(ckpt=out / "run" / "checkpoint.safetensors", out=out / "demo.i2p", fp16=True),
        echo=click.echo,
    )

    click.echo(f"\n[4/4] Detector({result.artifact}) on {len(test)} held-out images of an unseen 'generator'")
    det = Detector(result.artifact)
    preds = det.predict([path for path, _, _ in test])
    y = np.array([label for _, label, _ in test])
    p = np.array([r.probability for r in preds])
    click.echo(
        format_table(
            [
                {
                    "file": Path(r.source).name,
                    "truth": "fake" if t else "real",
                    "probability": r.probability,
                    "verdict": "fake" if r.is_fake else "real",
                }
                for r, t in list(zip(preds, y, strict=True))[:: max(1, len(preds) // 8)]
            ]
        )
    )
    click.echo("\n" + metrics_table(evaluate(y, p, [g for _, _, g in test], det.threshold)))
    click.echo(
        f"\nbackend {det.backend.name} ({det.backend.precision}); demo finished in "
        f"{time.perf_counter() - start:.0f} s. Artifacts in {out}.\n{NOTICE}"
    )
