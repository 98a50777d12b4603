"""Peak memory of this process, read from the kernel's per-process high-water mark.

``getrusage(...).ru_maxrss`` is the wrong figure in a child of a big process: Linux carries the parent's
peak through fork and exec, so a script started by a 1.5 GB pytest reports at least 1.5 GB. ``VmHWM`` in
``/proc/self/status`` belongs to the address space, which exec starts afresh, and ``reset_peak_rss``
starts it again from the current RSS (Linux >= 4.0).
"""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """The most resident memory this process has held (since the last ``reset_peak_rss``), in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> None:
    """Start the high-water mark again from the current RSS, so the next peak is what follows."""
    Path("/proc/self/clear_refs").write_text("5")
