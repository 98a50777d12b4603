"""Writing an output directory all at once: built beside the target, moved into place only when complete.

A failed export (parity outside tolerances, an exception, Ctrl-C) removes its staging directory and
leaves the target as it was. An existing directory is replaced only if it is the same kind of output
(it holds ``marker``: ``manifest.json`` for an artifact, ``config.pbtxt`` for a Triton model) and the
user passed ``--force``; any other directory is never touched. An artifact must be recognisably one: an
i2p manifest, and nothing in the folder but the files it lists and the engine cache, no symbolic link.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from i2p.base.files import sha256_file
from i2p.runtime.manifest import FORMAT, MANIFEST, MAX_MANIFEST_BYTES

from .network import ExportError

ENGINES = "engines"  # TensorRT engine cache: keyed by device, not listed in the manifest


def check_target(target: Path, force: bool, marker: str = MANIFEST) -> None:
    """Refuse a target that is not ours to replace; call early so a slow export does not fail at the end."""
    if target.is_symlink():
        raise ExportError(
            f"{target}: is a symbolic link; refusing to replace it (give the folder it points to)"
        )
    if not target.exists():
        if not target.parent.is_dir():
            raise ExportError(f"{target.parent}: output folder does not exist")
        return
    if not target.is_dir() or not (target / marker).is_file():
        raise ExportError(
            f"{target}: exists and is not an output of i2p-export (no {marker}); refusing to overwrite it"
        )
    if not force:
        raise ExportError(f"{target}: already exists; pass --force to replace it")
    if marker == MANIFEST:
        _check_artifact(target)


def _check_artifact(target: Path) -> None:
    """--force replaces only an i2p artifact: its manifest says so, and the folder holds nothing but the files
    that manifest lists and the engine cache (a folder that merely has a manifest.json, such as a web app's,
    is refused)."""
    listed = _listed_files(target)
    for folder, dirs, files in os.walk(target):
        for name in [*dirs, *files]:
            path = Path(folder, name)
            rel = path.relative_to(target).as_posix()
            if path.is_symlink():
                raise ExportError(f"{target}: holds a symbolic link ({rel}); {_NOT_REPLACED}")
            if rel in listed or rel.split("/")[0] == ENGINES or (name in dirs and _holds_listed(rel, listed)):
                continue
            raise ExportError(f"{target}: holds {rel}, which its manifest does not list; {_NOT_REPLACED}")


_NOT_REPLACED = "not replacing it (move it away or choose another --out)"


def _listed_files(target: Path) -> set[str]:
    """The files the manifest lists (and the manifest), or ExportError if it is not an i2p manifest."""
    path = target / MANIFEST
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            d = json.loads(f.read(MAX_MANIFEST_BYTES + 1))
        if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("files"), dict):
            raise ValueError(f"format {d.get('format') if isinstance(d, dict) else None!r}, not {FORMAT!r}")
        version = d.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"format_version {version!r}")
    except (OSError, ValueError, RecursionError) as e:
        raise ExportError(
            f"{target}: its {MANIFEST} is not an i2p artifact manifest ({e}); {_NOT_REPLACED}"
        ) from None
    return {MANIFEST, *(rel for rel in d["files"] if isinstance(rel, str))}


def _holds_listed(rel: str, listed: set[str]) -> bool:
    return any(f.startswith(rel + "/") for f in listed)


@contextmanager
def staged_directory(target: Path, force: bool, marker: str = MANIFEST) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``target``, on failure it is deleted."""
    check_target(target, force, marker)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield staging
        _make_readable(staging)
        check_target(target, force, marker)
        if target.exists():
            # Two renames (a directory cannot replace a non-empty one): between them the path is briefly
            # absent, but it never holds a mix of old and new files.
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / "replaced")
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old / "replaced", target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _make_readable(root: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; an artifact is meant to be read by servers."""
    for p in [root, *root.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest itself and the engine cache."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.relative_to(root).parts[0] != ENGINES
    }
