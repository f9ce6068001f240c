"""Wall-clock helpers of the benchmarks: timings that wait for the GPU and resist a shared machine's bursts."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch


def sync() -> None:
    """Wait for queued CUDA work, so that a timer stops when the work is done (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable):
    """``(fn(), seconds)`` with the device synchronised before and after."""
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
