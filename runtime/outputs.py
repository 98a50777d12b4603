"""Where ``i2p-detect`` rows go: safe text, CSV/JSONL files that are never lost or half-trusted, ``--resume``.

- Every text cell goes through ``display``: file names that are not UTF-8 (surrogate-escaped by Python)
  show their bytes as ``\\xNN``; control characters (newline, CR, TAB, ESC, U+2028, ...) are escaped, so
  a file name cannot forge a row or a terminal sequence. JSON output stays strict UTF-8.
- CSV cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, TAB or
  CR) get a leading ``'``, as OWASP recommends.
- A file output is written to ``OUT.partial`` (one flushed row at a time) and renamed to ``OUT`` only
  when the run completes: an existing ``OUT`` survives a failed or interrupted run, and the name of an
  unfinished file says that it is partial. ``--resume`` reads the rows already in ``OUT.partial`` (or a
  complete ``OUT``), skips those files and appends the rest.
- A destination that is not a regular file (``/dev/stdout``, ``/dev/full``, a FIFO) is written directly.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

import numpy as np

ROW_COLUMNS = ("path", "probability", "label", "error")
PARTIAL_SUFFIX = ".partial"
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
Row = dict[str, Any]
log = logging.getLogger("i2p")


class OutputError(Exception):
    """The output cannot be written (no space, not writable, not a file we can resume from)."""


def display(text: str) -> str:
    """``text`` as valid UTF-8 on one line: undecodable bytes as ``\\xNN``, control characters escaped."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (from an API caller)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(
        lambda m: _NAMED.get(
            m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )


def safe_row(row: Row) -> Row:
    """Every string cell through ``display``."""
    return {k: display(v) if isinstance(v, str) else v for k, v in row.items()}


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text: formula-like strings get a leading apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def partial_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path) + PARTIAL_SUFFIX)


def _is_regular_or_absent(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        return True


class DoneSet:
    """The paths already in an output, as sorted 64-bit hashes: 7 million rows cost 56 MB, not gigabytes."""

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self._keys = np.sort(np.fromiter((_key(p) for p in paths), np.uint64))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, shown: object) -> bool:
        if not isinstance(shown, str) or not len(self._keys):
            return False
        key = np.uint64(_key(shown))
        i = int(np.searchsorted(self._keys, key))
        return i < len(self._keys) and self._keys[i] == key


def _key(shown: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(shown.encode("utf-8", "backslashreplace"), digest_size=8).digest(), "little"
    )


def done_paths(path: Path, fmt: str) -> DoneSet:
    """The ``path`` cells of the complete rows of a CSV or JSONL output; a torn last line is cut off."""
    if not path.is_file():
        return DoneSet()
    _drop_torn_line(path)
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        first = f.readline()
        f.seek(0)
        if fmt == "csv" and first.rstrip("\r\n") == ",".join(ROW_COLUMNS):
            return DoneSet(_uncell(r.get("path") or "") for r in csv.DictReader(f))
        if fmt == "jsonl" and (not first or first.startswith('{"path": ')):
            return DoneSet(_jsonl_paths(f))
    raise OutputError(
        f"{path}: not an i2p-detect {fmt.upper()} output (it starts {first[:40]!r}); "
        "--resume appends only to the output of the same command"
    )


def _jsonl_paths(f: TextIO) -> Iterator[str]:
    for line in f:
        try:
            yield json.loads(line)["path"]
        except (ValueError, KeyError, TypeError):
            continue


def _uncell(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


def _drop_torn_line(path: Path) -> None:
    """A run killed mid-write can leave half a row: truncate to the last newline."""
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        block = min(size, 1 << 20)
        f.seek(size - block)
        tail = f.read(block)
        f.truncate(size - block + tail.rfind(b"\n") + 1)


@contextmanager
def file_sink(path: str, fmt: str, resume: bool) -> Iterator[tuple[Callable[[Row], None], DoneSet]]:
    """(write one row, paths already done) for a CSV or JSONL file; see the module docstring."""
    target = Path(path)
    if not _is_regular_or_absent(target):  # a device or FIFO: no rename, nothing to resume
        if resume:
            raise OutputError(f"{path}: --resume needs a regular file to read the previous rows from")
        with _written(target, "w", fmt, header=True) as write:
            yield write, DoneSet()
        return
    partial = partial_path(target)
    if resume and not partial.exists() and target.is_file():
        shutil.copyfile(target, partial)  # continue a complete output: add to a copy of it
    elif not resume and partial.exists():
        log.warning("i2p: starting over: %s (an unfinished run) is replaced; --resume continues it", partial)
    done = done_paths(partial, fmt) if resume else DoneSet()
    appending = resume and partial.exists() and partial.stat().st_size > 0
    with _written(partial, "a" if appending else "w", fmt, header=not appending) as write:
        yield write, done
    try:
        os.replace(partial, target)
    except OSError as e:
        raise OutputError(f"{target}: cannot replace it with {partial} ({e.strerror or e})") from e


@contextmanager
def _written(path: Path, mode: str, fmt: str, header: bool) -> Iterator[Callable[[Row], None]]:
    """An open output whose errors, closing included, are OutputErrors naming the file."""
    try:
        f = path.open(mode, newline="", encoding="utf-8")
    except OSError as e:
        raise OutputError(f"{path}: cannot open for writing ({e.strerror or e})") from e
    try:
        yield _writer(f, fmt, header, path)
    except BaseException:
        with suppress(OSError):  # closing flushes again what was refused: the first error is the one
            f.close()
        raise
    try:
        f.close()
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e


def _writer(f: TextIO, fmt: str, header: bool, path: Path) -> Callable[[Row], None]:
    def guarded(write: Callable[[], object]) -> None:
        try:
            write()
            f.flush()  # whole rows on disk as they come: an interrupted run keeps them
        except OSError as e:
            raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e

    if fmt == "jsonl":
        return lambda row: guarded(lambda: f.write(json.dumps(safe_row(row)) + "\n"))
    writer = csv.DictWriter(f, ROW_COLUMNS)
    if header:
        guarded(writer.writeheader)
    return lambda row: guarded(lambda: writer.writerow({k: csv_cell(v) for k, v in safe_row(row).items()}))
