"""The memory that image decoding may hold at once, across every decoding thread of the process.

Each decode reserves ``decode_cost`` (file bytes + ``PEAK_BYTES_PER_PIXEL`` per pixel, known from the
header) from ``DECODE_BUDGET`` before decoding and releases it when its buffers are freed; an image
larger than the whole budget decodes alone. ``I2P_DECODE_MEMORY_MB`` sets the budget (default 2048),
read when the budget is first used (``Detector`` does so when it is created), never at import: a bad value
is one ``SettingError`` naming the variable, not a crash of every command that imports the package.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

# Peak bytes per decoded pixel: the decoded mode (up to 4 B: RGBX, CMYK, I, F), the 8-bit copy and the
# RGB result (4 B each). tests/runtime/test_preprocess.py measures it on the worst case, 16-bit grey.
PEAK_BYTES_PER_PIXEL = 12
LARGE_DECODE_BYTES = 32 * 2**20  # from here on, freed decode buffers must go back to the OS
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DECODE_MEMORY_VARIABLE = "I2P_DECODE_MEMORY_MB"
DEFAULT_DECODE_MEMORY_MB = 2048
MAX_DECODE_MEMORY_MB = 2**20  # 1 TiB: larger is a typo, and MiB * 2**20 must stay a sane int


class SettingError(ValueError):
    """An ``I2P_*`` environment variable holds a value the package cannot use; the message names it."""


def decode_memory_bytes() -> int:
    """``I2P_DECODE_MEMORY_MB`` (a whole number of MiB, 1 … 1,048,576; unset or empty: 2048) in bytes."""
    text = os.environ.get(DECODE_MEMORY_VARIABLE, "").strip()
    if not text:
        return DEFAULT_DECODE_MEMORY_MB * 2**20
    # ASCII digits only: int() would take "1_000", " ٩٥ " (Arabic-Indic digits) and "+5".
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_DECODE_MEMORY_MB):
        raise SettingError(
            f"{DECODE_MEMORY_VARIABLE}={text[:40]!r}: must be a whole number of MiB from 1 to "
            f"{MAX_DECODE_MEMORY_MB:,} (the memory that image decoding may hold at once; unset: "
            f"{DEFAULT_DECODE_MEMORY_MB})"
        )
    return int(text) * 2**20


class MemoryBudget:
    """Bytes that decoding may hold at once across threads; an image over the whole budget runs alone.

    ``limit`` None: ``decode_memory_bytes()``, read on first use.
    """

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit
        self.used = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        if self._limit is None:
            self._limit = decode_memory_bytes()
        return self._limit

    @contextmanager
    def session(self) -> Iterator[Reservation]:
        """A reservation, taken (once the image's size is known) with ``take``, released at the end."""
        reservation = Reservation(self)
        try:
            yield reservation
        finally:
            if reservation.nbytes:
                with self._cond:
                    self.used -= reservation.nbytes
                    self._cond.notify_all()

    def _take(self, nbytes: int) -> None:
        limit = self.limit
        if nbytes >= LARGE_DECODE_BYTES:
            large_buffers_to_os()
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + nbytes <= limit)
            self.used += nbytes


class Reservation:
    def __init__(self, budget: MemoryBudget) -> None:
        self.budget, self.nbytes = budget, 0

    def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` fit in the budget (at most once per session)."""
        if self.nbytes:
            raise RuntimeError("a decode reserves its memory once")
        self.budget._take(nbytes)
        self.nbytes = nbytes


@functools.cache
def large_buffers_to_os() -> None:
    """Make glibc hand every buffer over 4 MiB straight back to the OS when it is freed (mallopt
    M_MMAP_THRESHOLD; set once, on the first large decode). Otherwise a decoded image's memory stays
    in the decoding thread's malloc arena, and N threads each keep one large image's worth.
    Other allocators (musl, macOS) already unmap large blocks: nothing to do there."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 4 * 2**20)


DECODE_BUDGET = MemoryBudget()


def decode_cost(width: int, height: int, encoded_bytes: int = 0) -> int:
    """Estimated peak bytes to decode one image to 8-bit RGB (what DECODE_BUDGET reserves)."""
    return encoded_bytes + width * height * PEAK_BYTES_PER_PIXEL
