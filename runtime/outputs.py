"""Where ``i2p-detect`` rows go: exact paths, safe text, CSV/JSONL files that are never lost or half-trusted.

- Cells: the ``path`` cell is the file's exact path, every other text cell is made safe to show
  (``i2p.runtime.cells``); ``--resume`` matches files on the exact form, so two files never share a row.
- Every row records the scorer: ``model`` (``sha256:`` + the manifest's sha256, or the Triton ensemble)
  and ``threshold``; ``--resume`` refuses a file scored by another model or threshold, and a file of an
  earlier i2p-detect (keyed on display names, no model) with the reason.
- A file output is written to ``OUT.partial`` (one flushed row at a time) and renamed to ``OUT`` when the
  run completes. ``OUT.partial`` is opened without following links (``O_NOFOLLOW``), must be a regular
  file with one link, and is locked (``flock``, non-blocking) for the whole run: a second i2p-detect
  writing it is refused before it truncates anything. ``--resume`` reads the rows already in
  ``OUT.partial`` (or continues a complete ``OUT`` in place, renamed, never copied) with bounded line
  reads: a torn last line of any length is cut off, a line over 1 MiB or one that is not a row of ours is
  refused naming its line number.
- Files are opened by ``i2p.runtime.output_open``: no planted link followed, no second writer.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from .cells import Row, csv_cell, display, path_cell
from .output_open import OutputError, open_regular, open_stream, path_kind

ROW_COLUMNS = ("path", "probability", "label", "error")  # the table
FILE_COLUMNS = (*ROW_COLUMNS, "model", "threshold", "ood", "uncertain")  # CSV/JSONL files and --json lines
# A CSV written before the OOD score: --resume continues it with these columns (ood/uncertain left out).
LEGACY_COLUMNS = FILE_COLUMNS[:6]
_LEGACY_HEADER = ",".join(LEGACY_COLUMNS).encode() + b"\r\n"
PARTIAL_SUFFIX = ".partial"
MAX_LINE_BYTES = 1 << 20  # a row of ours is at most a few times PATH_MAX
_EARLIER = (
    "was written by an earlier i2p-detect (rows keyed on display names, no model column), so its rows "
    "cannot be matched to files exactly; run without --resume to start over (or move it aside)"
)
log = logging.getLogger("i2p")


@dataclass(frozen=True)
class Scorer:
    """What scored the rows, written in each of them: ``--resume`` continues only the same model and threshold."""

    model: str  # "sha256:<manifest.json sha256>", or the Triton ensemble ("triton:...")
    threshold: float | None  # None: the server's own labels (it sent no threshold)


def file_row(row: Row, scorer: Scorer) -> Row:
    """A row as CSV/JSONL files and ``--json`` lines hold it: exact path, display error, the scorer."""
    error = row["error"]
    return {
        "path": path_cell(row["path"]),
        "probability": row["probability"],
        "label": row["label"],
        "error": display(error) if isinstance(error, str) else error,
        "model": scorer.model,
        "threshold": scorer.threshold,
        "ood": row.get("ood"),  # None (empty cell, JSON null): the artifact has no OOD output
        "uncertain": row.get("uncertain"),
    }


def partial_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path) + PARTIAL_SUFFIX)


# -- the files already done ---------------------------------------------------------------------------------


class DoneSet:
    """The ``path`` cells already in an output, as sorted keyed 64-bit hashes: 7 million rows cost 56 MB.

    The hash key is random per process, so nobody can craft two names that share a key.
    """

    _secret = secrets.token_bytes(16)

    def __init__(self, cells: Iterable[str] = ()) -> None:
        self._keys = np.sort(np.fromiter((self._key(c) for c in cells), np.uint64))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, cell: object) -> bool:
        if not isinstance(cell, str) or not len(self._keys):
            return False
        key = np.uint64(self._key(cell))
        i = int(np.searchsorted(self._keys, key))
        return i < len(self._keys) and self._keys[i] == key

    @classmethod
    def _key(cls, cell: str) -> int:
        digest = hashlib.blake2b(cell.encode("utf-8", "surrogatepass"), digest_size=8, key=cls._secret)
        return int.from_bytes(digest.digest(), "little")


def _complete_length(f: BinaryIO, size: int) -> int:
    """The length up to the last newline (a run killed mid-write leaves half a row), read backwards in 1 MiB."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 20))
        f.seek(start)
        newline = f.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _lines(f: BinaryIO, where: Path, end: int) -> Iterator[tuple[int, str]]:
    """(line number, text) of the first ``end`` bytes, each line read with a bound and strictly UTF-8."""
    f.seek(0)
    number = position = 0
    while position < end:
        line = f.readline(min(MAX_LINE_BYTES + 1, end - position))
        number += 1
        position += len(line)
        if len(line) > MAX_LINE_BYTES:
            raise OutputError(
                f"{where}: line {number} is over {MAX_LINE_BYTES:,} bytes: not an i2p-detect row"
            )
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise OutputError(f"{where}: line {number} is not UTF-8 ({e.reason})") from None


