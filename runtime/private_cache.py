"""The runtime's own cache: directories only this user can write, and files read without following links.

A TensorRT engine (or timing cache) is deserialized into native code, so reading one is running it: the
runtime reads engines only from a cache it wrote itself (or that the artifact's manifest hashes). This
module is that cache's guard: every directory from ``cache_root()`` down is created 0700, must not be a
symlink, must belong to this user and must not be writable by others; every file is opened with
``O_NOFOLLOW`` and must be a regular file of this user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from i2p.base.files import cache_root


class UntrustedCacheError(RuntimeError):
    """A cache directory or file could have been written by someone else; the message says which and why."""


def private_dir(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """``path`` once every directory from ``root`` (``cache_root()``) down to it is this user's alone.

    Missing ones are created 0700; group/other write bits on ours are removed (an older i2p created them
    with the umask). A symlink, a non-directory, or another owner is UntrustedCacheError.
    """
    path = Path(path)
    top = Path(root) if root is not None else cache_root()
    if top != path and top not in path.parents:
        top = path
    top.parent.mkdir(parents=True, exist_ok=True)  # above the cache (e.g. ~/.cache): the user's own business
    below = [p for p in reversed(path.parents) if top in p.parents]
    for directory in (top, *below, *([path] if path != top else [])):
        _own_directory(directory)
    return path


def _own_directory(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UntrustedCacheError(f"{path}: cannot create the cache directory ({e.strerror or e})") from e
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedCacheError(f"{path}: is a symlink; the runtime's cache must be a directory of its own")
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedCacheError(f"{path}: not a directory")
    if st.st_uid != os.geteuid():
        raise UntrustedCacheError(f"{path}: belongs to user {st.st_uid}, not to this user ({os.geteuid()})")
    if st.st_mode & 0o022:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)


def read_own_file(path: str | os.PathLike, max_bytes: int | None = None, *, any_owner: bool = False) -> bytes:
    """The bytes of ``path``: a regular file of this user (``any_owner``: of anyone), opened without following a link.

    FileNotFoundError when it is absent; UntrustedCacheError for a link, a FIFO or device, another
    owner, or more than ``max_bytes``.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: the last component is a symlink
        raise UntrustedCacheError(
            f"{path}: cannot open it without following links ({e.strerror or e})"
        ) from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedCacheError(f"{path}: not a regular file")
        if st.st_uid != os.geteuid() and not any_owner:
            raise UntrustedCacheError(f"{path}: belongs to user {st.st_uid}, not to this user")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UntrustedCacheError(f"{path}: {st.st_size:,} bytes, over the {max_bytes:,}-byte limit")
        return f.read() if max_bytes is None else f.read(max_bytes + 1)
