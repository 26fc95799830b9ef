"""Exercise 1 - mul: the product rule.

    y = a * b            elementwise; a, b and y have the same shape

You get g = dL/dy (the shape of y). Derive dL/da and dL/db.
Each output element y_i depends on a_i and b_i only, so the chain rule is elementwise:
dL/da_i = g_i * dy_i/da_i.

    python -m tensor.exercises check mul
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, normal, shape


class Mul(Function):
    """y = a * b. backward(g) returns (dL/da, dL/db)."""

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self.save_for_backward(a, b)
        return a * b

    def backward(self, g: np.ndarray) -> tuple:
        a, b = self.saved
        # ---- TODO: write this backward. return (dL/da, dL/db) ----
        raise NotImplementedError("TODO: return (dL/da, dL/db)")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = shape(draw)
    return {"a": normal(rng, s), "b": normal(rng, s)}


HINTS = {
    "zero": "dy/da = b: the gradient of a is g times the *other* factor.",
    "wrong": "dL/da = g * b and dL/db = g * a - did you swap them?",
}
