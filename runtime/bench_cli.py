"""``i2p-bench``: latency percentiles and throughput of an artifact's network per batch size."""

from __future__ import annotations

import json
import time

import click
import numpy as np

from i2p.base.tables import format_table

from .backends import InferenceError
from .detect_cli import echo, load_detector, model_options
from .detector import Detector

MAX_BENCH_BATCH = 1024  # i2p-bench: a [1024, 3, 224, 224] float32 input is 600 MB
MAX_BENCH_INPUT_BYTES = 2**30  # and no input batch over 1 GiB, whatever the input size


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: give positive integers separated by commas, e.g. 1,8,32")
    if max(sizes) > MAX_BENCH_BATCH:
        raise click.BadParameter(f"{max(sizes)}: batch sizes go up to {MAX_BENCH_BATCH}")
    return sizes


def _timed_call(detector: Detector, x: np.ndarray) -> float:
    """Seconds of one ``predict_batch``; a network failing on the batch is a message, not a traceback."""
    t0 = time.perf_counter()
    try:
        detector.predict_batch(x)
    except InferenceError as e:
        raise click.ClickException(f"the network failed on a batch of {len(x)}: {e}") from e
    return time.perf_counter() - t0


@click.command()
@model_options
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=_batch_sizes)
@click.option(
    "--iters", type=click.IntRange(1), default=50, show_default=True, help="Timed calls per batch size."
)
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True, help="Untimed calls first.")
@click.option("--json", "as_json", is_flag=True)
def bench(
    model: str,
    backend: str,
    device: int,
    precision: str | None,
    threads: int | None,
    batch_sizes: list[int],
    iters: int,
    warmup: int,
    as_json: bool,
) -> None:
    """Latency percentiles and throughput of the network (preprocessing excluded) per batch size."""
    detector = load_detector(model, backend, device, precision, threads, batch_size=max(batch_sizes))
    size = detector.spec.size
    if max(batch_sizes) * 3 * size * size * 4 > MAX_BENCH_INPUT_BYTES:  # a large --model input side
        largest = MAX_BENCH_INPUT_BYTES // (3 * size * size * 4)
        raise click.BadParameter(
            f"at {size}x{size}, batch sizes go up to {largest}", param_hint="--batch-sizes"
        )
    rng = np.random.default_rng(0)
    rows = []
    for bs in batch_sizes:
        x = rng.standard_normal((bs, 3, size, size), dtype=np.float32)
        for _ in range(warmup):
            _timed_call(detector, x)
        times = np.array([_timed_call(detector, x) for _ in range(iters)])
        p50, p90, p99 = np.percentile(times, [50, 90, 99]) * 1e3
        rows.append(
            {
                "batch_size": bs,
                "p50_ms": float(p50),
                "p90_ms": float(p90),
                "p99_ms": float(p99),
                "mean_ms": float(times.mean() * 1e3),
                "images_per_s": float(bs / times.mean()),
            }
        )
    m = detector.manifest
    header = {
        "model": m.name,
        "backbone": m.backbone,
        "layers": f"{m.layer}/{m.num_layers}",
        "input": f"{size}x{size}",
        "backend": detector.backend.name,
        "precision": detector.backend.precision,
        "iters": iters,
        "warmup": warmup,
    }
    if as_json:
        echo(json.dumps({**header, "results": rows}, indent=2))
    else:
        echo(", ".join(f"{k} {v}" for k, v in header.items()) + "\n" + format_table(rows))
