"""Run one call from many threads at once, for the tests that share a Detector or a backend."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_threads(call: Callable[[int], T], n: int, threads: int = 8, rounds: int = 1) -> list[T]:
    """``[call(0), ..., call(n - 1)]``, item i computed by thread ``i % threads``, ``rounds`` times over.

    The threads start together (a barrier), so the calls really overlap; the first exception raised in
    any thread is raised here, so a crash cannot pass as a missing result.
    """
    results: list[T | None] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        barrier.wait()
        try:
            for _ in range(rounds):
                for i in range(t, n, threads):
                    results[i] = call(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]
