"""Exercise 16 - GELU, the tanh approximation used by GPT-2.

    u = k (x + 0.044715 x^3),  k = sqrt(2/pi)
    t = tanh(u)
    y = 0.5 x (1 + t)

You get g = dL/dy. Derive dL/dx (product rule on 0.5 x (1 + t), then the chain rule
through tanh and u).

    python -m tensor.exercises check gelu
"""
from __future__ import annotations

import math

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, normal, shape

K = math.sqrt(2.0 / math.pi)


class Gelu(Function):
    """y = gelu(x). backward(g) returns (dL/dx,)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        t = np.tanh(K * (x + 0.044715 * x ** 3))
        self.save_for_backward(x, t)
        return 0.5 * x * (1.0 + t)

    def backward(self, g: np.ndarray) -> tuple:
        x, t = self.saved
        # ---- TODO: write this backward. return (dL/dx,) ----
        raise NotImplementedError("TODO: return (dL/dx,)")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": normal(rng, shape(draw), scale=2.0)}


HINTS = {
    "partial": "two terms: 0.5 (1 + t) from differentiating x, and 0.5 x (1 - t^2) du/dx from t.",
    "wrong": "du/dx = k (1 + 3 * 0.044715 x^2); d tanh(u)/du = 1 - t^2.",
}
