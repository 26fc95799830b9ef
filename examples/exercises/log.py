"""Exercise 5 - log: the natural logarithm.

    y = log(x)           x > 0 here

You get g = dL/dy. Derive dL/dx.

    python -m tensor.exercises check log
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, shape, uniform


class Log(Function):
    """y = log(x). backward(g) returns (dL/dx,)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.save_for_backward(x)
        return np.log(x)

    def backward(self, g: np.ndarray) -> tuple:
        (x,) = self.saved
        # ---- TODO: write this backward. return (dL/dx,) ----
        raise NotImplementedError("TODO: return (dL/dx,)")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": uniform(rng, shape(draw), 0.2, 3.0)}


HINTS = {"wrong": "d log(x)/dx = 1/x."}
