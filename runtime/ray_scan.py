"""``i2p scan``: score every image a SOURCE names on Ray Data, one Parquet row per input, resumable.

The driver lists the inputs (``scan_sources``), sorts them and cuts them into shards of ``shard_size``.
Each shard's output file is named by its number and a digest of its inputs, the model's manifest and the
threshold, so a re-run of the same command plans the same files: shards already written are skipped, and
nothing is scored twice. Rows come back from the ``DetectImages`` actors in any order; the driver files
each under its (shard, index) and writes a shard atomically once all its rows are in, so a shard on disk
is always complete, a retried task cannot add a duplicate, and a lost row stops the scan with an error.
Without ``--address`` a local Ray instance runs on 127.0.0.1 for the scan and is shut down after it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import DataContext

from i2p.base.files import sha256_file, write_bytes_atomic
from i2p.base.tables import format_table

from .cells import csv_cell, display
from .manifest import MANIFEST, ArtifactError, read_manifest
from .ray_stage import RESULT_COLUMNS, DetectImages
from .scan_sources import MissingSource, SourceError, list_inputs

SHARD_SIZE = 10_000  # inputs per output file
PART_GLOB = "part-*.parquet"
OUTPUT_COLUMNS = ("path", *RESULT_COLUMNS)
log = logging.getLogger("i2p")


@dataclass(frozen=True)
class Shard:
    """A run of consecutive inputs whose rows go to one output file."""

    number: int
    paths: Sequence[str]
    name: str  # part-NNNNNN-DIGEST.parquet


@dataclass
class ScanSummary:
    inputs: int
    shards: int
    shards_skipped: int  # already written by an earlier run
    scored: int = 0
    errors: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)  # every shard file of the scan

    def table_row(self) -> dict[str, Any]:
        rate = round(self.scored / self.seconds, 1) if self.seconds > 0 else None
        return {
            "inputs": self.inputs,
            "shards": self.shards,
            "skipped shards": self.shards_skipped,
            "scored": self.scored,
            "errors": self.errors,
            "seconds": round(self.seconds, 1),
            "images/s": rate,
        }


def plan_shards(paths: Sequence[str], scan_key: str, shard_size: int = SHARD_SIZE) -> list[Shard]:
    """Consecutive runs of ``shard_size`` sorted inputs, each named by its number and a digest of its inputs."""
    shards = []
    for number, start in enumerate(range(0, len(paths), shard_size)):
        chunk = paths[start : start + shard_size]
        h = hashlib.sha256(scan_key.encode())
        for p in chunk:
            h.update(p.encode("utf-8", "surrogateescape") + b"\0")
        shards.append(Shard(number, chunk, f"part-{number:06d}-{h.hexdigest()[:16]}.parquet"))
    return shards


def scan_key(model: str | os.PathLike, threshold: float | None, operating_point: str | None) -> str:
    """What besides the inputs decides a row: the artifact's manifest (hence every file's sha256) and the
    threshold asked for."""
    manifest = Path(model) / MANIFEST
    return f"{sha256_file(manifest)}:{threshold}:{operating_point}"


def scan(
    paths: Sequence[str],
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    workers: int,
    batch_size: int = 32,
    shard_size: int = SHARD_SIZE,
    csv: bool = False,
    threshold: float | None = None,
    operating_point: str | None = None,
    num_gpus: float = 0.0,
    stage: type = DetectImages,
    progress: bool = False,
) -> ScanSummary:
    """Score ``paths`` on the Ray instance this process is connected to, into shard files under ``out``.

    ``num_gpus``: GPUs per actor (0.25: four actors share a GPU, so their decoding overlaps).
    ``stage`` is the ``map_batches`` class (``DetectImages``, or a subclass). Raises ``ScanError`` when
    ``out`` holds shards of another scan, or when rows go missing.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(paths, scan_key(model, threshold, operating_point), shard_size)
    _check_foreign(out, {s.name for s in shards})
    pending = [s for s in shards if not (out / s.name).is_file()]
    summary = ScanSummary(len(paths), len(shards), len(shards) - len(pending))
    summary.files = [str(out / s.name) for s in shards]
    if csv:
        for s in shards:
            if s not in pending and not (out / _csv_name(s)).is_file():  # written by a run without --csv
                _write_csv(out / _csv_name(s), _read_rows(out / s.name))
    start = time.perf_counter()
    if pending:
        ds = _dataset(pending, batch_size).map_batches(
            stage,
            fn_constructor_kwargs={
                "model": os.path.abspath(model),
                "batch_size": batch_size,
                "threshold": threshold,
                "operating_point": operating_point,
            },
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_size=batch_size,
            num_cpus=1,
            num_gpus=num_gpus,
        )
        by_number = {s.number: s for s in pending}
        collected: dict[int, dict[int, dict[str, Any]]] = {s.number: {} for s in pending}
        with _progress_bar(sum(len(s.paths) for s in pending), progress) as advance:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for number in _file_rows(batch, collected):
                    if len(collected[number]) == len(by_number[number].paths):
                        rows = collected.pop(number)
                        _write_shard(out, by_number[number], rows, csv)
                        summary.scored += len(rows)
                        summary.errors += sum(r["error"] is not None for r in rows.values())
                        advance(len(rows))
        if collected:
            missing = {n: len(by_number[n].paths) - len(rows) for n, rows in collected.items()}
            raise ScanError(
                f"rows missing from the scan's output: {missing} (shard: rows); re-run to score them"
            )
    summary.seconds = time.perf_counter() - start
    return summary


