"""How the probe times things: the best or the median of repeated runs in a time box, and a count of
the aten ops a call dispatches."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def best_time(run: Callable[[], Any], sync: Callable[[], None], budget_s: float, warmup: int = 1,
               min_runs: int = 1) -> float:
    """The fastest of repeated runs within `budget_s` (after `warmup` untimed runs, at least `min_runs`)."""
    for _ in range(warmup):
        run()
    sync()
    best, start, runs = float("inf"), time.perf_counter(), 0
    while True:
        t0 = time.perf_counter()
        run()
        sync()
        best, runs = min(best, time.perf_counter() - t0), runs + 1
        if time.perf_counter() - start > budget_s and runs >= min_runs:
            return best


def median_time(run: Callable[[], Any], budget_s: float, warmup: int = 2, min_runs: int = 10) -> float:
    """The median of repeated runs within `budget_s` (after `warmup` untimed runs, at least
    `min_runs`): the statistic `lwdsl check` reports a decode step by. On this shared VM the fastest
    of 40 fused steps streamed 5-28% faster than their median, which the gate then measured."""
    for _ in range(warmup):
        run()
    times, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= min_runs:
            return statistics.median(times)



class OpCounter:
    """Counts the aten ops a call dispatches (a TorchDispatchMode, built lazily: torch is imported late)."""

    @staticmethod
    def count(torch, call) -> int:
        from torch.utils._python_dispatch import TorchDispatchMode

        class Counter(TorchDispatchMode):
            ops = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Counter.ops += 1
                return func(*args, **(kwargs or {}))

        with Counter():
            call()
        return Counter.ops
