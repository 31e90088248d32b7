"""Independent runs side by side in threads of one process.

A small model's step leaves CPU cores idle between its operations; a second run's steps
fill them (two at once on 2 cores: ~1.3x the steps a second). Threads, not processes:
they share the compiled programs and XLA's thread pool, so every operation is split over
the same threads as when run alone and each run's numbers are bit-identical to a run on
its own. What a run measures of the process (peak memory) then covers the runs beside it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    function: Callable[[Item], Result], items: Sequence[Item], workers: int
) -> list[Result]:
    """`[function(x) for x in items]`, up to `workers` calls at once, results in order.

    After a call fails, no new call starts; the calls in flight finish (their work is
    kept), then the failure of the earliest item is raised with its traceback. A
    KeyboardInterrupt leaves the calls in flight to end with the process."""
    if workers <= 1 or len(items) <= 1:
        return [function(x) for x in items]
    results: list = [None] * len(items)
    failures: list[tuple[int, BaseException]] = []
    pending = iter(range(len(items)))
    lock = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            with lock:
                index = next(pending, None)
            if index is None:
                return
            try:
                results[index] = function(items[index])
            except BaseException as error:  # re-raised by the caller's thread below
                failures.append((index, error))
                stop.set()

    threads = [
        threading.Thread(target=work, name=f"runs-{k}", daemon=True)
        for k in range(min(workers, len(items)))
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop.set()
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]
    return results
