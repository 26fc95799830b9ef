"""Exercise 18 - a whole Transformer block, forward given, backward by hand.

A pre-LayerNorm GPT block with one attention head (LayerNorms without weight/bias,
Linear layers without bias, to keep the bookkeeping readable):

    h1 = ln(x)                                    x (T, C)
    q, k, v = split(h1 @ w_qkv, 3)                w_qkv (C, 3C)
    a = causal_attention(q, k, v)                 (Exercise 17)
    x1 = x + a @ w_o                              w_o (C, C)
    h2 = ln(x1)
    u = h2 @ w_fc ;  m = gelu(u)                  w_fc (C, 4C)   (Exercise 16)
    y = x1 + m @ w_proj                           w_proj (4C, C)

You get g = dL/dy. Derive the gradients of x and the four weights by walking the
lines above from the bottom up. Everything you need was derived in the earlier
exercises; the new parts are the residual connections (a sum: the gradient flows
into both branches and adds up where they meet) and the split (concatenate the three
gradients back). Write small helper functions inside backward if you like.

    python -m tensor.exercises check transformer_block
"""
from __future__ import annotations

import math

import numpy as np

from tensor import Function
from tensor.exercises.shapes import Draw, dim, normal

EPS = 1e-5
K = math.sqrt(2.0 / math.pi)


def layer_norm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xhat, rstd): x normalized over the last axis (no weight, no bias)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + EPS)
    return xc * rstd, rstd


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(output, P) of single-head causal attention."""
    T, D = q.shape
    s = np.where(np.tri(T, dtype=bool), q @ k.T / math.sqrt(D), -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return p @ v, p


class TransformerBlock(Function):
    """y = block(x). backward(g) returns (dL/dx, dL/dw_qkv, dL/dw_o, dL/dw_fc, dL/dw_proj)."""

    def forward(self, x: np.ndarray, w_qkv: np.ndarray, w_o: np.ndarray, w_fc: np.ndarray,
                w_proj: np.ndarray) -> np.ndarray:
        C = x.shape[-1]
        h1, rstd1 = layer_norm(x)
        qkv = h1 @ w_qkv
        q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
        a, p = causal_attention(q, k, v)
        x1 = x + a @ w_o
        h2, rstd2 = layer_norm(x1)
        u = h2 @ w_fc
        t = np.tanh(K * (u + 0.044715 * u ** 3))
        m = 0.5 * u * (1.0 + t)
        self.save_for_backward(h1, rstd1, q, k, v, p, a, h2, rstd2, u, t, m, w_qkv, w_o, w_fc, w_proj)
        return x1 + m @ w_proj

    def backward(self, g: np.ndarray) -> tuple:
        h1, rstd1, q, k, v, p, a, h2, rstd2, u, t, m, w_qkv, w_o, w_fc, w_proj = self.saved
        # ---- TODO: write this backward. return (dL/dx, dL/dw_qkv, dL/dw_o, dL/dw_fc, dL/dw_proj) ----
        raise NotImplementedError("TODO: return (dL/dx, dL/dw_qkv, dL/dw_o, dL/dw_fc, dL/dw_proj)")


def make_inputs(draw: Draw, rng: np.random.Generator) -> dict[str, np.ndarray]:
    T, C = dim(draw, 1, 4), dim(draw, 2, 4)
    x = normal(rng, (T, C)) + np.linspace(-1.0, 1.0, C)  # rows never (nearly) constant
    return {"x": x, "w_qkv": normal(rng, (C, 3 * C), 0.5), "w_o": normal(rng, (C, C), 0.5),
            "w_fc": normal(rng, (C, 4 * C), 0.5), "w_proj": normal(rng, (4 * C, C), 0.5)}


HINTS = {
    "partial": "check the residual connections: dL/dx1 = g + (what comes back through the MLP), "
               "and dL/dx = dL/dx1 + (what comes back through attention).",
    "shape": "a weight's gradient has the weight's shape: dL/dW = input^T @ dL/doutput.",
    "wrong": "go one line at a time from the bottom; gradcheck each piece against Exercises 14, 16 and 17.",
}
