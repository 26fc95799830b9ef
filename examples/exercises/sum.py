"""Exercise 8 - sum: a reduction over some axes.

    y = x.sum(axis=axis, keepdims=keepdims)      axis: None, an int, or a tuple of ints

You get g = dL/dy, of y's (smaller) shape. Derive dL/dx, of x's shape.
Every x element that went into a sum gets that sum's gradient unchanged; put the
reduced axes back (size 1) when keepdims is False, then broadcast.

    python -m tensor.exercises check sum
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, normal, shape, st


class Sum(Function):
    """y = x.sum(axis, keepdims). backward(g) returns (dL/dx,)."""

    def forward(self, x: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
        self.shape, self.axis, self.keepdims = x.shape, axis, keepdims
        return x.sum(axis=axis, keepdims=keepdims)

    def backward(self, g: np.ndarray) -> tuple:
        # ---- TODO: write this backward. return (dL/dx,) with x's shape self.shape ----
        raise NotImplementedError("TODO: return (dL/dx,) with x's shape self.shape")


def make_inputs(draw: Draw, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    s = shape(draw, 1, 3)
    n = len(s)
    axis = draw(st.one_of(st.none(), st.integers(-n, n - 1),
                          st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True).map(tuple)))
    return {"x": normal(rng, s)}, {"axis": axis, "keepdims": draw(st.booleans())}


HINTS = {
    "shape": "g has the reduced shape: reshape it with the summed axes set to 1, then broadcast to x's shape.",
    "factor": "a sum passes its gradient unchanged to every term (no division: that would be a mean).",
}
