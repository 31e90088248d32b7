"""Runs side by side: in order, never more at once than asked, and a failure stops the
queue without losing the work in flight. (That a run beside another gives its numbers
bit for bit is the pinned experiment's test: its two targets run at once.)"""

from __future__ import annotations

import threading
import time

import pytest

from experiments.parallel_runs import ordered_map


def test_results_come_in_the_order_of_the_items():
    # Later items finish first: the order must not follow the finishing order.
    def slow_square(x):
        time.sleep(0.02 * (5 - x))
        return x * x

    assert ordered_map(slow_square, [0, 1, 2, 3, 4], workers=3) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_never_more_calls_at_once_than_workers(workers):
    running, most = [0], [0]
    lock = threading.Lock()

    def call(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return x

    assert ordered_map(call, list(range(8)), workers) == list(range(8))
    assert most[0] == workers


def test_a_failure_stops_new_calls_and_the_earliest_is_raised():
    started, finished = [], []
    second_started = threading.Event()

    def call(x):
        started.append(x)
        if x == 1:
            second_started.wait(5)  # fail while item 0 is in flight
            raise ValueError("item 1")
        if x == 0:
            second_started.set()
            time.sleep(0.1)
            finished.append(x)
            return x
        return x

    with pytest.raises(ValueError, match="item 1"):
        ordered_map(call, list(range(6)), workers=2)
    assert sorted(started) == [0, 1]  # nothing new started after the failure
    assert finished == [0]  # the call in flight ran to its end


def test_one_worker_runs_in_the_callers_thread():
    threads = ordered_map(lambda x: threading.current_thread(), [0, 1], workers=1)
    assert threads == [threading.current_thread()] * 2


def test_of_two_failures_the_earlier_items_is_raised():
    def call(x):
        time.sleep(0.1 if x == 0 else 0.0)  # item 1 fails first
        raise ValueError(f"item {x}")

    with pytest.raises(ValueError, match="item 0"):
        ordered_map(call, [0, 1], workers=2)
