"""base.progress: heartbeat lines in a log at the rarer of every 30 s and every 5% of the work."""

from __future__ import annotations

import io

from i2p.base.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(total: int | None, seconds_per_item: float, items: int) -> list[str]:
    stream, clock = io.StringIO(), Clock()
    with Progress(desc="work", total=total, unit="img", stream=stream, terminal=False, clock=clock) as bar:
        for _ in range(items):
            clock.now += seconds_per_item
            bar.update()
    return stream.getvalue().splitlines()


def test_a_fast_run_logs_every_5_percent_at_most_and_a_slow_one_every_30_s_at_most():
    fast = run(total=10_000, seconds_per_item=0.01, items=10_000)  # 100 s: time is the rarer rule
    assert fast[0].startswith("work: 1/10000 img (0%)") and "ETA" in fast[0] and "estimate" in fast[0]
    assert len(fast) == 1 + 3 + 1, fast  # estimate, heartbeats at 30/60/90 s, the closing line
    assert fast[-1] == "work: 10000 img in 1m40s"
    slow = run(total=1000, seconds_per_item=1.0, items=1000)  # each 5% (50 items) takes 50 s: the rarer
    heartbeats = slow[1:-1]
    assert [line.split()[1] for line in heartbeats] == [f"{n}/1000" for n in range(51, 1000, 50)], slow
    assert all("ETA" in line for line in heartbeats)


def test_without_a_total_it_still_beats_and_a_disabled_bar_says_nothing():
    lines = run(total=None, seconds_per_item=1.0, items=100)
    assert len(lines) == 1 + 3 + 1 and "ETA" not in lines[1] and "img/s" in lines[1]
    stream = io.StringIO()
    with Progress(range(5), desc="x", stream=stream, terminal=False, enabled=False) as bar:
        assert list(bar) == [0, 1, 2, 3, 4]
    assert stream.getvalue() == ""


def test_a_terminal_gets_one_redrawn_line_and_durations_read_well():
    stream, clock = io.StringIO(), Clock()
    bar = Progress(range(3), desc="t", stream=stream, terminal=True, clock=clock)
    for _ in bar:
        clock.now += 1
    assert "\n" not in stream.getvalue() and "t: 1/3 it (33%)" in stream.getvalue()
    assert [duration(s) for s in (3.25, 75, 3725, float("nan"))] == ["3.2s", "1m15s", "1h02m", "?"]


def test_quiet_below_keeps_short_work_out_of_a_log_and_estimates_long_work():
    def lines(seconds_per_item: float) -> list[str]:
        stream, clock = io.StringIO(), Clock()
        with Progress(desc="d", total=10, stream=stream, terminal=False, clock=clock, quiet_below=30) as bar:
            for _ in range(10):
                clock.now += seconds_per_item
                bar.update()
        return stream.getvalue().splitlines()

    assert lines(1.0) == []  # 10 s of work: nothing
    long = lines(4.0)  # 40 s: the estimate, then the closing line
    assert "estimate" in long[0] and "ETA 36s" in long[0] and long[-1] == "d: 10 it in 40s"
