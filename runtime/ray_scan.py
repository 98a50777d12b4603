"""The scan behind ``i2p scan`` (``scan_cli``): every input on Ray Data, one Parquet row each, resumable.

The driver lists the inputs (``scan_sources``), sorts them and cuts them into shards of ``shard_size``.
Each shard's output file is named by its number and a digest of its inputs, the model's manifest and the
threshold, so a re-run of the same command plans the same files: shards already written are skipped, and
nothing is scored twice. Rows come back from the ``DetectImages`` actors in any order; the driver files
each under its (shard, index) and writes a shard atomically once all its rows are in, so a shard on disk
is always complete, a retried task cannot add a duplicate, and a lost row stops the scan with an error.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
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

from i2p.base.files import sha256_file, write_bytes_atomic

from .cells import csv_cell, display
from .manifest import MANIFEST
from .ray_stage import RESULT_COLUMNS, DetectImages

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
