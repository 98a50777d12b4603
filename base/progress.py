"""Progress of long work that reads well on a terminal and in a log file.

On a terminal: one line redrawn in place with done/total, rate and ETA. Anywhere else (``> train.log``):
an estimate line as soon as the first step is measured, then one heartbeat line every ``interval``
seconds or at each ``step`` of the work, whichever is rarer, and a closing line with the elapsed time.
A run left in a log never goes silent for half an hour, and never floods it either.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

HEARTBEAT_SECONDS = 30.0
HEARTBEAT_FRACTION = 0.05
_REDRAW_SECONDS = 0.1
_active: list[Progress] = []  # terminal bars being drawn, so that messages do not tear them


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``: short and unambiguous in a log line."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts work done; iterate it over ``iterable`` or call ``update`` (``tqdm``'s shape, no dependency)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        desc: str = "",
        total: int | None = None,
        unit: str = "it",
        enabled: bool = True,
        stream: IO[str] | None = None,
        terminal: bool | None = None,
        interval: float = HEARTBEAT_SECONDS,
        step: float = HEARTBEAT_FRACTION,
        clock: Callable[[], float] = time.monotonic,
        quiet_below: float = 0.0,
        **_ignored: Any,  # tqdm keywords (leave, dynamic_ncols): nothing to do here
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.terminal = self._isatty() if terminal is None else terminal
        self.interval, self.step, self.clock = interval, step, clock
        self.quiet_below = quiet_below  # seconds: work expected to take less says nothing in a log
        self.n = 0
        self.postfix = ""
        self.start = clock()
        self._last_line = (self.start, 0)  # (time, n) of the last heartbeat line
        self._last_draw = -math.inf
        self.closed = False
        if self.enabled and self.terminal:
            _active.append(self)

    def _isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    # -- counting --------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        now = self.clock()
        if self.terminal:
            if now - self._last_draw >= _REDRAW_SECONDS:
                self._draw(now)
            return
        last_time, last_n = self._last_line
        first = last_n == 0 and self.n > 0
        due = now - last_time >= self.interval
        if self.total:
            due = due and self.n - last_n >= self.step * self.total
        if first and self._expected(now) < self.quiet_below:
            self._last_line = (last_time, self.n)  # short work: no estimate line, heartbeats as usual
            return
        if first or due:
            self._line(self.status(now) + (" (estimate from the first step)" if first else ""))
            self._last_line = (now, self.n)

    def _expected(self, now: float) -> float:
        """The whole work's expected seconds at the rate so far (infinite without a total)."""
        if not self.total:
            return math.inf
        return (now - self.start) * self.total / max(self.n, 1)

    def set_postfix(self, **values: object) -> None:
        """Figures shown after the rate (``loss=0.3121``), in the next line or redraw."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self in _active:
            _active.remove(self)
        if not self.enabled:
            return
        if self.terminal:
            self.stream.write("\r\033[K")
            self.stream.flush()
        elif self.n and self.clock() - self.start >= self.quiet_below:
            self._line(f"{self.desc}: {self.n} {self.unit} in {duration(self.clock() - self.start)}")

    # -- text ------------------------------------------------------------------------------------------

    def status(self, now: float) -> str:
        """``stage 1: 12/40 batch (30%), 2.1 batch/s, ETA 13s``."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {done} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += (
            f", {rate:.3g} {self.unit}/s"
            if rate >= 1
            else f", {duration(1 / rate) if rate else '?'}/{self.unit}"
        )
        if self.total and rate > 0:
            text += f", ETA {duration((self.total - self.n) / rate)}"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _draw(self, now: float) -> None:
        self.stream.write("\r\033[K" + self.status(now))
        self.stream.flush()
        self._last_draw = now


def write(message: str, file: IO[str] | None = None) -> None:
    """Print a line without tearing a progress bar drawn on the terminal."""
    out = file or sys.stdout
    for bar in _active:
        bar.stream.write("\r\033[K")
    out.write(message + "\n")
    out.flush()
    for bar in _active:
        bar._draw(bar.clock())
