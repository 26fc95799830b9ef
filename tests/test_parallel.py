"""tensor/parallel.py: the thread count and split_run's pieces."""
from __future__ import annotations

import threading

import pytest

from tensor import parallel


@pytest.mark.parametrize("threads,n", [("1", 5), ("2", 5), ("3", 7), ("4", 2), ("2", 1)])
def test_split_run_covers_every_index_once(monkeypatch, threads, n):
    monkeypatch.setenv("TINYGRAD_LM_THREADS", threads)
    seen, pieces, callers = [], [], []
    lock = threading.Lock()

    def fn(lo, hi):
        with lock:
            seen.extend(range(lo, hi))
            pieces.append((lo, hi))
            callers.append(threading.current_thread() is threading.main_thread())
    parallel.split_run(fn, n)
    assert sorted(seen) == list(range(n))
    assert len(pieces) == min(int(threads), n) and all(hi > lo for lo, hi in pieces)
    assert callers.count(True) == 1  # the caller runs one piece itself, the pool the others


def test_split_run_propagates_errors(monkeypatch):
    monkeypatch.setenv("TINYGRAD_LM_THREADS", "2")

    def fn(lo, hi):
        if lo > 0:
            raise ValueError("second piece failed")
    with pytest.raises(ValueError, match="second piece"):
        parallel.split_run(fn, 4)


def test_num_threads_from_environment(monkeypatch):
    for name in ("TINYGRAD_LM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.num_threads() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert parallel.num_threads() == 1
    monkeypatch.setenv("TINYGRAD_LM_THREADS", "3")  # ours wins
    assert parallel.num_threads() == 3
    monkeypatch.setenv("TINYGRAD_LM_THREADS", "two")
    with pytest.raises(ValueError, match="TINYGRAD_LM_THREADS='two'"):
        parallel.num_threads()
