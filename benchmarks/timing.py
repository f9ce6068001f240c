"""Wall-clock helpers of the benchmarks: timings that wait for the GPU and resist a shared machine's bursts."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import numpy as np
import torch


def sync() -> None:
    """Wait for queued CUDA work, so that a timer stops when the work is done (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable, *, collected: bool = False):
    """``(fn(), seconds)`` with the device synchronised before and after. ``collected``: a full garbage collection
    first, untimed, for a whole call timed once: a full collection of these processes' ~530k Python objects costs
    ~0.24 s, and the collector runs one in whichever call crosses its threshold, so a call would be charged for the
    garbage of the calls before it (a generation-2 collection of 218 ms measured inside the 0.25 s scoring phase of
    `benchmarks.per_test_point`'s fast row, 4 test points in one call, once the FastIF row had run before it)."""
    if collected:
        gc.collect()
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def median_seconds(fn: Callable, calls: int) -> float:
    """Median seconds of one ``fn()`` over ``calls`` calls after one warm-up: robust to the bursts of contention
    of a shared machine, which a mean is not."""
    fn()
    return float(np.median([timed(fn)[1] for _ in range(calls)]))
