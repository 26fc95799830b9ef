"""Sums and products on the CPU as BLAS calls (tensor/functional.py: sum_rows, sum_last, gemm).

NumPy's own reductions pay a fixed cost per output row or column; a matrix-vector product with a
vector of ones does the same sum in one BLAS call (benchmarks/RESULTS.md):

    sum_rows   (rows, C) -> (C,):      ones @ x, 2-4x faster than x.sum(0) ((768, 128): 18 -> 5 us)
    sum_last   (..., C) -> (..., 1):   x @ ones, ~4x faster than x.sum(-1) ((768, 128): 25 -> 6 us)
    gemm       a (n, k) @ b (k, m), n in 2..32, b a transposed weight: W @ a.T, ~2x faster (decoding)

Each `*_supports` says when the trick applies; otherwise the plain NumPy call is as fast or faster.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor.backend import array_module


def sum_rows_supports(x2: Any) -> bool:
    """A float32/float64 NumPy matrix of more than one row."""
    return x2.dtype in (np.float32, np.float64) and x2.shape[0] > 1


def sum_rows(x2: Any, out_dtype: Any) -> Any:
    """x2 (rows, C) -> (C,) column sums as ones @ x2, returned in out_dtype."""
    s = np.ones(x2.shape[0], dtype=x2.dtype) @ x2
    return s if s.dtype == out_dtype else s.astype(out_dtype)


def sum_last_supports(x: Any) -> bool:
    """At least 32 rows: for a few rows (decoding) the plain reduction is cheaper than the GEMV."""
    return x.ndim > 0 and x.size >= 32 * x.shape[-1]


def sum_last(x: Any) -> Any:
    """x (..., C) -> (..., 1) row sums as x @ ones, in x's dtype (NumPy or CuPy)."""
    xp = array_module(x)
    return (x @ xp.ones(x.shape[-1], dtype=x.dtype))[..., None]


def gemm_supports(a: Any, b: Any) -> bool:
    """A few rows (2..32) times a transposed (Fortran-ordered) weight, float32/float64."""
    return 1 < a.shape[0] <= 32 and b.flags.f_contiguous


def gemm(a: Any, b: Any) -> Any:
    """a @ b as (b.T @ a.T).T, C-contiguous: OpenBLAS is ~2x faster on the transposed product
    W @ a.T than on a @ W.T for these shapes."""
    return np.ascontiguousarray((b.T @ a.T).T)
