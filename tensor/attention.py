"""Multi-head attention as three reference ops, each its textbook formula written once against `xp`:

    q, k, v = split_heads(qkv)        (B, T, 3C) -> 3 x (B, H, T, D)        layout only
    o = sdpa(q, k, v)                 (B, H, Tq, D) from keys/values (B, H, Tk, D)
    y = merge_heads(o)                (B, H, T, D) -> (B, T, C)              layout only

Scaled dot-product attention (ScaledDotProductAttention):
    S = Q K^T / sqrt(D)               (B, H, Tq, Tk)
    S = -inf where masked             causal: key j > query i + (Tk - Tq); padding mask
    P = softmax(S)                    a row with every key masked gives P = 0
    Pd = dropout(P)                   (training only)
    O = Pd V
Backward (g = dL/dO):
    dV = Pd^T g ;  dPd = g V^T ;  dP = dPd * keep / (1 - p)
    dS = P * (dP - rowsum(dP * P)) / sqrt(D) ;  dQ = dS K ;  dK = dS^T Q

`CausalAttentionQKV` is the whole composition merge(sdpa(split(qkv))) as one node: its reference
calls the three pieces' formulas in order; it exists so that the dispatch can run the composition
fused where that pays (tensor/cpu/attention.py writes O and dQ/dK/dV straight into the merged
layouts; tensor/cuda/attention.py splits and merges in one kernel pass each).

Half-precision inputs are computed in float32 by the references (NumPy has no float16 GEMM) and
the results cast back. Memory kept for backward: Q, K, V (views of the input where the layout
allows) and P, B*H*Tq*Tk elements, plus the bool keep-mask when dropout is on.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tensor.backend import array_module
from tensor.functional import uniform
from tensor.tensor import Function, shape_str


def wide(x: Any) -> Any:
    """float16/bfloat16 -> float32 (the references' working dtype); other dtypes unchanged."""
    return x.astype(np.float32) if x.dtype.itemsize < 4 and x.dtype.kind not in "iub" else x


def allowed_keys(xp: Any, Tq: int, Tk: int, causal: bool, mask: Any) -> Any:
    """Boolean (.., Tq, Tk) array of the keys each query may attend to, or None for all.

    causal: query i sits at absolute position i + (Tk - Tq) and sees keys up to it (one query
    sees every key: nothing to mask). mask: bool, True = attend; (B, Tk) key padding, or
    anything broadcastable to (B, H, Tq, Tk)."""
    allowed = xp.tri(Tq, Tk, k=Tk - Tq, dtype=bool) if causal and Tq > 1 else None
    if mask is not None:
        m = mask[:, None, None, :] if mask.ndim == 2 else mask
        allowed = m if allowed is None else (allowed & m)
    return allowed


def check_sdpa_args(q: Any, k: Any, v: Any, causal: bool, dropout_p: float) -> None:
    if q.ndim < 2 or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"scaled_dot_product_attention: expected q (..., Tq, D), k and v (..., Tk, D); "
                         f"got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}")
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"scaled_dot_product_attention: causal needs Tq <= Tk, got q {shape_str(q)}, k {shape_str(k)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")


def check_split_args(x: Any, n_head: int, parts: int) -> tuple:
    if x.ndim != 3 or x.shape[-1] % (parts * n_head):
        raise ValueError(f"split_heads: x of shape {shape_str(x)} does not split into {parts} x {n_head} heads "
                         f"(expected (B, T, {parts} * n_head * D))")
    B, T, C = x.shape
    return B, T, C // (parts * n_head)


# ------------------------------------------------------------------ the formulas on arrays
def sdpa_forward(q: Any, k: Any, v: Any, allowed: Any, dropout_p: float, generator: Any) -> tuple:
    """O, P, keep-mask (or None) for q (.., Tq, D), k, v (.., Tk, D); formulas in the module docstring."""
    xp = array_module(q)
    q, k, v = wide(q), wide(k), wide(v)
    s = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if allowed is not None:
        s = xp.where(allowed, s, -xp.inf)
    m = s.max(axis=-1, keepdims=True)
    e = xp.exp(s - xp.where(xp.isfinite(m), m, 0.0))        # a fully masked row: exp(-inf) = 0 everywhere
    z = e.sum(axis=-1, keepdims=True)
    p = e / xp.where(z == 0, 1.0, z)
    keep = uniform(generator, p.shape, p) >= dropout_p if dropout_p > 0.0 else None
    pd = p if keep is None else p * keep / (1.0 - dropout_p)
    return pd @ v, p, keep