def _read_done(f: BinaryIO, where: Path, fmt: str, scorer: Scorer) -> tuple[DoneSet, int]:
    """(the path cells of the complete rows, the length of those rows) of an output to continue."""
    f.seek(0)
    first = f.readline(MAX_LINE_BYTES + 1)
    header = _csv_header(first) if fmt == "csv" else b'{"path": '
    if not first.endswith(b"\n"):  # empty, or a first row torn by a kill: nothing done yet
        if len(first) > MAX_LINE_BYTES or not (header.startswith(first) or first.startswith(header)):
            raise _not_ours(where, fmt, first)
        return DoneSet(), 0
    if fmt == "csv" and first.rstrip(b"\r\n") == ",".join(ROW_COLUMNS).encode():
        raise OutputError(f"{where} {_EARLIER}")
    if not (first == header if fmt == "csv" else first.startswith(header)):
        raise _not_ours(where, fmt, first)
    end = _complete_length(f, os.fstat(f.fileno()).st_size)
    paths = _csv_paths if fmt == "csv" else _jsonl_paths
    return DoneSet(paths(f, where, end, scorer)), end


def _not_ours(where: Path, fmt: str, first: bytes) -> OutputError:
    return OutputError(
        f"{where}: not an i2p-detect {fmt.upper()} output (it starts {first[:40]!r}); "
        "--resume appends only to the output of the same command"
    )


def _csv_header(first: bytes) -> bytes:
    """The header a CSV to continue must start with: this version's, or the one before the OOD columns."""
    return _LEGACY_HEADER if first == _LEGACY_HEADER else ",".join(FILE_COLUMNS).encode() + b"\r\n"


def _first_columns(f: BinaryIO) -> tuple[str, ...]:
    f.seek(0)
    return LEGACY_COLUMNS if f.readline(MAX_LINE_BYTES + 1) == _LEGACY_HEADER else FILE_COLUMNS


def csv_columns(fd: int) -> tuple[str, ...]:
    """The columns of the CSV output ``fd`` continues (LEGACY_COLUMNS for one written before the OOD score)."""
    with open(fd, "rb", closefd=False) as f:
        return _first_columns(f)


def _csv_paths(f: BinaryIO, where: Path, end: int, scorer: Scorer) -> Iterator[str]:
    at = [1]  # the number of the line the csv reader took last
    columns = _first_columns(f)

    def texts() -> Iterator[str]:
        for number, text in _lines(f, where, end):
            at[0] = number
            if number > 1:  # after the header
                yield text

    try:
        for cells in csv.reader(texts(), strict=True):
            if len(cells) != len(columns):
                raise OutputError(f"{where}: line {at[0]} has {len(cells)} cells, not {len(columns)}")
            _check_scorer(where, at[0], cells[4], cells[5], scorer)
            yield cells[0]
    except csv.Error as e:
        raise OutputError(f"{where}: line {at[0]} is not an i2p-detect row ({e})") from None


