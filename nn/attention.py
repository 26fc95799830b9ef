"""Scaled dot-product attention as ONE fused op with a hand-derived backward.

    S = Q K^T / sqrt(D)           (B, H, Tq, Tk)
    S = -inf where masked          (causal: key j > query i + (Tk - Tq); padding mask)
    P = softmax(S)                 rows with every key masked give P = 0
    Pd = dropout(P)                (training only)
    O = Pd V                       (B, H, Tq, D)

Backward (g = dL/dO):
    dV = Pd^T g
    dPd = g V^T ;  dP = dPd * dropout_mask / (1 - p)
    dS = P * (dP - rowsum(dP * P)) / sqrt(D),   rowsum(dP * P) = rowsum(g * O)  (CPU path)
    dQ = dS K ;  dK = dS^T Q

Memory kept for backward per layer: Q, K, V (views of the input on the CPU; on the GPU one
contiguous copy of the heads, which frees the fused qkv buffer) and P, B*H*Tq*Tk elements
in the input dtype (computed in float32 for half inputs, stored back in the half dtype),
plus the dropout keep-mask (bool, B*H*Tq*Tk bytes) when
dropout is on, and on the CPU the output O itself (the array the op returns, no copy; in a
model the next layer keeps it for its own backward anyway). Nothing else: S, the exponentials
and the masked scores are freed in forward (measured: benchmarks/bench_attention_memory.py).

The CPU path (NumPy) works on the scores transposed, S^T (.., Tk, Tq), so that the softmax's
reductions run down columns, which NumPy vectorises; it takes ~1 MB of scores at a time, so
the softmax's passes stay in the L2 cache (`_over_batch`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tensor import kernels
from tensor.cuda import cublas
from tensor.backend import array_module
from tensor.functional import _f32, uniform
from tensor.tensor import Function, Tensor, shape_str


CAUSAL = "causal"  # `allowed` marker: a plain causal mask, which the fused GPU softmax builds itself


def allowed_keys(xp: Any, Tq: int, Tk: int, causal: bool, mask: Any) -> Any:
    """Boolean (.., Tq, Tk) array of the keys each query may attend to, or None for all.

    causal: query i sits at absolute position i + (Tk - Tq) and sees keys up to it.
    mask: bool, True = attend; (B, Tk) for key padding, or anything broadcastable to (B, H, Tq, Tk).
    """
    allowed = xp.tri(Tq, Tk, k=Tk - Tq, dtype=bool) if causal else None
    if mask is not None:
        m = mask[:, None, None, :] if mask.ndim == 2 else mask
        allowed = m if allowed is None else (allowed & m)
    return allowed


def _gemm_dtype(x: Any) -> Any:
    """The dtype of the reference path's batched GEMMs: float32 for 16-bit inputs (NumPy has no
    float16 GEMM and ml_dtypes' bfloat16 one is a slow loop). The GPU path multiplies in 16 bits
    through tensor/cuda/cublas.py instead."""
    if x.dtype.itemsize < 4 and x.dtype.kind != "i":  # float16 / bfloat16
        return np.dtype(np.float32)
    return x.dtype


def _batch_slice(a: Any, lo: int, hi: int, lead: tuple) -> Any:
    """a[lo:hi] along the batch axis (the first of `lead`, the leading shape of q) when a has
    that axis, else a itself (None, a mask that broadcasts over the batch, or the whole batch)."""
    if a is None or not lead or a.ndim != len(lead) + 2 or a.shape[0] != lead[0] or hi - lo == lead[0]:
        return a
    return a[lo:hi]


SCORE_CHUNK_BYTES = 1 << 20  # the CPU path's softmax works on ~1 MB of scores at a time (module docstring)


def _over_batch(fn: Any, q: Any, k: Any) -> None:
    """fn(lo, hi) over consecutive slices of the batch axis whose scores (float32, Tq x Tk per
    head) fit in ~1 MB, so that the softmax's passes over them hit the L2 cache instead of
    memory (T 256: 1.5 MB of scores per batch item, 25 MB per layer).

    (Running the slices on two Python threads was measured as well: 1.3-1.6x for the op alone,
    slower inside a training step, where OpenBLAS's worker thread spins on the other core.)"""
    n = q.shape[0] if q.ndim >= 3 else 1
    heads_per_item = q.size // (q.shape[-2] * q.shape[-1]) // n
    chunk = max(1, SCORE_CHUNK_BYTES // (4 * q.shape[-2] * k.shape[-2] * heads_per_item))
    for lo in range(0, n, chunk):
        fn(lo, min(lo + chunk, n))


def attention_forward(q: Any, k: Any, v: Any, allowed: Any, dropout_p: float, generator: Any,
                      out: Any = None) -> tuple:
    """The forward formulas above on raw arrays -> (O, P, keep-mask or None).

    out: optional (.., Tq, D) array (any strides BLAS accepts, e.g. a view into merged heads)
    that receives O on the CPU path."""
    xp = array_module(q)
    in_dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    if allowed is CAUSAL and dropout_p == 0.0 and kernels.usable(q, contiguous=False) and cublas.usable(q):
        # GPU: cuBLAS batched GEMMs in the input dtype (tensor cores for 16 bits), float32 scores,
        # the fused masked softmax writes P in the input dtype; no operand copies (tensor/cuda/cublas.py)
        s = cublas.matmul(q, k.swapaxes(-1, -2), out_dtype=np.float32)
        p = kernels.causal_softmax(s, scale, in_dtype)
        del s
        return cublas.matmul(p, v), p, None
    work = _gemm_dtype(q)
    if work != in_dtype:
        q, k, v = q.astype(work), k.astype(work), v.astype(work)
    Tq, Tk = q.shape[-2], k.shape[-2]
    if allowed is CAUSAL:
        allowed = allowed_keys(xp, Tq, Tk, True, None)
    # The scores are built transposed, S^T = K Q^T (.., Tk, Tq): the softmax then reduces over
    # axis -2, which NumPy vectorises along the contiguous query axis (a reduction along a short
    # last axis pays a fixed cost per row: 3-4x slower for T = 64). P is returned as the view
    # (P^T)^T; BLAS takes such views with its transpose flag, no copy.
    lead = q.shape[:-2]  # (k and v have the same leading shape)
    st = xp.empty(lead + (Tk, Tq), dtype=np.promote_types(work, np.float32))  # S^T, then P^T in place
    o = out if out is not None and out.dtype == work else xp.empty(lead + (Tq, q.shape[-1]), dtype=work)
    keep = None
    if dropout_p > 0.0:
        keep = uniform(generator, lead + (Tq, Tk), st) >= dropout_p
    bias = None  # masked scores -> -inf: a small 0/-inf array added with broadcasting, made contiguous
    if allowed is not None:  # (adding the transposed view instead measured 5x slower)
        bias = xp.ascontiguousarray(xp.where(allowed, np.float32(0), np.float32(-np.inf)).swapaxes(-1, -2))

    def run(lo: int, hi: int) -> None:  # one slice of the batch; writes st[lo:hi], o[lo:hi] only
        qs, ks, vs, ss, bs, ms, os_ = (_batch_slice(a, lo, hi, lead) for a in (q, k, v, st, bias, keep, o))
        xp.matmul(ks, qs.swapaxes(-1, -2), out=ss)  # the GEMM in the input dtype, softmax in float32
        ss *= scale
        if bs is not None:
            ss += bs
        m = ss.max(axis=-2, keepdims=True)
        if bs is not None:
            m = xp.where(xp.isfinite(m), m, 0.0)  # fully masked rows: avoid inf - inf
        ss -= m
        xp.exp(ss, out=ss)
        denom = ss.sum(axis=-2, keepdims=True)
        ss /= denom if bs is None else xp.where(denom == 0, 1.0, denom)  # a masked-out row stays 0
        ps = ss.swapaxes(-1, -2)
        if ms is not None:
            ps = ps * ms * (1.0 / (1.0 - dropout_p))
        xp.matmul(ps.astype(work, copy=False), vs, out=os_)

    _over_batch(run, q, k)
    p = st.astype(in_dtype, copy=False).swapaxes(-1, -2)  # kept for backward in the input's dtype
    if o.dtype != in_dtype:
        o = o.astype(in_dtype)
    if out is not None and o is not out:
        out[...] = o
        o = out
    return o, p, keep


def attention_backward(g: Any, q: Any, k: Any, v: Any, p: Any, keep: Any, dropout_p: float,
                       out: Any = None, o: Any = None) -> tuple:
    """The backward formulas above on raw arrays -> (dQ, dK, dV).

    o: the forward's output O, when kept. The CPU path then takes rowsum(dP * P) as the row-wise
    dot product g . O (the same number: sum_j (g V^T)_ij Pd_ij = g_i . (Pd V)_i, dropout included),
    D products per query instead of Tk.

    out: a (3, *q.shape) array (or three such arrays, any strides BLAS accepts) that receives
    dQ, dK, dV; the GPU path's GEMMs and the CPU path's write into it directly."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if keep is None and kernels.usable(p) and cublas.usable(q, g):  # GPU: cuBLAS + fused softmax backward
        dp = cublas.matmul(g, v.swapaxes(-1, -2), out_dtype=np.float32)
        ds = kernels.softmax_backward(p, dp, scale)
        del dp
        dq, dk, dv = (None, None, None) if out is None else out
        return (cublas.matmul(ds, k, out=dq), cublas.matmul(ds.swapaxes(-1, -2), q, out=dk),
                cublas.matmul(p.swapaxes(-1, -2), g, out=dv))
    xp = array_module(g)
    work = _gemm_dtype(q)
    if work != q.dtype:
        g, q, k, v = g.astype(work), q.astype(work), k.astype(work), v.astype(work)
        p = p.astype(work)
        o = None if o is None else o.astype(work)
    direct = out is not None and all(a.dtype == work for a in out)
    grads = tuple(out) if direct else tuple(xp.empty(a.shape, dtype=work) for a in (q, k, v))
    lead = q.shape[:-2]

    def run(lo: int, hi: int) -> None:  # transposed, as in the forward: dS^T and P^T (.., Tk, Tq)
        gs, qs, ks, vs, ps, ms, os_ = (_batch_slice(a, lo, hi, lead) for a in (g, q, k, v, p, keep, o))
        dq, dk, dv = (_batch_slice(a, lo, hi, lead) for a in grads)
        pd = ps if ms is None else ps * ms * (1.0 / (1.0 - dropout_p))
        xp.matmul(pd.swapaxes(-1, -2), gs, out=dv)            # dV = Pd^T g
        dst = _f32(vs @ gs.swapaxes(-1, -2))                  # dP^T, then dS^T in its buffer
        if ms is not None:
            dst *= (ms * (1.0 / (1.0 - dropout_p))).swapaxes(-1, -2)
        pt32 = _f32(ps.swapaxes(-1, -2))
        if os_ is not None:  # rowsum(dP * P) = g . O, one GEMV over all (query, head) rows
            go = _f32(gs * os_)
            rowsum = (go.reshape(-1, go.shape[-1]) @ xp.ones(go.shape[-1], go.dtype)).reshape(dst.shape[:-2] + (1, -1))
        else:
            rowsum = (dst * pt32).sum(axis=-2, keepdims=True)
        dst -= rowsum
        dst *= pt32
        dst *= scale
        ds = dst.astype(work, copy=False).swapaxes(-1, -2)
        xp.matmul(ds, ks, out=dq)                             # dQ = dS K
        xp.matmul(dst.astype(work, copy=False), qs, out=dk)   # dK = dS^T Q

    _over_batch(run, q, k)
    if out is not None and not direct:
        for a, d in zip(out, grads):
            a[...] = d
        return tuple(out)
    return grads


class ScaledDotProductAttention(Function):
    """softmax(Q K^T / sqrt(D) + mask) V for q (B, H, Tq, D), k and v (B, H, Tk, D)."""
    # dQ = dS K, dK = dS^T Q, dV = P^T g with dS = P * (dP - rowsum(dP * P)) / sqrt(D)   (module docstring)
    def forward(self, q, k, v, mask=None, causal=True, dropout_p=0.0, generator=None):
        if q.ndim < 2 or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
            raise ValueError(f"scaled_dot_product_attention: expected q (..., Tq, D), k and v (..., Tk, D); "
                             f"got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}")
        if causal and q.shape[-2] > k.shape[-2]:
            raise ValueError(f"scaled_dot_product_attention: causal needs Tq <= Tk, got q {shape_str(q)}, k {shape_str(k)}")
        allowed = CAUSAL if causal and mask is None else allowed_keys(array_module(q), q.shape[-2], k.shape[-2], causal, mask)
        out, p, keep = attention_forward(q, k, v, allowed, dropout_p, generator)
        self.save_for_backward(q, k, v, p, keep, out)  # out: the returned array itself, not a copy
        self.dropout_p = dropout_p
        return out

    def backward(self, g):
        q, k, v, p, keep, o = self.saved
        return attention_backward(g, q, k, v, p, keep, self.dropout_p, o=o) + (None,)


class CausalAttentionQKV(Function):
    """Multi-head attention straight from the fused projection: qkv (B, T, 3C) -> (B, T, C).

    Splitting heads and merging them back happen inside the op, so the graph has one
    node instead of a dozen reshapes and slices, and the backward writes dQKV in one buffer.
    """
    # dqkv = [dQ, dK, dV] with heads merged back; dQ, dK, dV as in ScaledDotProductAttention
    def forward(self, qkv, n_head=1, mask=None, causal=True, dropout_p=0.0, generator=None):
        B, T, C3 = qkv.shape
        if C3 % (3 * n_head):
            raise ValueError(f"attention: qkv of shape {shape_str(qkv)} does not split into 3 x {n_head} heads")
        D = C3 // (3 * n_head)
        if kernels.usable(qkv) and cublas.usable(qkv):
            # GPU: one pass makes every head's matrix contiguous for cuBLAS's strided batches
            heads = kernels.split_heads(qkv, n_head, 3)  # (3, B, H, T, D)
        else:
            heads = qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D), a view
        q, k, v = heads[0], heads[1], heads[2]
        allowed = CAUSAL if causal and mask is None else allowed_keys(array_module(qkv), T, T, causal, mask)
        self.dropout_p, self.shape = dropout_p, (B, T, n_head, D)
        if kernels.usable(qkv) and cublas.usable(qkv):
            out, p, keep = attention_forward(q, k, v, allowed, dropout_p, generator)
            self.save_for_backward(q, k, v, p, keep, None)
            return kernels.merge_heads(out[None])
        y = array_module(qkv).empty((B, T, n_head * D), dtype=qkv.dtype)  # heads merged: O lands in place
        o = y.reshape(B, T, n_head, D).transpose(0, 2, 1, 3)
        _, p, keep = attention_forward(q, k, v, allowed, dropout_p, generator, out=o)
        self.save_for_backward(q, k, v, p, keep, o)  # o: a view of the returned y, not a copy
        return y

    def backward(self, g):
        q, k, v, p, keep, o = self.saved
        B, T, H, D = self.shape
        xp = array_module(g)
        gq = g if g.dtype == q.dtype else g.astype(q.dtype)
        if cublas.usable(gq) and kernels.usable(gq):
            # GPU: g's heads contiguous in one pass; dQ, dK, dV land in one buffer, merged in one pass
            g = kernels.split_heads(gq, H, 1)[0]
            d3 = xp.empty((3, B, H, T, D), dtype=q.dtype)
            attention_backward(g, q, k, v, p, keep, self.dropout_p, out=d3)
            return (kernels.merge_heads(d3),)
        dqkv = xp.empty((B, T, 3, H, D), dtype=g.dtype)  # dQ, dK, dV written in place, heads merged
        attention_backward(g.reshape(B, T, H, D).transpose(0, 2, 1, 3), q, k, v, p, keep, self.dropout_p,
                           out=dqkv.transpose(2, 0, 3, 1, 4), o=o)
        return (dqkv.reshape(B, T, 3 * H * D),)


def _mask_array(mask: Any, like: Tensor) -> Any:
    if mask is None:
        return None
    m = mask.data if isinstance(mask, Tensor) else mask
    xp = array_module(like.data)
    m = xp.asarray(m)
    if m.dtype != bool:
        raise TypeError(f"attention mask must be boolean (True = attend), got dtype {m.dtype}")
    return m


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, mask: Any = None,
                                 dropout_p: float = 0.0, generator: Any = None) -> Tensor:
    """Attention for q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, H, Tq, D).

    causal: query i (at absolute position i + Tk - Tq) sees keys <= its position.
    mask: bool, True = attend; (B, Tk) key padding, or broadcastable to (B, H, Tq, Tk).
    Memory kept for backward: P, B*H*Tq*Tk elements (+ a bool mask with dropout); see module docstring.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")
    return ScaledDotProductAttention.apply(q, k, v, mask=_mask_array(mask, q), causal=causal,
                                           dropout_p=dropout_p, generator=generator)


def causal_attention_qkv(qkv: Tensor, n_head: int, mask: Any = None, dropout_p: float = 0.0,
                         generator: Any = None) -> Tensor:
    """Causal multi-head attention from a fused projection qkv (B, T, 3C) -> (B, T, C)."""
    return CausalAttentionQKV.apply(qkv, n_head=n_head, mask=_mask_array(mask, qkv), causal=True,
                                    dropout_p=dropout_p, generator=generator)


class KVCache:
    """Keys and values of one attention layer for incremental decoding (inference only).

    k, v: (B, H, max_len, D) preallocated; `length` positions are filled. `attend`
    appends the new tokens' keys/values and attends their queries over everything cached,
    so each decoding step runs only the new token through the layer.
    """

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, like: Any) -> None:
        xp = array_module(like)
        self.k = xp.zeros((batch, n_head, max_len, head_dim), dtype=like.dtype)
        self.v = xp.zeros_like(self.k)
        self.length = 0

    def attend(self, qkv: Tensor, n_head: int, mask: Any = None) -> Tensor:
        """qkv (B, t, 3C) of the new tokens -> (B, t, C). mask: (B, >= length + t) bool key mask."""
        from tensor.tensor import is_grad_enabled
        if is_grad_enabled():
            raise RuntimeError("KVCache.attend: the KV cache is for inference; run under `with no_grad():`")
        x = qkv.data
        B, t, C3 = x.shape
        D = C3 // (3 * n_head)
        L = self.length + t
        if L > self.k.shape[2]:
            raise ValueError(f"KVCache: {L} positions exceed the cache size {self.k.shape[2]}")
        heads = x.reshape(B, t, 3, n_head, D).transpose(2, 0, 3, 1, 4)
        self.k[:, :, self.length:L] = heads[1]
        self.v[:, :, self.length:L] = heads[2]
        self.length = L
        m = None if mask is None else _mask_array(mask, qkv)[:, :L]
        # one new token sits after every cached key: only padding can hide a key from it
        allowed = allowed_keys(array_module(x), t, L, t > 1, m)
        xp = array_module(x)
        y = xp.empty((B, t, n_head * D), dtype=x.dtype)  # heads merged: O lands in place
        attention_forward(heads[0], self.k[:, :, :L], self.v[:, :, :L], allowed, 0.0, None,
                          out=y.reshape(B, t, n_head, D).transpose(0, 2, 1, 3))
        return Tensor._make(y, False)
