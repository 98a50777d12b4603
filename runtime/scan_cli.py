"""``i2p scan``, the command: check the artifact and the SOURCE on the driver, connect to Ray (a local
instance on 127.0.0.1 without ``--address``), run ``ray_scan.scan`` and print its summary."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import click
import ray
from ray.data import DataContext

from i2p.base.tables import format_table

from .cells import display
from .manifest import ArtifactError, read_manifest
from .ray_scan import SHARD_SIZE, ScanError, scan
from .scan_sources import MissingSource, SourceError, list_inputs


@contextmanager
def ray_session(address: str | None, cpus: int) -> Iterator[None]:
    """Connected to Ray for the scan: a local instance of ``cpus`` CPUs without ``address``, shut down
    after. An instance this process already holds is used as it is."""
    DataContext.get_current().enable_progress_bars = False  # the scan has its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        yield
        return
    temp = None
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        temp = tempfile.mkdtemp(prefix="i2p-ray-")
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    try:
        yield
    finally:
        ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


@click.command("scan")
@click.argument("source")
@click.option("--model", "-m", required=True, type=click.Path(exists=True, file_okay=False), help="Artifact.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the shards.")
@click.option(
    "--address", metavar="ADDR", help="A running Ray cluster (ray://HOST:10001, auto); default: local."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 4096),
    default=None,
    help="Actors (one CPU each).  [default: local: this machine's CPUs; cluster: its CPUs]",
)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--shard-size", type=click.IntRange(1), default=SHARD_SIZE, show_default=True,
              help="Inputs per output file.")  # fmt: skip
@click.option("--csv", "as_csv", is_flag=True, help="Also a CSV beside each Parquet shard.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Default: the artifact's.")
@click.option("--operating-point", default=None, help="A named operating point of the artifact.")
@click.option("--num-gpus", type=click.FloatRange(0, 64), default=0.0, show_default=True,
              help="GPUs per actor (e.g. 1, or 0.25 for four actors per GPU).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The summary as JSON.")
def scan_command(
    source: str,
    model: str,
    out: str,
    address: str | None,
    workers: int | None,
    batch_size: int,
    shard_size: int,
    as_csv: bool,
    threshold: float | None,
    operating_point: str | None,
    num_gpus: float,
    as_json: bool,
) -> None:
    """Score every image SOURCE names on Ray Data: one Parquet row per input in OUT/part-*.parquet.

    SOURCE: a folder, a glob, a .txt/.parquet list of paths or URIs, or an object-store prefix
    (s3://bucket/prefix/). Re-running the same command skips the shards already written, so an
    interrupted scan completes without scoring anything twice. Unreadable images are error rows.
    """
    try:
        read_manifest(model)  # refuse a broken artifact here, before any worker starts
        inputs = list_inputs(source)
    except MissingSource as e:
        raise click.UsageError(str(e)) from None
    except (ArtifactError, SourceError) as e:
        raise click.ClickException(str(e)) from None
    if not inputs.paths:
        raise click.ClickException(f"{source}: no images to scan")
    local_cpus = os.cpu_count() or 1
    with ray_session(address, workers or local_cpus):
        actors = workers or (max(1, int(ray.cluster_resources().get("CPU", 1))) if address else local_cpus)
        try:
            summary = scan(
                inputs.paths,
                model,
                out,
                workers=actors,
                batch_size=batch_size,
                shard_size=shard_size,
                csv=as_csv,
                threshold=threshold,
                operating_point=operating_point,
                num_gpus=num_gpus,
                progress=True,
            )
        except ScanError as e:
            raise click.ClickException(str(e)) from None
        except ray.exceptions.RayError as e:  # an actor that cannot load the model, a lost cluster, ...
            raise click.ClickException(
                f"the scan failed on Ray ({str(e).strip().splitlines()[-1][:2000]}); the shards written so far "
                f"are in {out}: run the same command again to continue"
            ) from None
    row = summary.table_row() | {"duplicates": inputs.duplicates, "out": display(str(out))}
    click.echo(json.dumps(row) if as_json else format_table([row]))
