"""Scatter-add of rows on the CPU (tensor/ops/indexing.py: scatter_add_rows, whose reference is
`xp.add.at`): the gradient of an embedding lookup and of integer-array indexing."""
from __future__ import annotations

from typing import Any

import numpy as np

# ids that occur more than this many times are summed with one one-hot GEMM;
# the others in at most this many vectorized rounds (see scatter_add_rows)
HEAVY_COUNT = 16


def scatter_add_rows(index: Any, src: Any, num_rows: int) -> Any:
    """out[index[i]] += src[i] for every i, duplicates summed; out has num_rows rows.

    index: int array (N,) with values in [0, num_rows); src: (N, *rest) -> (num_rows, *rest).
    NumPy arrays. No per-element Python loop (NumPy has no fast scatter-add of rows; np.add.at
    is the reference, tensor/ops/indexing.py):
    sort the ids so equal ids form runs, then
      * ids occurring more than HEAVY_COUNT times: one GEMM, onehot(ids) (H, n) @ src (n, C),
        accumulated in at least float32;
      * the rest in rounds k = 0, 1, ...: round k adds the k-th occurrence of every id
        that has one, a fancy-indexed `out[rows] += src[...]` whose rows are distinct.
    benchmarks/bench_scatter_add.py (RESULTS.md, "Autograd core (issue 2)", table 3b: float32,
    1 thread, microseconds; N ids x V rows x C columns):
        N     V     C    np.add.at  sort+reduceat  bincount  onehot GEMM  this
        768   65    128     615        106           195        123        155
        4096  65    384    9840       5367          4131       1847       2830
        4096  4096  128    3458       3342          1926      46780        796
        4096  4096  384   10244      12181          9895      96464       1937
        4096  4096  384   10246       5878          9386      95855       2185  (Zipf ids)
    (np.add.reduceat along axis 0 runs one inner loop per (run, column): slow for many short
    runs; the one-hot GEMM costs V*N*C: fastest for a small vocabulary, hopeless for a large one.)
    """
    out = np.zeros((num_rows,) + src.shape[1:], dtype=src.dtype)
    n = index.shape[0]
    if n == 0:
        return out
    order = np.argsort(index, kind="stable")
    sorted_idx = index[order]
    starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
    counts = np.diff(np.r_[starts, n])
    rows = sorted_idx[starts]
    heavy = counts > HEAVY_COUNT
    if heavy.any():
        in_heavy = np.repeat(heavy, counts)  # per sorted position
        h = int(heavy.sum())
        which = np.repeat(np.arange(h), counts[heavy])  # 0..h-1 per heavy element
        acc = np.result_type(src.dtype, np.float32)
        onehot = (which == np.arange(h)[:, None]).astype(acc)  # (h, n_heavy)
        part = onehot @ src[order[in_heavy]].reshape(len(which), -1).astype(acc, copy=False)
        out[rows[heavy]] = part.reshape((h,) + src.shape[1:])
        light = ~heavy
        rows, starts, counts = rows[light], starts[light], counts[light]
    if len(rows):
        out[rows] = src[order[starts]]
        for k in range(1, int(counts.max())):
            more = counts > k
            out[rows[more]] += src[order[starts[more] + k]]
    return out
