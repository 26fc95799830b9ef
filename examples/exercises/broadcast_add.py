"""Exercise 7 - broadcast_add: addition with NumPy broadcasting.

    y = a + b            a and b broadcast to y's shape (e.g. (2, 3) + (3,), or (4, 1) + (1, 5))

You get g = dL/dy, of y's shape. Derive dL/da and dL/db, each of ITS input's shape.
An element of b that broadcasting copied to many places of y receives the gradient of
every copy: sum g over the axes broadcasting added (leading ones) or stretched (size 1).

    python -m tensor.exercises check broadcast_add
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, broadcastable_to, normal, shape


class BroadcastAdd(Function):
    """y = a + b with broadcasting. backward(g) returns (dL/da, dL/db)."""

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self.shape_a, self.shape_b = a.shape, b.shape
        return a + b

    def backward(self, g: np.ndarray) -> tuple:
        # ---- TODO: write this backward. return (dL/da, dL/db), each of its input's shape ----
        raise NotImplementedError("TODO: return (dL/da, dL/db), each of its input's shape")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    target = shape(draw, 1, 3)
    return {"a": normal(rng, broadcastable_to(draw, target)), "b": normal(rng, broadcastable_to(draw, target))}


HINTS = {
    "shape": "sum over the leading axes broadcasting added, then (keepdims=True) over the axes where "
             "the input has size 1 but g does not.",
    "factor": "each element of g counts once per copy: sum, don't average.",
}
