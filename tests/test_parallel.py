"""run_parallel: input order, per-item errors, and stopping early without running the queued items."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from nesycd.parallel import run_parallel


def test_results_keep_input_order():
    outcomes = run_parallel(lambda item: item * 2, [3, 1, 2], threads=3, show_progress=False)
    assert [outcome.prediction for outcome in outcomes] == [6, 2, 4]
    assert all(outcome.error is None for outcome in outcomes)


def test_errors_become_outcomes():
    def divide(item):
        return 10 // item

    outcomes = run_parallel(divide, [5, 0, 2], threads=2, show_progress=False)
    assert [outcome.prediction for outcome in outcomes] == [2, None, 5]
    assert outcomes[1].error.startswith("ZeroDivisionError")


def test_failed_on_result_drops_queued_items():
    started = []

    def slow(item):
        started.append(item)
        time.sleep(0.05)
        return item

    def fail(outcome):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_parallel(slow, list(range(40)), threads=2, show_progress=False, on_result=fail)
    assert len(started) < 10


def test_interrupt_drops_queued_items():
    started = []

    def slow(item):
        started.append(item)
        if item == 0:
            time.sleep(0.2)  # every item is queued and the calling thread waits for results
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # what Ctrl-C sends
        time.sleep(0.05)
        return item

    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_parallel(slow, list(range(40)), threads=2, show_progress=False)
    assert 1 < len(started) < 10
    assert time.monotonic() - began < 1.0
