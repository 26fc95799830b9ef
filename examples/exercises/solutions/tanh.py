"""Exercise 6 - tanh: an activation whose derivative is written with its output.

    y = tanh(x) = (e^x - e^-x) / (e^x + e^-x)

You get g = dL/dy. Derive dL/dx in terms of y (saved by forward).

    python -m tensor.exercises check tanh
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, normal, shape


class Tanh(Function):
    """y = tanh(x). backward(g) returns (dL/dx,)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = np.tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, g: np.ndarray) -> tuple:
        (y,) = self.saved
        # BEGIN SOLUTION: return (dL/dx,)
        return (g * (1.0 - y * y),)
        # END SOLUTION


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": normal(rng, shape(draw))}


HINTS = {"wrong": "d tanh(x)/dx = 1 - tanh(x)^2 = 1 - y^2 (not 1 - y)."}
