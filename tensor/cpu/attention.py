"""CPU fast paths of attention (tensor/attention.py): the same formulas, arranged for NumPy.

* The scores are built transposed, S^T = K Q^T (.., Tk, Tq), so that the softmax's reductions
  run down columns, which NumPy vectorises along the contiguous query axis (a reduction along a
  short last axis pays a fixed cost per row: 3-4x slower for T = 64). P is kept as the view
  (P^T)^T; BLAS takes such views with its transpose flag, no copy.
* The batch is worked through in slices of ~1 MB of scores (`over_batch`), so the softmax's
  passes stay in the L2 cache.
* rowsum(dP * P) in the backward is the row-wise dot product g . O (the same number:
  sum_j (g V^T)_ij Pd_ij = g_i . (Pd V)_i, dropout included): D products per query instead of Tk.
  O is kept as the op's own output (no copy).
* O is written straight into the merged-heads layout (B, T, H, D), so merge_heads is a view;
  the fused CpuCausalAttentionQKV also writes dQ, dK, dV straight into one (B, T, 3, H, D)
  buffer, the gradient of the fused projection, with no split or merge copies at all.

Memory kept for backward: Q, K, V (views of the input), P (B*H*Tq*Tk elements in the input
dtype, computed in float32 for half inputs), the bool keep-mask with dropout, and O (the
returned array itself). S, the exponentials and the masked scores are freed in forward
(measured: benchmarks/bench_attention_memory.py).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tensor.attention import (CausalAttentionQKV, ScaledDotProductAttention, allowed_keys, check_sdpa_args,
                              split_forward)
from tensor.functional import to_f32, uniform

SCORE_CHUNK_BYTES = 1 << 20  # the softmax works on ~1 MB of scores at a time (module docstring)


def gemm_dtype(x: Any) -> Any:
    """float32 for 16-bit inputs (NumPy has no float16 GEMM and ml_dtypes' bfloat16 one is a slow
    loop), else the input's dtype."""
    return np.dtype(np.float32) if x.dtype.itemsize < 4 and x.dtype.kind not in "iub" else x.dtype


def _batch_slice(a: Any, lo: int, hi: int, lead: tuple) -> Any:
    """a[lo:hi] along the batch axis (the first of `lead`, the leading shape of q) when a has
    that axis, else a itself (None, a mask that broadcasts over the batch, or the whole batch)."""
    if a is None or not lead or a.ndim != len(lead) + 2 or a.shape[0] != lead[0] or hi - lo == lead[0]:
        return a
    return a[lo:hi]


