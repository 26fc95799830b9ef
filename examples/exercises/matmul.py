"""Exercise 9 - matmul: a batched matrix product with a shared weight.

    y = a @ b            a (..., n, k) with 0 or 1 batch axes, b (k, m)  ->  y (..., n, m)

You get g = dL/dy. Derive dL/da and dL/db. Write y_ij = sum_p a_ip b_pj and ask which
y's each a_ip and b_pj touch. b is shared by every batch entry: its gradient collects
from all of them.

    python -m tensor.exercises check matmul
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, dim, normal, st


class MatMul(Function):
    """y = a @ b. backward(g) returns (dL/da, dL/db)."""

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self.save_for_backward(a, b)
        return a @ b

    def backward(self, g: np.ndarray) -> tuple:
        a, b = self.saved
        # ---- TODO: write this backward. return (dL/da, dL/db) ----
        raise NotImplementedError("TODO: return (dL/da, dL/db)")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, k, m = dim(draw), dim(draw), dim(draw)
    batch = draw(st.lists(st.integers(1, 3), max_size=1))
    return {"a": normal(rng, (*batch, n, k)), "b": normal(rng, (k, m))}


HINTS = {
    "shape": "dL/db = a^T @ g summed over the batch axis; dL/da = g @ b^T.",
    "wrong": "dL/da = g @ b.T and dL/db = a.T @ g: check the transposes and the order of the factors.",
}
