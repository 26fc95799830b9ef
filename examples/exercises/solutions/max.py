"""Exercise 10 - max: a reduction with ties.

    y = x.max(axis=-1)           x (..., n) -> y (...)

You get g = dL/dy. Derive dL/dx. Only the maximum moves y... but what if two elements
tie for the maximum? This library's rule: the k tied elements share the gradient
equally, 1/k each (the total is preserved; for two ties it matches central
differences, which is what the checker measures - some rows here have a tie).

    python -m tensor.exercises check max
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, dim, shape


class Max(Function):
    """y = max of x over the last axis. backward(g) returns (dL/dx,)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = x.max(axis=-1)
        self.save_for_backward(x, y)
        return y

    def backward(self, g: np.ndarray) -> tuple:
        x, y = self.saved
        # BEGIN SOLUTION: return (dL/dx,)
        winners = (x == y[..., None]).astype(x.dtype)
        winners /= winners.sum(axis=-1, keepdims=True)  # ties share equally
        return (winners * g[..., None],)
        # END SOLUTION


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = (*shape(draw, 0, 2), dim(draw, 1, 5))
    size = int(np.prod(s))
    x = ((rng.permutation(size) - size / 2) * 0.37).reshape(s)  # distinct values, well apart
    rows = x.reshape(-1, s[-1])
    for row in rows:  # give about half the rows a two-way tie for the maximum
        if s[-1] > 1 and rng.random() < 0.5:
            j = rng.choice([i for i in range(s[-1]) if i != row.argmax()])
            row[j] = row.max()
    return {"x": rows.reshape(s)}


HINTS = {
    "partial": "the rows that go wrong have a tie: give each of the k tied maxima 1/k of g, not all of it to one.",
    "wrong": "dL/dx is g at the position of the maximum and 0 elsewhere (split among ties).",
}
