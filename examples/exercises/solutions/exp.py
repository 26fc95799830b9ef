"""Exercise 4 - exp: the function that is its own derivative.

    y = exp(x)

You get g = dL/dy. Derive dL/dx. Reuse what forward saved instead of recomputing.

    python -m tensor.exercises check exp
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, normal, shape


class Exp(Function):
    """y = exp(x). backward(g) returns (dL/dx,)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = np.exp(x)
        self.save_for_backward(y)
        return y

    def backward(self, g: np.ndarray) -> tuple:
        (y,) = self.saved
        # BEGIN SOLUTION: return (dL/dx,)
        return (g * y,)
        # END SOLUTION


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": normal(rng, shape(draw))}


HINTS = {"wrong": "d exp(x)/dx = exp(x) = y, already saved; then multiply by g."}
