"""Writing an output directory all at once: built beside the target, moved into place only when complete.

A failed export (parity outside tolerances, an exception, Ctrl-C) removes its staging directory and
leaves the target as it was. An existing directory is replaced only if it is the same kind of output
(it holds ``marker``: ``manifest.json`` for an artifact, ``config.pbtxt`` for a Triton model) and the
user passed ``--force``; any other directory is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from i2p.base.files import sha256_file
from i2p.runtime.manifest import MANIFEST

from .network import ExportError

ENGINES = "engines"  # TensorRT engine cache: keyed by device, not listed in the manifest


def check_target(target: Path, force: bool, marker: str = MANIFEST) -> None:
    """Refuse a target that is not ours to replace; call early so a slow export does not fail at the end."""
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