def _jsonl_paths(f: BinaryIO, where: Path, end: int, scorer: Scorer) -> Iterator[str]:
    for number, text in _lines(f, where, end):
        try:
            row = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise OutputError(f"{where}: line {number} is not JSON ({type(e).__name__})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise OutputError(f'{where}: line {number} is not an i2p-detect row (no "path" string)')
        if "model" not in row:
            raise OutputError(f"{where} {_EARLIER}")
        _check_scorer(where, number, row["model"], row.get("threshold"), scorer)
        yield row["path"]


def _check_scorer(where: Path, number: int, model: Any, threshold: Any, scorer: Scorer) -> None:
    if model == scorer.model and _same_threshold(threshold, scorer.threshold):
        return
    shown = threshold if threshold not in ("", None) else "the server's"
    raise OutputError(
        f"{where}: line {number} was scored by model {display(str(model))[:80]} at threshold "
        f"{display(str(shown))[:40]}; this run uses model {scorer.model} at threshold "
        f"{scorer.threshold if scorer.threshold is not None else 'the server'}: --resume would mix the "
        "results of two scorers; give the same --model/--server and --threshold, or write another output"
    )


def _same_threshold(cell: Any, threshold: float | None) -> bool:
    if cell in ("", None):
        return threshold is None
    try:
        return threshold is not None and float(cell) == threshold
    except (TypeError, ValueError):
        return False


# -- the sink -----------------------------------------------------------------------------------------------


@contextmanager
def file_sink(
    path: str, fmt: str, resume: bool, scorer: Scorer
) -> Iterator[tuple[Callable[[Row], None], DoneSet]]:
    """(write one row, path cells already done) for a CSV or JSONL file; see the module docstring."""
    target = Path(path)
    kind = path_kind(target)
    if kind == "stream":  # a device or FIFO: no rename, nothing to resume
        if resume:
            raise OutputError(f"{path}: --resume needs a regular file to read the previous rows from")
        with _written(open_stream(target), target, fmt, scorer, header=True) as write:
            yield write, DoneSet()
        return
    partial = partial_path(target)
    fd, done = _open_partial(target, partial, kind, fmt, resume, scorer)
    header = os.fstat(fd).st_size == 0
    columns = csv_columns(fd) if fmt == "csv" and not header else FILE_COLUMNS
    publish = lambda: _publish(partial, target)  # noqa: E731
    with _written(fd, partial, fmt, scorer, header, publish, columns) as write:
        yield write, done


def _open_partial(
    target: Path, partial: Path, kind: str, fmt: str, resume: bool, scorer: Scorer
) -> tuple[int, DoneSet]:
    """The locked descriptor of OUT.partial, cut to its complete rows (resume) or emptied, and those rows."""
    if resume and not os.path.lexists(partial) and kind != "absent":
        if kind == "link":
            raise OutputError(
                f"{target}: is a symbolic link; --resume reads and continues regular files only"
            )
        fd = open_regular(target, create=False)  # a complete output: continued in place, never copied
        try:
            done = _resumed(fd, target, fmt, scorer)
            os.rename(target, partial)
        except BaseException:
            os.close(fd)
            raise
        return fd, done
    if not resume and os.path.lexists(partial):
        log.warning("i2p: starting over: %s (an unfinished run) is replaced; --resume continues it", partial)
    fd = open_regular(partial, create=True)
    try:
        if resume:
            return fd, _resumed(fd, partial, fmt, scorer)
        os.ftruncate(fd, 0)  # only now, with the lock held
    except BaseException:
        os.close(fd)
        raise
    return fd, DoneSet()


def _resumed(fd: int, where: Path, fmt: str, scorer: Scorer) -> DoneSet:
    """The rows done in the output ``fd``; a torn last line is cut off once every row checked out."""
    with open(fd, "rb", closefd=False) as f:
        done, end = _read_done(f, where, fmt, scorer)
    if end < os.fstat(fd).st_size:
        os.ftruncate(fd, end)
    return done


def _publish(partial: Path, target: Path) -> None:
    try:
        os.replace(partial, target)
    except OSError as e:
        raise OutputError(f"{target}: cannot replace it with {partial} ({e.strerror or e})") from e


@contextmanager
def _written(
    fd: int,
    path: Path,
    fmt: str,
    scorer: Scorer,
    header: bool,
    publish: Callable[[], None] | None = None,
    columns: tuple[str, ...] = FILE_COLUMNS,
) -> Iterator[Callable[[Row], None]]:
    """An open output whose errors, closing included, are OutputErrors naming the file; ``publish`` runs
    after the last row is flushed, while the lock is still held."""
    f = open(fd, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed below, on every path)
    try:
        yield _writer(f, fmt, header, path, scorer, columns)
        _guarded(f.flush, path)
        if publish is not None:
            publish()
    except BaseException:
        with suppress(OSError):  # closing flushes again what was refused: the first error is the one
            f.close()
        raise
    try:
        f.close()
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e


def _guarded(write: Callable[[], object], path: Path) -> None:
    try:
        write()
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e


def _writer(
    f: TextIO, fmt: str, header: bool, path: Path, scorer: Scorer, columns: tuple[str, ...] = FILE_COLUMNS
) -> Callable[[Row], None]:
    def guarded(write: Callable[[], object]) -> None:
        def put() -> None:
            write()
            f.flush()  # whole rows on disk as they come: an interrupted run keeps them

        _guarded(put, path)

    if fmt == "jsonl":
        return lambda row: guarded(lambda: f.write(json.dumps(file_row(row, scorer)) + "\n"))
    writer = csv.writer(f)
    if header:
        guarded(lambda: writer.writerow(columns))

    def cells(row: Row) -> list[Any]:
        full = file_row(row, scorer)
        return [csv_cell(full[c]) for c in columns]

    return lambda row: guarded(lambda: writer.writerow(cells(row)))
