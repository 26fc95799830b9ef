"""Splitting one op's work over the CPU cores with Python threads.

NumPy releases the GIL inside every array operation, so two threads that each run a chain of
NumPy calls on their own slice of a batch do run on two cores at once; only the Python code
between the calls is serialised. That pays when each call is large: attention split over the
batch (each thread runs its heads' GEMMs and softmax) measured 1.4x faster on 2 cores. It does
not pay for short elementwise chains, where the threads mostly wait for each other's GIL
hand-offs (benchmarks/RESULTS.md), so only the ops that say so use it.

The number of threads: TINYGRAD_LM_THREADS if set, else OMP_NUM_THREADS / OPENBLAS_NUM_THREADS
(what a user running several MPI ranks per machine sets to 1), else the cores this process may
run on. The pool itself is created on first use and lives for the process.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

_pool: ThreadPoolExecutor | None = None


def num_threads() -> int:
    """Threads an op may split its work over (>= 1); see the module docstring."""
    for name in ("TINYGRAD_LM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a whole number of threads") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def split_run(fn: Callable[[int, int], None], n: int) -> None:
    """Call fn(start, stop) over consecutive pieces of range(n), one piece per thread.

    The calling thread runs the first piece itself; fn must write only to its own piece of the
    outputs. With one thread (or n == 1) this is just fn(0, n). Exceptions propagate."""
    parts = min(num_threads(), n)
    if parts <= 1:
        fn(0, n)
        return
    global _pool
    if _pool is None or _pool._max_workers < parts - 1:
        _pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="tinygrad-lm")
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [_pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    try:
        fn(bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()
