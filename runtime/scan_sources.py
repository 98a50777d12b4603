"""What ``i2p scan SOURCE`` scores: the inputs a SOURCE names, listed on the driver before any scoring.

SOURCE is a local folder (walked recursively, image extensions only), a glob (``shots/**/*.jpg``), a text
file of paths/URIs (one a line, ``#`` comments; relative paths are relative to the file), a Parquet file
with a ``path`` (or ``uri``) column, an object-store prefix (``s3://bucket/uploads/``, through
``pyarrow.fs``, image extensions only) or one image. Local paths come back absolute, so every Ray worker
reads the same file; the list is sorted and free of duplicates, so a re-run plans the same shards.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass

from i2p.base.files import is_image_name

from .sources import iter_images

LIST_SUFFIXES = (".txt", ".lst", ".list")
PARQUET_SUFFIXES = (".parquet", ".pq")
PATH_COLUMNS = ("path", "uri")
MAX_LINE = 8192  # characters in one line of a list file: longer is not a path
GLOB_CHARS = "*?["


class SourceError(ValueError):
    """SOURCE cannot be listed; the message names it and what is wrong."""


class MissingSource(SourceError):
    """SOURCE names nothing that exists: a usage error (exit 2), as a missing path is in every command."""


@dataclass(frozen=True)
class Inputs:
    """The sorted, unique inputs of a SOURCE and how many duplicate entries were dropped."""

    paths: list[str]
    duplicates: int


def list_inputs(source: str) -> Inputs:
    """Every input SOURCE names (see the module docstring); SourceError when it cannot be listed."""
    listed = list(_list(source))
    unique = sorted(set(listed))
    return Inputs(unique, len(listed) - len(unique))


def _list(source: str) -> Iterable[str]:
    if is_uri(source):
        return _list_uri(source)
    if os.path.isdir(source):
        return (os.path.abspath(p) for p in iter_images([source], recursive=True))
    if os.path.isfile(source):
        lower = source.lower()
        if lower.endswith(PARQUET_SUFFIXES):
            return _read_parquet(source)
        if lower.endswith(LIST_SUFFIXES):
            return _read_list(source)
        if is_image_name(source):
            return [os.path.abspath(source)]
        raise SourceError(
            f"{source}: not a folder, an image, a list of paths ({', '.join(LIST_SUFFIXES)}) "
            f"or a Parquet file ({', '.join(PARQUET_SUFFIXES)})"
        )
    if any(c in source for c in GLOB_CHARS):
        return (os.path.abspath(p) for p in glob.iglob(source, recursive=True) if os.path.isfile(p))
    raise MissingSource(f"{source}: no such file, folder or glob match")


def is_uri(text: str) -> bool:
    """``scheme://...`` with a scheme of two letters or more (a Windows drive letter is a path)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and len(scheme) >= 2 and scheme.isalnum()


def _read_list(path: str) -> Iterable[str]:
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    found = []
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if len(entry) > MAX_LINE or "\x00" in entry:
            raise SourceError(f"{path}:{number}: not a path (over {MAX_LINE} characters or a NUL byte)")
        found.append(entry if is_uri(entry) else os.path.normpath(os.path.join(base, entry)))
    return found


def _read_parquet(path: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        column = next((c for c in PATH_COLUMNS if c in schema.names), None)
        if column is None:
            raise SourceError(f"{path}: no {' or '.join(PATH_COLUMNS)} column (it has {schema.names[:20]})")
        if not pa.types.is_string(schema.field(column).type) and not pa.types.is_large_string(
            schema.field(column).type
        ):
            raise SourceError(f"{path}: column {column!r} holds {schema.field(column).type}, not strings")
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    base = os.path.dirname(os.path.abspath(path))
    return [v if is_uri(v) else os.path.normpath(os.path.join(base, v)) for v in values if v]


def _list_uri(source: str) -> Iterable[str]:
    """Objects under a prefix (image names only), or matching a glob; one named object as it is."""
    from pyarrow import fs

    pattern = source if any(c in source for c in GLOB_CHARS) else None
    prefix = source[: min(source.index(c) for c in GLOB_CHARS if c in source)] if pattern else source
    prefix = prefix.rsplit("/", 1)[0] if pattern else prefix
    try:
        filesystem, root = fs.FileSystem.from_uri(prefix)
        kind = filesystem.get_file_info(root).type
        entries = (
            []
            if kind != fs.FileType.Directory
            else filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        )
    except (OSError, ValueError) as e:
        raise SourceError(f"{source}: cannot list ({e})") from None
    if kind == fs.FileType.File:
        return [source]
    if kind != fs.FileType.Directory:
        raise SourceError(f"{source}: nothing at {prefix}")
    base = prefix.rstrip("/")  # the URI of ``root``: an object's URI is it plus the object's relative path
    uris = (
        f"{base}/{e.path[len(root.rstrip('/')) :].lstrip('/')}" for e in entries if e.type == fs.FileType.File
    )
    if pattern:
        return [u for u in uris if fnmatch.fnmatchcase(u, pattern)]
    return [u for u in uris if is_image_name(u)]
