"""Files: sha256, atomic writes, the per-user cache directory, and which names count as images.

Everything the package writes for others to read (checkpoints, artifacts, engines, JSON reports)
goes through ``write_bytes_atomic``, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif"}
)


def is_image_name(name: str | os.PathLike) -> bool:
    """True for a file name with one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write a file so that readers see the old one or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; artifacts and run outputs are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Atomic JSON: ``data`` is a ready JSON string or an object to serialize."""
    text = data if isinstance(data, str) else json.dumps(data, indent=2)
    write_bytes_atomic(path, text.encode())


def cache_root() -> Path:
    """Where things built on this machine live (engines, kernels, ORT caches): artifacts stay read-only.

    ``$I2P_CACHE_DIR``, else ``$XDG_CACHE_HOME/i2p``, else ``~/.cache/i2p``.
    """
    if os.environ.get("I2P_CACHE_DIR"):
        return Path(os.environ["I2P_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "i2p"
