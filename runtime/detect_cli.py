"""``i2p-detect`` (score image files) and ``i2p-bench`` (latency and throughput of an artifact)."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from i2p.base.progress import HEARTBEAT_SECONDS, Progress
from i2p.base.tables import format_table

from . import schema
from .cells import Row, path_cell, safe_row
from .detector import BACKENDS, PRECISIONS, BackendUnavailableError, Detector, Prediction
from .manifest import ArtifactError
from .output_open import OutputError
from .outputs import ROW_COLUMNS, DoneSet, Scorer, file_row, file_sink, partial_path
from .sources import iter_images, survey
from .streaming import StreamingDetector


class _ClickHandler(logging.Handler):
    """Log records to stderr through click, which follows stream redirection (and CliRunner)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _log_to_stderr() -> None:
    logger = logging.getLogger("i2p")
    if not any(isinstance(h, _ClickHandler) for h in logger.handlers):
        logger.addHandler(_ClickHandler())
    logger.setLevel(logging.INFO)


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that choose and load the artifact, shared by both commands."""
    for option in reversed(
        [
            click.option(
                "--model",
                "-m",
                type=click.Path(exists=True),  # a file gets the Detector's message (e.g. "a checkpoint")
                help="Artifact directory written by i2p-export.",
            ),
            click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True),
            click.option("--device", type=click.IntRange(0), default=0, show_default=True, help="GPU index."),
            click.option(
                "--precision",
                type=click.Choice(PRECISIONS),
                default=None,
                help="Default: fp16 on a GPU; on the CPU int8 if the artifact has it, else fp32.",
            ),
            click.option(
                "--threads", type=click.IntRange(1), default=None, help="CPU threads for ONNX Runtime."
            ),
        ]
    ):
        f = option(f)
    return f


def load_detector(
    model: str, backend: str, device: int, precision: str | None, threads: int | None, **kw: Any
) -> Detector:
    _log_to_stderr()
    if model is None:
        raise click.UsageError("Missing option '--model' / '-m'.")
    try:
        return Detector(model, backend=backend, device=device, precision=precision, threads=threads, **kw)
    except ArtifactError as e:  # a bad input file, not a misused option: exit 1 (README: exit codes)
        raise click.ClickException(f"--model: {e}") from e
    except BackendUnavailableError as e:
        raise click.BadParameter(str(e), param_hint="--backend") from e
    except ValueError as e:  # an option combination the Detector refuses
        raise click.UsageError(str(e)) from e
    except RuntimeError as e:  # a backend that could not load the model
        raise click.ClickException(str(e)) from e


# -- i2p-detect -----------------------------------------------------------------------------------------


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@model_options
@click.option("--recursive", "-r", is_flag=True, help="Walk subdirectories.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write rows to this CSV file.")
@click.option(
    "--jsonl", "jsonl_out", type=click.Path(dir_okay=False), help="Write rows to this JSON-lines file."
)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=min(8, os.cpu_count() or 1),
    show_default=True,
    help="Decode threads.",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    callback=lambda ctx, param, v: threshold_option(v),
    help="Default: the artifact's calibrated one.",
)
@click.option(
    "--operating-point",
    metavar="NAME",
    help="Use the artifact's named threshold (e.g. one added by i2p calibrate) instead of its default.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted --csv/--jsonl run: skip the files already in OUT.partial (or OUT), append the rest.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table (summary as JSON).")
@click.option(
    "--server",
    metavar="URL",
    help="Score on a Triton server running the ensemble from i2p-export --triton (grpc://HOST:8001 or "
    "http://HOST:8000) instead of --model; --workers requests of --batch-size images in flight.",
)
@click.option(
    "--timeout", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True,
    help="--server: seconds per request; a request that fails becomes error rows.",
)  # fmt: skip
def detect(
    paths: tuple[str, ...],
    model: str,
    backend: str,
    device: int,
    precision: str | None,
    threads: int | None,
    recursive: bool,
    csv_out: str | None,
    jsonl_out: str | None,
    batch_size: int,
    workers: int,
    threshold: float | None,
    operating_point: str | None,
    as_json: bool,
    resume: bool,
    server: str | None,
    timeout: float,
) -> None:
    """Score image files (PATHS: files and directories) as real or generated.

    One row per file: path, probability, label (real/fake) and error. Unreadable images are rows with
    an error, not failures: the exit status is 0 whenever the run completed. A --csv/--jsonl file is
    written as OUT.partial and renamed to OUT at the end; after Ctrl-C (exit 130) or a crash, --resume
    continues it. Decoding threads share one memory budget (I2P_DECODE_MEMORY_MB, default 2048).
    """
    if csv_out and jsonl_out:
        raise click.UsageError("--csv and --jsonl are exclusive: choose one output file")
    if resume and not (csv_out or jsonl_out):
        raise click.UsageError("--resume continues a --csv or --jsonl file: give the one to continue")
    # Pillow warns (corrupt EXIF, palette transparency) on files that decode fine; the rows say what failed.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    if sys.stdout is None:  # started with descriptor 1 closed: rows or the summary would vanish
        raise click.ClickException("standard output is closed; redirect it (e.g. >/dev/null) to discard it")
    if server and model:
        raise click.UsageError("--model and --server are exclusive: score here or on the server")
    if server and operating_point:
        raise click.UsageError(
            "--operating-point names a point of a local --model; with --server, pass that point's --threshold"
        )
    detector: StreamingDetector
    if server:
        detector = _connect(server, batch_size, workers, timeout, threshold)
    else:
        detector = load_detector(
            model, backend, device, precision, threads, batch_size=batch_size, threshold=threshold,
            operating_point=operating_point,
        )  # fmt: skip
    scorer = Scorer(detector.scorer.model_id, detector.threshold)
    out = csv_out or jsonl_out
    start = time.perf_counter()
    counts, skipped, complete = _score(
        detector, paths, recursive, workers, csv_out, jsonl_out, as_json, resume, scorer
    )
    elapsed = time.perf_counter() - start
    files = sum(counts.values())
    summary = {
        "files": files,
        "fake": counts["fake"],
        "real": counts["real"],
        "errors": counts["error"],
        "skipped": skipped,  # --resume: already in the output
        "complete": complete,
        "seconds": round(elapsed, 3),
        "images_per_s": round(files / elapsed, 1) if elapsed > 0 else None,
        "backend": detector.scorer.name,
        "precision": detector.scorer.precision,
        "threshold": detector.threshold,
    }
    echo(json.dumps(summary) if as_json else format_table([summary]), err=not out or not complete)
    if not complete:
        where = f"the rows so far are in {partial_path(out)}; " if out else ""
        click.echo(
            f"i2p-detect: interrupted after {files} files: {where}run again with --resume to continue",
            err=True,
        )
        raise SystemExit(130)
    if files + skipped == 0:
        raise click.ClickException(survey(paths, recursive))


def _score(
    detector: StreamingDetector,
    paths: tuple[str, ...],
    recursive: bool,
    workers: int,
    csv_out: str | None,
    jsonl_out: str | None,
    as_json: bool,
    resume: bool,
    scorer: Scorer,
) -> tuple[Counter[str], int, bool]:
    """Score and write every file not already in the output: (label counts, files skipped, completed?).

    Ctrl-C ends the run early (completed = False); the rows written so far stay in OUT.partial.
    """
    counts: Counter[str] = Counter()
    skipped, opened = 0, False
    try:
        with _row_sink(csv_out, jsonl_out, as_json, resume, scorer) as (write, done):
            skipped, opened = len(done), True
            sources = iter_images(paths, recursive)
            if skipped:
                sources = (p for p in sources if path_cell(p) not in done)
            stream = detector.predict_stream(sources, workers)
            with _progress(stream, paths, recursive, skipped) as bar:
                for prediction in bar:
                    write(_row(prediction))
                    counts[prediction.label or "error"] += 1
    except KeyboardInterrupt:
        return counts, skipped, False
    except OutputError as e:
        out = csv_out or jsonl_out
        kept = (
            f"; the rows written so far are in {partial_path(out)}"
            if out and opened and partial_path(out).is_file()  # not for a refused (planted, locked) one
            else ""
        )
        raise click.ClickException(f"{e}{kept}") from None
    return counts, skipped, True


def threshold_option(value: float | None) -> float | None:
    """The one check of a --threshold option (i2p-detect, i2p eval --model and --ckpt): a finite probability."""
    try:
        return None if value is None else schema.probability(value, "--threshold")
    except schema.SchemaError:
        raise click.BadParameter(f"{value} is not a probability in [0, 1]") from None


def echo(text: str, err: bool = False) -> None:
    """click.echo; a full disk or a closed pipe is one clear error, not a traceback."""
    stream = "standard error" if err else "standard output"
    try:
        if (sys.stderr if err else sys.stdout) is None:  # click.echo would drop the text without a word
            raise OSError(errno.EBADF, "it is closed")
        click.echo(text, err=err)
    except OSError as e:
        _silence_stdout()
        raise click.ClickException(f"{stream}: cannot write ({e.strerror or e})") from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again on the same error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real descriptor (CliRunner, a closed stream)
        pass


def _connect(
    server: str, batch_size: int, workers: int, timeout: float, threshold: float | None
) -> StreamingDetector:
    from .remote import RemoteDetector, ServerError

    _log_to_stderr()
    try:
        return RemoteDetector(
            server, batch_size=batch_size, concurrency=workers, timeout=timeout, threshold=threshold
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--server") from e
    except ServerError as e:
        raise click.ClickException(str(e)) from e


def _row(p: Prediction) -> Row:
    return {
        "path": p.source,
        "probability": p.probability,
        "label": p.label,
        "error": p.error,
        "ood": p.ood,
        "uncertain": p.uncertain,
    }


@contextmanager
def _row_sink(
    csv_out: str | None, jsonl_out: str | None, as_json: bool, resume: bool, scorer: Scorer
) -> Iterator[tuple[Callable[[Row], None], DoneSet]]:
    """(write one row, path cells already done): a CSV/JSONL file (``outputs.file_sink``), or stdout (JSON
    lines as the JSONL file has them, or a table at the end, its cells through ``outputs.display``)."""
    if csv_out or jsonl_out:
        with file_sink(csv_out or jsonl_out, "csv" if csv_out else "jsonl", resume, scorer) as sink:
            yield sink
    elif as_json:
        yield (lambda row: echo(json.dumps(file_row(row, scorer)))), DoneSet()
    else:  # a table needs every row for its column widths; use --csv/--jsonl for very large runs
        rows: list[Row] = []
        yield (lambda row: rows.append(safe_row(row))), DoneSet()
        echo(format_table(rows, ROW_COLUMNS))


@contextmanager
def _progress(
    stream: Iterator[Prediction], paths: tuple[str, ...], recursive: bool, done: int
) -> Iterator[Progress]:
    """Files stream in as the folders are walked; a second walk counts them meanwhile for the total and ETA.

    A bar on a terminal; in a log, heartbeat lines once the run is expected to take over 30 s.
    """
    with Progress(stream, desc="detect", unit="img", quiet_below=HEARTBEAT_SECONDS) as bar:

        def count() -> None:
            bar.total = max(
                sum(1 for _ in iter_images(paths, recursive)) - done, 0
            )  # less what --resume skips

        threading.Thread(target=count, name="i2p-count-inputs", daemon=True).start()
        yield bar
