"""Exercise 2 - div: the quotient rule.

    y = a / b            elementwise; b is never near zero here

You get g = dL/dy. Derive dL/da and dL/db. (Write a/b = a * b^-1 and differentiate
b^-1 with the power rule.)

    python -m tensor.exercises check div
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, away_from_zero, normal, shape


class Div(Function):
    """y = a / b. backward(g) returns (dL/da, dL/db)."""

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self.save_for_backward(a, b)
        return a / b

    def backward(self, g: np.ndarray) -> tuple:
        a, b = self.saved
        # ---- TODO: write this backward. return (dL/da, dL/db) ----
        raise NotImplementedError("TODO: return (dL/da, dL/db)")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = shape(draw)
    return {"a": normal(rng, s), "b": away_from_zero(rng, s)}


HINTS = {
    "sign": "d(1/b)/db = -1/b^2: the minus sign belongs to b's gradient.",
    "wrong": "dL/db = -g * a / b^2 (b squared, not b).",
}
