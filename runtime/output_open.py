"""Opening ``i2p-detect``'s output files: never through a planted link, never a second writer.

A regular output file is opened without following links (``O_NOFOLLOW``), must have one link, and is
locked (``flock``, non-blocking) until the run ends. A device or FIFO the user names is written directly,
opened non-blocking, so a FIFO nothing reads is an error, not a hang.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class OutputError(Exception):
    """The output cannot be written (no space, not writable, not a file we can resume from)."""


def open_regular(path: Path, create: bool) -> int:
    """A descriptor on ``path`` (read-write, appending), refused unless a regular file with one link."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | _OPEN_FLAGS | (os.O_CREAT if create else 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path}: is a symbolic link; refusing to follow it (remove it)") from None
        if e.errno == errno.ENXIO:  # a FIFO (or socket) nothing holds open
            raise OutputError(f"{path}: not a regular file; refusing to write it (remove it)") from None
        raise OutputError(f"{path}: cannot open for writing ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{path}: not a regular file; refusing to write it (remove it)")
        if st.st_nlink != 1:
            raise OutputError(f"{path}: has {st.st_nlink - 1} other hard link(s); refusing to write it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{path}: another i2p-detect is writing it (it is locked); wait for it, or write another file"
            ) from None
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_stream(path: Path) -> int:
    """A descriptor on a device or FIFO the user named (``/dev/stdout`` is a link: followed here)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise OutputError(f"{path}: a FIFO nothing is reading; start its reader first") from None
        raise OutputError(f"{path}: cannot open for writing ({e.strerror or e})") from e
    if stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the check
        os.close(fd)
        raise OutputError(f"{path}: changed while it was opened; run again")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def path_kind(path: Path) -> str:
    """'absent', 'file', 'link' (to a regular file or nothing) or 'stream' (a device or FIFO, maybe linked)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if stat.S_ISREG(st.st_mode):
        return "file"
    try:
        st = os.stat(path)
    except OSError:
        return "link"  # dangling
    if stat.S_ISREG(st.st_mode):
        return "link"
    return "stream"
