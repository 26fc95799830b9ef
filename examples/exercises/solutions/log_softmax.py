"""Exercise 12 - log_softmax along the last axis.

    y_i = x_i - log(sum_j exp(x_j))

You get g = dL/dy. Derive dL/dx. (The derivative of log-sum-exp is softmax; softmax
is exp(y).)

    python -m tensor.exercises check log_softmax
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, normal, shape


class LogSoftmax(Function):
    """y = log_softmax(x) over the last axis. backward(g) returns (dL/dx,)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        shifted = x - x.max(axis=-1, keepdims=True)
        y = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        self.save_for_backward(y)
        return y

    def backward(self, g: np.ndarray) -> tuple:
        (y,) = self.saved
        # BEGIN SOLUTION: return (dL/dx,)
        return (g - np.exp(y) * g.sum(axis=-1, keepdims=True),)
        # END SOLUTION


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": normal(rng, shape(draw))}


HINTS = {"wrong": "dy_i/dx_j = delta_ij - softmax_j, so dL/dx_j = g_j - softmax_j * sum_i g_i."}