def over_batch(fn: Any, q: Any, k: Any) -> None:
    """fn(lo, hi) over consecutive slices of the batch axis whose scores (float32, Tq x Tk per
    head) fit in ~1 MB, so that the softmax's passes hit the L2 cache instead of memory.

    (Running the slices on two Python threads was measured as well: 1.3-1.6x for the op alone,
    slower inside a training step, where OpenBLAS's worker thread spins on the other core.)"""
    n = q.shape[0] if q.ndim >= 3 else 1
    heads_per_item = q.size // (q.shape[-2] * q.shape[-1]) // n if q.size else 1
    chunk = max(1, SCORE_CHUNK_BYTES // max(1, 4 * q.shape[-2] * k.shape[-2] * heads_per_item))
    for lo in range(0, n, chunk):
        fn(lo, min(lo + chunk, n))


def attention_forward(q: Any, k: Any, v: Any, allowed: Any, dropout_p: float, generator: Any,
                      out: Any = None) -> tuple:
    """(O, P, keep-mask or None) on NumPy arrays. out: optional (.., Tq, D) array (any strides
    BLAS accepts, e.g. a view into merged heads) that receives O."""
    in_dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    work = gemm_dtype(q)
    if work != in_dtype:
        q, k, v = q.astype(work), k.astype(work), v.astype(work)
    Tq, Tk = q.shape[-2], k.shape[-2]
    lead = q.shape[:-2]  # (k and v have the same leading shape)
    st = np.empty(lead + (Tk, Tq), dtype=np.promote_types(work, np.float32))  # S^T, then P^T in place
    o = out if out is not None and out.dtype == work else np.empty(lead + (Tq, q.shape[-1]), dtype=work)
    keep = None
    if dropout_p > 0.0:  # the same draw as the reference's: one uniform per (.., Tq, Tk) score
        keep = uniform(generator, lead + (Tq, Tk), st) >= dropout_p
    bias = None  # masked scores -> -inf: a small 0/-inf array added with broadcasting, made contiguous
    if allowed is not None:  # (adding the transposed view instead measured 5x slower)
        bias = np.ascontiguousarray(np.where(allowed, np.float32(0), np.float32(-np.inf)).swapaxes(-1, -2))

    def run(lo: int, hi: int) -> None:  # one slice of the batch; writes st[lo:hi], o[lo:hi] only
        qs, ks, vs, ss, bs, ms, os_ = (_batch_slice(a, lo, hi, lead) for a in (q, k, v, st, bias, keep, o))
        np.matmul(ks, qs.swapaxes(-1, -2), out=ss)  # the GEMM in the input dtype, softmax in float32
        ss *= scale
        if bs is not None:
            ss += bs
        m = ss.max(axis=-2, keepdims=True)
        if bs is not None:
            m = np.where(np.isfinite(m), m, 0.0)  # fully masked rows: avoid inf - inf
        ss -= m
        np.exp(ss, out=ss)
        denom = ss.sum(axis=-2, keepdims=True)
        ss /= denom if bs is None else np.where(denom == 0, 1.0, denom)  # a masked-out row stays 0
        ps = ss.swapaxes(-1, -2)
        if ms is not None:
            ps = ps * ms * (1.0 / (1.0 - dropout_p))
        np.matmul(ps.astype(work, copy=False), vs, out=os_)

    over_batch(run, q, k)
    p = st.astype(in_dtype, copy=False).swapaxes(-1, -2)  # kept for backward in the input's dtype
    if o.dtype != in_dtype:
        o = o.astype(in_dtype)
    if out is not None and o is not out:
        out[...] = o
        o = out
    return o, p, keep


def decode_attention(q: Any, k: Any, v: Any, out: Any, bias: Any = None, scores: Any = None) -> Any:
    """One query row per head against every cached key (decoding: Tq = 1, no dropout,
    float32/float64): attention_forward's formulas without its slices and masks (a dozen fewer
    NumPy calls per layer and token). q (.., 1, D), k, v (.., Tk, D); O into `out`; bias: None, or
    0/-inf per key broadcastable to (.., 1, Tk) (-inf: a masked key; at least one key per row
    must be unmasked); scores: None, or a (.., 1, Tk) buffer for the scores (a view of one
    preallocated for the whole generation), else one is allocated. Returns P (.., 1, Tk).

    With one query the scores are a row per head, S = q K^T, so the softmax runs in place along
    that contiguous row (the transposed layout of attention_forward pays off for many queries)."""
    s = np.matmul(q, k.swapaxes(-1, -2), out=scores)    # S (.., 1, Tk)
    s *= 1.0 / math.sqrt(q.shape[-1])
    if bias is not None:
        s += bias
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    np.matmul(s, v, out=out)
    return s


def attention_backward(g: Any, q: Any, k: Any, v: Any, p: Any, keep: Any, dropout_p: float,
                       out: Any = None, o: Any = None) -> tuple:
    """(dQ, dK, dV) on NumPy arrays. o: the forward's output (rowsum(dP * P) = g . O when given).
    out: three arrays (any strides BLAS accepts) that receive dQ, dK, dV."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    work = gemm_dtype(q)
    if work != q.dtype:
        g, q, k, v = g.astype(work), q.astype(work), k.astype(work), v.astype(work)
        p = p.astype(work)
        o = None if o is None else o.astype(work)
    elif g.dtype != work:
        g = g.astype(work)
    direct = out is not None and all(a.dtype == work for a in out)
    grads = tuple(out) if direct else tuple(np.empty(a.shape, dtype=work) for a in (q, k, v))
    lead = q.shape[:-2]

    def run(lo: int, hi: int) -> None:  # transposed, as in the forward: dS^T and P^T (.., Tk, Tq)
        gs, qs, ks, vs, ps, ms, os_ = (_batch_slice(a, lo, hi, lead) for a in (g, q, k, v, p, keep, o))
        dq, dk, dv = (_batch_slice(a, lo, hi, lead) for a in grads)
        pd = ps if ms is None else ps * ms * (1.0 / (1.0 - dropout_p))
        np.matmul(pd.swapaxes(-1, -2), gs, out=dv)            # dV = Pd^T g
        dst = to_f32(vs @ gs.swapaxes(-1, -2))                  # dP^T, then dS^T in its buffer
        if ms is not None:
            dst *= (ms * (1.0 / (1.0 - dropout_p))).swapaxes(-1, -2)
        pt32 = to_f32(ps.swapaxes(-1, -2))
        if os_ is not None:  # rowsum(dP * P) = g . O, one GEMV over all (query, head) rows
            go = to_f32(gs * os_)
            rowsum = (go.reshape(-1, go.shape[-1]) @ np.ones(go.shape[-1], go.dtype)).reshape(dst.shape[:-2] + (1, -1))
        else:
            rowsum = (dst * pt32).sum(axis=-2, keepdims=True)
        dst -= rowsum
        dst *= pt32
        dst *= scale
        ds = dst.astype(work, copy=False).swapaxes(-1, -2)
        np.matmul(ds, ks, out=dq)                             # dQ = dS K
        np.matmul(dst.astype(work, copy=False), qs, out=dk)   # dK = dS^T Q

    over_batch(run, q, k)
    if out is not None and not direct:
        for a, d in zip(out, grads):
            a[...] = d
        return tuple(out)
    return grads


class CpuScaledDotProductAttention(ScaledDotProductAttention):
    """ScaledDotProductAttention on NumPy arrays: transposed scores, batch slices, O written in the
    merged-heads layout (so merge_heads is a view) and kept for the g . O rowsum."""

    @staticmethod
    def supports(q: Any, *arrays: Any, **kwargs: Any) -> bool:
        return True  # every NumPy dtype and layout

    def forward(self, q, k, v, mask=None, causal=True, dropout_p=0.0, generator=None):
        check_sdpa_args(q, k, v, causal, dropout_p)
        allowed = allowed_keys(np, q.shape[-2], k.shape[-2], causal, mask)
        out = None
        if q.ndim == 4:  # (B, H, Tq, D) written as (B, Tq, H, D): merge_heads of it is a view
            B, H, Tq, D = q.shape
            out = np.empty((B, Tq, H, D), dtype=q.dtype).transpose(0, 2, 1, 3)
        if (out is not None and Tq == 1 and allowed is None and dropout_p == 0.0
                and q.dtype in (np.float32, np.float64) and k.dtype == q.dtype and v.dtype == q.dtype):
            p = decode_attention(q, k, v, out)
            self.save_for_backward(q, k, v, p, None, out)
            self.dropout_p = dropout_p
            return out
        o, p, keep = attention_forward(q, k, v, allowed, dropout_p, generator, out=out)
        self.save_for_backward(q, k, v, p, keep, o)  # o: the returned array itself, not a copy
        self.dropout_p = dropout_p
        return o

    def backward(self, g):
        q, k, v, p, keep, o = self.saved
        grads = attention_backward(g, q, k, v, p, keep, self.dropout_p, o=o)
        return tuple(d.astype(q.dtype, copy=False) for d in grads)  # (16-bit inputs: computed in float32)


class CpuCausalAttentionQKV(CausalAttentionQKV):
    """The fused composition on NumPy arrays: q, k, v are views of qkv, O lands in the merged
    (B, T, C) output and dQ, dK, dV in the merged (B, T, 3C) gradient: no layout copies."""

    @staticmethod
    def supports(qkv: Any, *arrays: Any, **kwargs: Any) -> bool:
        return True

    def forward(self, qkv, n_head=1, mask=None, dropout_p=0.0, generator=None):
        q, k, v = split_forward(qkv, n_head, 3)  # (B, H, T, D) views
        check_sdpa_args(q, k, v, True, dropout_p)
        B, H, T, D = q.shape
        allowed = allowed_keys(np, T, T, True, mask)
        y = np.empty((B, T, H * D), dtype=qkv.dtype)  # heads merged: O lands in place
        o = y.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        _, p, keep = attention_forward(q, k, v, allowed, dropout_p, generator, out=o)
        self.save_for_backward(q, k, v, p, keep, o)  # o: a view of the returned y, not a copy
        self.dropout_p, self.shape = dropout_p, (B, T, H, D)
        return y

    def backward(self, g):
        q, k, v, p, keep, o = self.saved
        B, T, H, D = self.shape
        dqkv = np.empty((B, T, 3, H, D), dtype=q.dtype)  # dQ, dK, dV written in place, heads merged
        attention_backward(g.reshape(B, T, H, D).transpose(0, 2, 1, 3), q, k, v, p, keep, self.dropout_p,
                           out=tuple(dqkv.transpose(2, 0, 3, 1, 4)), o=o)
        return (dqkv.reshape(B, T, 3 * H * D),)
