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


def test_gelu_split_over_threads_equals_one_thread_and_the_formula(monkeypatch):
    """A GELU big enough for the block split (ops/elementwise.py: PARALLEL_BLOCKS) gives the
    same values and gradient on 1, 2 and 3 threads, and matches the closed form in float64."""
    import math

    import numpy as np

    from tensor import Tensor
    from tensor.ops.elementwise import BLOCK, PARALLEL_BLOCKS

    n = PARALLEL_BLOCKS * BLOCK + 17  # a ragged last block
    rng = np.random.default_rng(0)
    a0 = (rng.standard_normal(n) * 3).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    out, calls = [], []
    real = parallel.split_run
    monkeypatch.setattr(parallel, "split_run", lambda fn, nb: (calls.append(nb), real(fn, nb)))
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("TINYGRAD_LM_THREADS", threads)
        a = Tensor(a0, requires_grad=True)
        y = a.gelu()
        y.backward(Tensor(g))
        out.append((y.numpy(), a.grad.copy()))
    assert calls == [PARALLEL_BLOCKS + 1] * 6  # forward and backward of each run took the split
    for y, da in out[1:]:
        np.testing.assert_array_equal(y, out[0][0])
        np.testing.assert_array_equal(da, out[0][1])
    x = a0.astype(np.float64)
    k = math.sqrt(2 / math.pi)
    t = np.tanh(k * (x + 0.044715 * x ** 3))
    np.testing.assert_allclose(out[0][0], 0.5 * x * (1 + t), rtol=1e-5, atol=1e-6)
    dydx = 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * k * (1 + 3 * 0.044715 * x ** 2)
    np.testing.assert_allclose(out[0][1], dydx * g, rtol=1e-4, atol=1e-5)


def test_layer_norm_split_over_threads_equals_one_thread_and_the_formula(monkeypatch):
    """LayerNorm rows in pieces over threads (functional.LayerNorm's CPU path): the same values
    and gradients on 1 and 2 threads, and the closed form (float64) for the values."""
    import numpy as np

    from tensor import Tensor
    from tensor.functional import layer_norm
    from tensor.ops.elementwise import BLOCK, PARALLEL_BLOCKS

    C = 384
    rows = PARALLEL_BLOCKS * (BLOCK // C) + 5
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((rows, C)).astype(np.float32) * 2 + 1
    w0, b0 = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    g = rng.standard_normal((rows, C)).astype(np.float32)
    out, calls = [], []
    real = parallel.split_run
    monkeypatch.setattr(parallel, "split_run", lambda fn, nb: (calls.append(nb), real(fn, nb)))
    for threads in ("1", "2"):
        monkeypatch.setenv("TINYGRAD_LM_THREADS", threads)
        x, w, b = (Tensor(a, requires_grad=True) for a in (x0, w0, b0))
        y = layer_norm(x, w, b)
        y.backward(Tensor(g))
        out.append((y.numpy(), x.grad.copy(), w.grad.copy(), b.grad.copy()))
    assert calls == [PARALLEL_BLOCKS + 1] * 4
    for a, b_ in zip(out[0], out[1]):
        np.testing.assert_array_equal(a, b_)
    x64 = x0.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * w0 + b0
    np.testing.assert_allclose(out[0][0], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[0][3], g.astype(np.float64).sum(0), rtol=1e-4, atol=1e-3)
