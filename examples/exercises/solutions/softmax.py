"""Exercise 11 - softmax along the last axis.

    y_i = exp(x_i) / sum_j exp(x_j)

You get g = dL/dy. Derive dL/dx. The Jacobian is dy_i/dx_j = y_i (delta_ij - y_j);
multiply it by g without building the matrix (use y, saved by forward).

    python -m tensor.exercises check softmax
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, normal, shape


class Softmax(Function):
    """y = softmax(x) over the last axis. backward(g) returns (dL/dx,)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        y = e / e.sum(axis=-1, keepdims=True)
        self.save_for_backward(y)
        return y

    def backward(self, g: np.ndarray) -> tuple:
        (y,) = self.saved
        # BEGIN SOLUTION: return (dL/dx,)
        return (y * (g - (g * y).sum(axis=-1, keepdims=True)),)
        # END SOLUTION


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": normal(rng, shape(draw))}


HINTS = {
    "wrong": "dL/dx_j = sum_i g_i y_i (delta_ij - y_j) = y_j (g_j - sum_i g_i y_i).",
    "partial": "the sum over i runs along the softmax axis only (axis=-1, keepdims=True).",
}
