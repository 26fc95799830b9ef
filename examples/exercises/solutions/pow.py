"""Exercise 3 - pow: a power with a variable base AND a variable exponent.

    y = a ** b           elementwise; a > 0 here so that log(a) exists

You get g = dL/dy. Derive dL/da (the power rule, b held fixed) and dL/db
(write a^b = exp(b log a), a held fixed).

    python -m tensor.exercises check pow
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, normal, shape, uniform


class Pow(Function):
    """y = a ** b. backward(g) returns (dL/da, dL/db)."""

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        y = a ** b
        self.save_for_backward(a, b, y)
        return y

    def backward(self, g: np.ndarray) -> tuple:
        a, b, y = self.saved
        # BEGIN SOLUTION: return (dL/da, dL/db)
        return g * b * a ** (b - 1), g * y * np.log(a)
        # END SOLUTION


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = shape(draw)
    return {"a": uniform(rng, s, 0.5, 2.0), "b": normal(rng, s)}


HINTS = {
    "wrong": "d(a^b)/da = b * a^(b-1);  d(a^b)/db = a^b * log(a).",
    "partial": "two different rules: the power rule for a, the exponential rule for b.",
}
