"""Exercise 14 - layer normalization over the last axis.

    mu = mean(x),  var = mean((x - mu)^2),  rstd = 1 / sqrt(var + eps)
    xhat = (x - mu) * rstd
    y = xhat * w + b                 x (..., C), w (C,), b (C,)

You get g = dL/dy. Derive dL/dx, dL/dw, dL/db. For dL/dx, let dxhat = g * w and
remember that mu and var depend on every x in the row; the answer fits on one line:
    dL/dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (means over the last axis)
(derive it, don't just copy it!). w and b are shared by every row.

    python -m tensor.exercises check layer_norm
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, dim, normal, shape

EPS = 1e-5


class LayerNorm(Function):
    """y = layer_norm(x) * w + b. backward(g) returns (dL/dx, dL/dw, dL/db)."""

    def forward(self, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        mu = x.mean(axis=-1, keepdims=True)
        rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + EPS)
        xhat = (x - mu) * rstd
        self.save_for_backward(xhat, rstd, w)
        return xhat * w + b

    def backward(self, g: np.ndarray) -> tuple:
        xhat, rstd, w = self.saved
        # BEGIN SOLUTION: return (dL/dx, dL/dw, dL/db)
        rows = tuple(range(g.ndim - 1))  # every axis but the last: w and b are shared by all rows
        dxhat = g * w
        dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                     - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dx, (g * xhat).sum(axis=rows), g.sum(axis=rows)
        # END SOLUTION


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    c = dim(draw, 2, 5)
    x = normal(rng, (*shape(draw, 0, 2), c)) + np.linspace(-1.0, 1.0, c)  # rows never (nearly) constant
    return {"x": x, "w": normal(rng, (c,)), "b": normal(rng, (c,))}


HINTS = {
    "shape": "w and b are shared by every row: sum their gradients over all axes but the last.",
    "partial": "mu and var depend on every element of the row: dL/dx has the two mean terms.",
    "wrong": "start from xhat: dxhat = g * w; then go through rstd and mu (both are functions of x).",
}
