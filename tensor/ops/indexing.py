"""Indexing: `x[index]`, `where`, and the scatter-add that their backward needs."""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor.backend import array_module
from tensor.tensor import Function, Tensor, _const, shape_str, unbroadcast


# ids that occur more than this many times are summed with one one-hot GEMM;
# the others in at most this many vectorized rounds (see scatter_add_rows)
HEAVY_COUNT = 16


def scatter_add_rows(index: Any, src: Any, num_rows: int) -> Any:
    """out[index[i]] += src[i] for every i, duplicates summed; out has num_rows rows.

    index: int array (N,) with values in [0, num_rows); src: (N, *rest) -> (num_rows, *rest).
    No per-element Python loop. On the CPU (NumPy has no fast scatter-add of rows):
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
    xp = array_module(src)
    out = xp.zeros((num_rows,) + src.shape[1:], dtype=src.dtype)
    n = index.shape[0]
    if n == 0:
        return out
    if xp is not np:
        xp.add.at(out, index, src)  # CuPy's add.at is an atomic-add kernel
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


def _is_advanced(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(hasattr(i, "shape") or isinstance(i, list) for i in items)


class GetItem(Function):
    """x[index] with ints, slices, None, Ellipsis and integer (or boolean) arrays."""
    # backward: a zero gradient of x's shape with g added at the indexed places
    # (integer arrays may repeat an index, so the adds must accumulate: scatter-add)
    def forward(self, x, index=None):
        self.shape, self.index, self.dtype = x.shape, index, x.dtype
        try:
            return x[index]
        except IndexError as e:
            raise IndexError(f"getitem: index {index!r} is invalid for a tensor of shape {shape_str(x)}: {e}") from None

    def backward(self, g):
        xp = array_module(g)
        index = self.index
        if not _is_advanced(index):
            out = xp.zeros(self.shape, dtype=g.dtype)
            out[index] = g  # basic indexing never repeats an element
            return (out,)
        if isinstance(index, (np.ndarray,)) or (hasattr(index, "dtype") and not isinstance(index, tuple)):
            if index.dtype != bool:  # x[ids]: rows gathered, rows scattered back
                flat = index.reshape(-1) % self.shape[0]
                rows = scatter_add_rows(flat, g.reshape((-1,) + self.shape[1:]), self.shape[0])
                return (rows,)
        out = xp.zeros(self.shape, dtype=g.dtype)
        xp.add.at(out, index, g)  # general mixed advanced indexing
        return (out,)


class Where(Function):
    """where(cond, a, b): a where cond is true, else b (cond is not differentiated)."""
    # d/da = cond, d/db = not cond (each summed back to its shape)
    def forward(self, cond, a, b):
        xp = array_module(cond)
        self.save_for_backward(cond)
        self.sa, self.sb = getattr(a, "shape", ()), getattr(b, "shape", ())
        out = xp.where(cond, a, b)
        ref = a if hasattr(a, "dtype") else b
        return out.astype(ref.dtype, copy=False) if hasattr(ref, "dtype") else out

    def backward(self, g):
        cond = self.saved[0]
        ga = unbroadcast(g * cond, self.sa) if self.needs_grad[1] else None
        gb = unbroadcast(g * ~cond, self.sb) if self.needs_grad[2] else None
        return None, ga, gb


def where(cond: Any, a: Any, b: Any) -> Tensor:
    """Elementwise choice: a where cond else b; a and b broadcast (tensors or constants)."""
    ref = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else Tensor(np.asarray(a))
    cond = cond if isinstance(cond, Tensor) else Tensor._make(array_module(ref.data).asarray(cond), False)
    if cond.dtype != bool:
        raise TypeError(f"where: condition must be boolean, got dtype {cond.dtype}")
    return Where.apply(cond, _const(a, ref), _const(b, ref))
