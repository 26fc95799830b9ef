"""Exercise 19 - tensor_parallel: the backward of Megatron's f and g operators.

Tensor parallelism runs one layer on R ranks, each holding a slice of its weights. Two
operators move values between "the same on every rank" (replicated) and "a different part on
each rank" (sharded). Here the R ranks are simulated in one process: axis 0 of an (R, ...)
array is the rank.

    c = f(x)        x (C,) replicated   -> c (R, C): every rank gets a copy of x
    p = c * w       w (R, C): rank r's own (sharded) weights, a local op on each rank
    y = g(p)        p (R, C) partial results -> y (C,) = sum over ranks of p (an all-reduce)

You get gy = dL/dy (C,). Derive dL/dx (C,) and dL/dw (R, C), writing f's and g's backward
as the two helpers below. Think of what each rank holds: after g every rank has the same y
and the same gy (g's backward needs no communication: each rank's partial p_r entered y
with coefficient 1). Before f every rank held the same x, but each rank's copy c_r met
different weights, so each computes a different dL/dc_r: the true dL/dx adds them all up (on
real ranks, an all-reduce). f and g are conjugate: one's forward is the other's backward.

    python -m tensor.exercises check tensor_parallel
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, dim, normal


class FThenG(Function):
    """y = g(f(x) * w), ranks on axis 0. backward(gy) returns (dL/dx, dL/dw)."""

    def forward(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        c = np.broadcast_to(x, w.shape)           # f: a copy of x on every rank
        self.save_for_backward(c, w)
        return (c * w).sum(axis=0)                # g: the partial results summed over the ranks

    def backward(self, gy: np.ndarray) -> tuple:
        c, w = self.saved

        def g_backward(gy: np.ndarray, ranks: int) -> np.ndarray:
            """dL/dp (R, C) from dL/dy (C,)."""
            # ---- TODO: write g's backward ----
            raise NotImplementedError("TODO: return dL/dp (R, C)")

        def f_backward(gc: np.ndarray) -> np.ndarray:
            """dL/dx (C,) from every rank's dL/dc_r (R, C)."""
            # ---- TODO: write f's backward ----
            raise NotImplementedError("TODO: return dL/dx (C,)")

        gp = g_backward(gy, w.shape[0])
        return f_backward(gp * w), gp * c


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ranks, width = dim(draw, 1, 4), dim(draw, 1, 5)
    return {"x": normal(rng, (width,)), "w": normal(rng, (ranks, width))}


HINTS = {
    "factor": "f's backward sums the R copies' gradients (not their mean); g's backward copies gy to every "
              "rank unchanged (no 1/R).",
    "shape": "f_backward returns one (C,) gradient for the one x; g_backward one (C,) gradient per rank: (R, C).",
}
