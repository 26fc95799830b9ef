"""Exercise 13 - cross-entropy loss (log_softmax + negative log-likelihood, fused).

    loss = mean over rows n of  -log softmax(logits[n])[targets[n]]
    logits (N, C) floats, targets (N,) integers in [0, C)  ->  a scalar

You get g = dL/dloss (a 0-d array). Derive dL/dlogits. Return None for targets
(integers have no gradient).

    python -m tensor.exercises check cross_entropy
"""
from __future__ import annotations

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, dim, normal


class CrossEntropy(Function):
    """Mean negative log-likelihood. backward(g) returns (dL/dlogits, None)."""

    def forward(self, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        self.save_for_backward(logp, targets)
        return -logp[np.arange(len(targets)), targets].mean()

    def backward(self, g: np.ndarray) -> tuple:
        logp, targets = self.saved
        # ---- TODO: write this backward. return (dL/dlogits, None) ----
        raise NotImplementedError("TODO: return (dL/dlogits, None)")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, c = dim(draw, 1, 4), dim(draw, 2, 5)
    return {"logits": normal(rng, (n, c)), "targets": rng.integers(0, c, n)}


HINTS = {
    "factor": "the loss is a MEAN over the N rows: divide by N (and multiply by g).",
    "sign": "d(-log p_t)/dlogits = softmax - onehot(target), not the other way round.",
    "wrong": "dL/dlogits = (softmax(logits) - onehot(targets)) * g / N.",
}
