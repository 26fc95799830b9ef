"""Indexing: `x[index]`, `where`, and the scatter-add that their backward needs."""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor.backend import array_module
from tensor.cpu import scatter as cpu_scatter
from tensor.dispatch import fast_paths_enabled
from tensor.tensor import Function, Tensor, _const, shape_str, unbroadcast


def scatter_add_rows(index: Any, src: Any, num_rows: int) -> Any:
    """out[index[i]] += src[i] for every i, duplicates summed: index int (N,) with values in
    [0, num_rows), src (N, *rest) -> (num_rows, *rest). The reference is `add.at` (on the GPU an
    atomic-add kernel); on the CPU np.add.at is slow, and tensor/cpu/scatter.py sums the rows
    with sorted runs and a one-hot GEMM instead."""
    if fast_paths_enabled() and type(src) is np.ndarray:
        return cpu_scatter.scatter_add_rows(index, src, num_rows)
    xp = array_module(src)
    out = xp.zeros((num_rows,) + src.shape[1:], dtype=src.dtype)
    xp.add.at(out, index, src)
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
