"""Exercise 17 - scaled dot-product attention with a causal mask (one fused op).

    S = q k^T / sqrt(D)              q, k, v (..., T, D)  ->  S (..., T, T)
    S_ij = -inf where j > i          (causal: a query never sees later keys)
    P = softmax(S) over the last axis
    y = P v                          (..., T, D)

You get g = dL/dy. Derive dL/dq, dL/dk, dL/dv. Go backwards one line at a time:
dv from y = P v, then dP, then dS through the softmax (Exercise 11), then dq and dk
from S (don't forget 1/sqrt(D)). Masked entries have P = 0: nothing flows through them.

    python -m tensor.exercises check attention
"""
from __future__ import annotations

import math

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, dim, normal, st


class CausalAttention(Function):
    """y = softmax(causal(q k^T / sqrt(D))) v. backward(g) returns (dL/dq, dL/dk, dL/dv)."""

    def forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        T, D = q.shape[-2:]
        s = q @ k.swapaxes(-1, -2) / math.sqrt(D)
        s = np.where(np.tri(T, dtype=bool), s, -np.inf)  # keep j <= i
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        self.save_for_backward(q, k, v, p)
        return p @ v

    def backward(self, g: np.ndarray) -> tuple:
        q, k, v, p = self.saved
        # ---- TODO: write this backward. return (dL/dq, dL/dk, dL/dv) ----
        raise NotImplementedError("TODO: return (dL/dq, dL/dk, dL/dv)")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    heads = draw(st.lists(st.integers(1, 2), max_size=1))
    s = (*heads, dim(draw, 1, 4), dim(draw, 1, 3))
    return {"q": normal(rng, s), "k": normal(rng, s), "v": normal(rng, s)}


HINTS = {
    "factor": "S = q k^T / sqrt(D): dq and dk carry the factor 1/sqrt(D), dv does not.",
    "shape": "dq = dS @ k and dk = dS^T @ q: transpose only the last two axes (swapaxes(-1, -2)).",
    "partial": "check the softmax step: dS = P * (dP - sum(dP * P, axis=-1)).",
}
