"""Exercise 15 - embedding: a table lookup, whose backward is a scatter-add.

    y = weight[ids]          ids (...) integers in [0, V), weight (V, C)  ->  y (..., C)

You get g = dL/dy. Derive dL/dweight (V, C); return None for ids. Row v of weight
was copied to every position where ids == v, so it receives the SUM of g over those
positions. Careful: `dw[ids] += g` keeps only one of several equal ids
(NumPy's np.add.at accumulates).

    python -m tensor.exercises check embedding
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, dim, normal, shape


class Embedding(Function):
    """y = weight[ids]. backward(g) returns (None, dL/dweight)."""

    def forward(self, ids: np.ndarray, weight: np.ndarray) -> np.ndarray:
        self.save_for_backward(ids)
        self.weight_shape = weight.shape
        return weight[ids]

    def backward(self, g: np.ndarray) -> tuple:
        (ids,) = self.saved
        # ---- TODO: write this backward. return (None, dL/dweight) ----
        raise NotImplementedError("TODO: return (None, dL/dweight)")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    v, c = dim(draw, 1, 4), dim(draw, 1, 3)
    ids = rng.integers(0, v, shape(draw, 1, 2, 1, 5))  # few rows, many ids: repeats are common
    return {"ids": ids, "weight": normal(rng, (v, c))}


HINTS = {
    "partial": "the wrong rows are ids that occur more than once: use np.add.at(dw, ids, g) to accumulate.",
    "shape": "dL/dweight has the table's shape (V, C), not g's: start from zeros and scatter-add into it.",
}