def sdpa_backward(g: Any, q: Any, k: Any, v: Any, p: Any, keep: Any, dropout_p: float) -> tuple:
    """dQ, dK, dV (in q's dtype) of sdpa_forward; formulas in the module docstring."""
    dtype = q.dtype
    g, q, k, v = wide(g), wide(q), wide(k), wide(v)
    pd = p if keep is None else p * keep / (1.0 - dropout_p)
    dv = pd.swapaxes(-1, -2) @ g                             # dV = Pd^T g
    dp = g @ v.swapaxes(-1, -2)                              # dPd = g V^T
    if keep is not None:
        dp = dp * keep / (1.0 - dropout_p)                   # dP
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) / math.sqrt(q.shape[-1])
    return tuple(d.astype(dtype, copy=False) for d in (ds @ k, ds.swapaxes(-1, -2) @ q, dv))


def split_forward(x: Any, n_head: int, parts: int) -> Any:
    """(B, T, parts*H*D) -> (parts, B, H, T, D): channel j*C + h*D + d of token t is part j, head h."""
    B, T, D = check_split_args(x, n_head, parts)
    return x.reshape(B, T, parts, n_head, D).transpose(2, 0, 3, 1, 4)


def merge_forward(x: Any) -> Any:
    """(.., B, H, T, D) -> (B, T, .. * H * D): the inverse of split_forward (parts leading, if any)."""
    *lead, B, H, T, D = x.shape
    axes = (len(lead) + 0, len(lead) + 2) + tuple(range(len(lead))) + (len(lead) + 1, len(lead) + 3)
    return x.transpose(axes).reshape(B, T, -1)


# ------------------------------------------------------------------ the reference Functions
class SplitHeads(Function):
    """x (B, T, parts*C) -> (parts, B, H, T, D), D = C / n_head (a view where the layout allows)."""
    # a permutation of elements: dx = g permuted back (merge_forward)
    def forward(self, x, n_head=1, parts=3):
        return split_forward(x, n_head, parts)

    def backward(self, g):
        return (merge_forward(g),)


class MergeHeads(Function):
    """x (B, H, T, D) -> (B, T, H*D), heads side by side (a view where the layout allows)."""
    # a permutation of elements: dx = g permuted back (split_forward with one part)
    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"merge_heads: expected x (B, H, T, D), got {shape_str(x)}")
        self.n_head = x.shape[1]
        return merge_forward(x)

    def backward(self, g):
        return (split_forward(g, self.n_head, 1)[0],)


class ScaledDotProductAttention(Function):
    """softmax(Q K^T / sqrt(D) + mask) V for q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D).
    mask: bool (B, Tk) or broadcastable to (B, H, Tq, Tk), True = attend, or None."""
    # dQ = dS K, dK = dS^T Q, dV = Pd^T g, dS = P * (dP - rowsum(dP * P)) / sqrt(D)  (module docstring)
    def forward(self, q, k, v, mask=None, causal=True, dropout_p=0.0, generator=None):
        check_sdpa_args(q, k, v, causal, dropout_p)
        allowed = allowed_keys(array_module(q), q.shape[-2], k.shape[-2], causal, mask)
        o, p, keep = sdpa_forward(q, k, v, allowed, dropout_p, generator)
        self.save_for_backward(q, k, v, p, keep)
        self.dropout_p = dropout_p
        return o.astype(q.dtype, copy=False)

    def backward(self, g):
        q, k, v, p, keep = self.saved
        return sdpa_backward(g, q, k, v, p, keep, self.dropout_p)


class CausalAttentionQKV(Function):
    """merge_heads(sdpa(*split_heads(qkv), causal=True)) as one node: qkv (B, T, 3C) -> (B, T, C)."""
    # the pieces' backwards in reverse order: g -> split (merge's backward) -> sdpa_backward -> merge
    def forward(self, qkv, n_head=1, mask=None, dropout_p=0.0, generator=None):
        q, k, v = split_forward(qkv, n_head, 3)
        check_sdpa_args(q, k, v, True, dropout_p)
        allowed = allowed_keys(array_module(qkv), q.shape[-2], k.shape[-2], True, mask)
        o, p, keep = sdpa_forward(q, k, v, allowed, dropout_p, generator)
        self.save_for_backward(q, k, v, p, keep)
        self.dropout_p, self.n_head = dropout_p, n_head
        return merge_forward(o.astype(qkv.dtype, copy=False))

    def backward(self, g):
        q, k, v, p, keep = self.saved
        xp = array_module(g)
        d = sdpa_backward(split_forward(g, self.n_head, 1)[0], q, k, v, p, keep, self.dropout_p)
        return (merge_forward(xp.stack(d)),)