class ScanError(RuntimeError):
    """The scan cannot run or did not complete; the message says what to do."""


def _dataset(shards: Sequence[Shard], block_rows: int) -> Any:
    """Blocks of at most ``block_rows`` inputs (path, shard number, index in the shard).

    A block is what one actor call takes, so blocks as small as a batch keep every actor busy to the end:
    with one block per shard, 3 shards on 2 actors left one actor idle for the last third of the scan.
    Rows carry their shard and index, so shards are reassembled whatever the blocks.
    """
    return ray.data.from_arrow(
        [_block(s, start, block_rows) for s in shards for start in range(0, len(s.paths), block_rows)]
    )


def _block(shard: Shard, start: int, rows: int) -> pa.Table:
    paths = shard.paths[start : start + rows]
    return pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "shard": pa.array(np.full(len(paths), shard.number, np.int64)),
            "index": pa.array(np.arange(start, start + len(paths), dtype=np.int64)),
        }
    )


def _file_rows(batch: dict[str, np.ndarray], collected: dict[int, dict[int, dict[str, Any]]]) -> set[int]:
    """File each row of ``batch`` under its shard and index (a retried task's repeat overwrites itself);
    returns the shards that got rows."""
    touched = set()
    for i, (number, index) in enumerate(zip(batch["shard"].tolist(), batch["index"].tolist(), strict=True)):
        if number in collected:  # else: its shard is written already (a repeat from a retried task)
            collected[number][index] = {c: _cell(batch[c][i]) for c in OUTPUT_COLUMNS}
            touched.add(number)
    return touched


def _cell(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and np.isnan(value) else value


def _write_shard(out: Path, shard: Shard, rows: dict[int, dict[str, Any]], csv: bool) -> None:
    """The shard's rows in input order, written atomically (CSV first: the Parquet file marks it done)."""
    ordered = [rows[i] for i in range(len(shard.paths))]
    if csv:
        _write_csv(out / _csv_name(shard), ordered)
    table = pa.Table.from_pylist(ordered, schema=_schema())
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_bytes_atomic(out / shard.name, buffer.getvalue())


def _schema() -> Any:
    string = pa.string()
    return pa.schema(
        [
            ("path", string),
            ("probability", pa.float64()),
            ("verdict", string),
            ("threshold", pa.float64()),
            ("operating_point", string),
            ("model_sha256", string),
            ("error", string),
            ("ood", pa.float64()),  # null: an error row, or an artifact without the OOD output
            ("uncertain", pa.bool_()),
        ]
    )


def _csv_name(shard: Shard) -> str:
    return shard.name.removesuffix(".parquet") + ".csv"


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Cells made safe to show (``outputs.display``) and to open in a spreadsheet (``outputs.csv_cell``)."""
    import csv as csv_module

    text = io.StringIO()
    writer = csv_module.writer(text)
    writer.writerow(OUTPUT_COLUMNS)
    for row in rows:  # by name: a shard written before the ood columns lacks them (empty cells)
        cells = (row.get(c) for c in OUTPUT_COLUMNS)
        writer.writerow([csv_cell(display(v)) if isinstance(v, str) else v for v in cells])
    write_bytes_atomic(path, text.getvalue().encode())


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def _check_foreign(out: Path, planned: set[str]) -> None:
    foreign = sorted(p.name for p in out.glob(PART_GLOB) if p.name not in planned)
    if foreign:
        raise ScanError(
            f"{out} holds {len(foreign)} shard file(s) of another scan (other inputs, shard size, model or "
            f"threshold), "
            f"e.g. {foreign[0]}; write to an empty --out, or remove them to rescan"
        )


@contextmanager
def _progress_bar(total: int, show: bool) -> Iterator[Any]:
    """advance(n): a bar with images/s on a terminal, else a line per shard on stderr."""
    start, done = time.perf_counter(), 0

    def rate() -> str:
        elapsed = time.perf_counter() - start
        return f"{done / elapsed:.1f} images/s" if elapsed > 0 and done else ""

    if show and sys.stderr.isatty():
        with click.progressbar(
            length=total, label="scan", file=sys.stderr, show_pos=True, item_show_func=lambda _: rate()
        ) as bar:

            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.update(n, current_item=done)

            yield advance
        return

    def advance_lines(n: int) -> None:
        nonlocal done
        done += n
        if show:
            click.echo(f"scan: {done}/{total} images, {rate()}", err=True)

    yield advance_lines


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
