"""The NumPy backend's worker threads, shared by both of its engines.

A call hands contiguous ranges of its work units to at most ``BNCUPY_NUM_THREADS`` threads
(default: the CPUs this process may use, at most 8), the caller's thread included. Idle pool
threads sleep; nothing spins between calls.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np

PARALLEL_MIN = 1 << 19  # below this many elements handing work to a thread costs more than it saves

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def threads() -> int:
    """The most threads a call may use, its caller's included."""
    env = os.environ.get("BNCUPY_NUM_THREADS")
    if env:
        return max(1, int(env))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cpus or 1, 8)


def run(fn: Callable[[int, int], Any], units: int, elements: int) -> None:
    """``fn(lo, hi)`` over ``[0, units)`` split into one contiguous range per thread; the caller
    takes the first range and returns when every range is done (then raises the first error)."""
    global _pool, _pool_size
    workers = min(threads(), units) if elements >= PARALLEL_MIN else 1
    if workers <= 1:
        fn(0, units)
        return
    bounds = [units * i // workers for i in range(workers + 1)]
    errors = np.geterr()

    def work(lo: int, hi: int) -> None:
        with np.errstate(**errors):  # the caller's floating-point error handling, not the default
            fn(lo, hi)

    with _pool_lock:
        if _pool is None or _pool_size < workers - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(workers - 1, "bncupy"), workers - 1
        futures = [_pool.submit(work, bounds[i], bounds[i + 1]) for i in range(1, workers)]
    try:
        fn(bounds[0], bounds[1])
    finally:
        wait(futures)
    for future in futures:
        future.result()
