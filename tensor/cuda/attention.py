"""CUDA fast paths of attention (tensor/attention.py), three of them, chosen in this order:

* decode: at inference, one query row against a KV cache, with or without a padding mask (the
  fused decode kernel, tensor/cuda/decode_attention.py);
* flash: the fused FlashAttention-2-style kernels (tensor/cuda/flash_attention.py) for contiguous
  float16/bfloat16/float32 q, k, v with D in {32, 64, 128}, causal or not, with or without a
  (B, Tk) key-padding mask, no dropout. Memory kept for backward: Q, K, V, O and the row
  log-sum-exp L (B*H*Tq floats); no (Tq, Tk) array is ever formed. Where the cuBLAS path applies
  too, one rule chooses (_use_flash: the head dim, the key count, then the scores' size against SCORES_BUDGET);
* cuBLAS: batched GEMMs in the input dtype (tensor cores for 16 bits, no operand copies:
  tensor/cuda/cublas.py), float32 scores, the fused causal softmax and its backward
  (tensor/cuda/softmax.py), for causal attention without a padding mask, with or without dropout
  (its keep-mask drawn as the reference draws it; the flash kernels have no dropout). Memory kept
  for backward: contiguous Q, K, V, P in the input dtype and, with dropout, the bool keep-mask.

The fused op (qkv in, (B, T, C) out) gives the flash kernels the heads where they lie in the qkv buffer
and its gradient, as strided views: no head permute. The cuBLAS path permutes them, one kernel pass each
way (tensor/cuda/layout.py). Anything else runs the reference on CuPy.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tensor.attention import CausalAttentionQKV, MergeHeads, ScaledDotProductAttention, SplitHeads, check_sdpa_args
from tensor.cuda import cublas, decode_attention, flash_attention
from tensor.cuda.common import empty, usable
from tensor.cuda.layout import merge_heads, split_heads
from tensor.cuda.softmax import causal_softmax, softmax_backward
from tensor.functional import uniform
from tensor.tensor import is_grad_enabled


def _fits(*arrays: Any, mask: Any = None, causal: bool = True) -> bool:
    return mask is None and causal and usable(*arrays) and cublas.usable(*arrays)


def causal_forward(q: Any, k: Any, v: Any, dropout_p: float = 0.0, generator: Any = None) -> tuple:
    """(O, P, keep-mask or None) for q (.., Tq, D), k, v (.., Tk, D) of any strides cuBLAS takes: S = Q K^T in
    float32, P = causal softmax(S / sqrt(D)) in the input dtype, O = dropout(P) V."""
    s = cublas.matmul(q, k.swapaxes(-1, -2), out_dtype=np.float32)
    p = causal_softmax(s, 1.0 / math.sqrt(q.shape[-1]), q.dtype)
    del s
    keep = uniform(generator, p.shape, p) >= dropout_p if dropout_p > 0.0 else None
    pd = p if keep is None else (p.astype(np.float32) * (keep * np.float32(1.0 / (1.0 - dropout_p)))).astype(p.dtype)
    return cublas.matmul(pd, v), p, keep


def causal_backward(g: Any, q: Any, k: Any, v: Any, p: Any, keep: Any = None, dropout_p: float = 0.0,
                    out: tuple = (None, None, None)) -> tuple:
    """(dQ, dK, dV), each written into `out` where given: dP = g V^T (float32, times the dropout
    mask), dS by the fused softmax backward, then three GEMMs."""
    dp = cublas.matmul(g, v.swapaxes(-1, -2), out_dtype=np.float32)
    pd = p
    if keep is not None:
        drop = keep * np.float32(1.0 / (1.0 - dropout_p))
        dp *= drop
        pd = (p.astype(np.float32) * drop).astype(p.dtype)  # (16-bit arithmetic in float32: astype only)
    ds = softmax_backward(p, dp, 1.0 / math.sqrt(q.shape[-1]))
    del dp
    dq, dk, dv = out
    return (cublas.matmul(ds, k, out=dq), cublas.matmul(ds.swapaxes(-1, -2), q, out=dk),
            cublas.matmul(pd.swapaxes(-1, -2), g, out=dv))


class CudaSplitHeads(SplitHeads):
    """(B, T, parts*C) -> (parts, B, H, T, D) contiguous in one kernel pass; backward: one merge pass."""

    @staticmethod
    def supports(x: Any, *arrays: Any, **kwargs: Any) -> bool:
        return usable(x)

    def forward(self, x, n_head=1, parts=3):
        super().forward(x, n_head, parts)  # the shape check
        return split_heads(x, n_head, parts)

    def backward(self, g):
        return (merge_heads(g) if usable(g) else super().backward(g)[0],)


class CudaMergeHeads(MergeHeads):
    """(B, H, T, D) -> (B, T, H*D) in one kernel pass; backward: one split pass."""

    @staticmethod
    def supports(x: Any, *arrays: Any, **kwargs: Any) -> bool:
        return usable(x) and x.ndim == 4

    def forward(self, x):
        self.n_head = x.shape[1]
        return merge_heads(x[None])

    def backward(self, g):
        return (split_heads(g, self.n_head, 1)[0] if usable(g) else super().backward(g)[0],)


def _head_views(x: Any, n_head: int, parts: int) -> tuple:
    """x (B, T, parts*C) -> `parts` (B, H, T, D) views of it (D = C / n_head), no copy: the layout split_heads
    copies into, as strides (what the flash kernels address)."""
    B, T, C3 = x.shape
    return tuple(x.reshape(B, T, parts, n_head, C3 // (parts * n_head)).transpose(2, 0, 3, 1, 4))


def _grad_like(g: Any, q: Any) -> Any:
    """The incoming gradient in q's dtype, C-contiguous (what the kernels read)."""
    if g.dtype != q.dtype:
        g = g.astype(q.dtype)
    return g if g.flags.c_contiguous else g.copy()


def _flash_qkv(qkv: Any, n_head: Any, mask: Any, dropout_p: float) -> bool:
    """Whether the flash kernels take the heads of this contiguous qkv (B, T, 3C) where they lie
    (flash_attention.fits on its head views): D = C / n_head in their head sizes, mask None or bool (B, T),
    no dropout."""
    if n_head is None or qkv.ndim != 3 or qkv.shape[2] % (3 * n_head) or qkv.shape[1] == 0 or not usable(qkv):
        return False
    return flash_attention.fits(*_head_views(qkv, n_head, 3), mask=mask, causal=True, dropout_p=dropout_p)


# The one choice between the two training paths where both apply (causal, no padding mask, no
# dropout, a dtype and head size the flash kernels take). Measured on an H200 (bf16, forward + backward,
# B*T = 16k tokens, `benchmarks/bench_attention_gpu.py --reps 5 --T 256 512 1024 2048 4096`, 2026-12-03,
# benchmarks/RESULTS.md): flash / cuBLAS time 0.66 / 0.60 / 0.43 / 0.28 / 0.26 at D 64 and 1.14 / 1.02 / 0.81 /
# 0.54 / 0.51 at D 128; the cuBLAS path also holds the (B, H, Tq, Tk) float32 scores and P (7.5 GiB at B=4
# H=12 T=4096 against flash's 144 MiB). So: flash for head dims up to FLASH_HEAD_DIM, and above it from
# FLASH_KEYS keys on; below that, cuBLAS while its float32 scores stay within SCORES_BUDGET bytes and flash
# beyond (and flash wherever cuBLAS does not apply: a padding mask, causal=False). Tests set SCORES_BUDGET = 0
# for flash wherever it fits; revisit all three with each benchmark run.
FLASH_HEAD_DIM = 64
FLASH_KEYS = 1024
SCORES_BUDGET = 1 << 30


def _use_flash(q: Any, k: Any, v: Any, mask: Any, causal: bool, dropout_p: float) -> bool:
    """The flash kernels, by the rule above, for heads q (B, H, Tq, D), k, v (B, H, Tk, D)."""
    if not flash_attention.fits(q, k, v, mask, causal, dropout_p):
        return False
    if mask is not None or not causal or not cublas.usable(q, k, v):
        return True
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    return D <= FLASH_HEAD_DIM or Tk >= FLASH_KEYS or B * H * Tq * Tk * 4 > SCORES_BUDGET


def _decoding(q: Any, k: Any, v: Any, mask: Any, dropout_p: float) -> bool:
    """One query row per (batch, head) at inference: the fused decode kernel (tensor/cuda/decode_attention.py)."""
    return not is_grad_enabled() and decode_attention.fits(q, k, v, mask, dropout_p)


class CudaScaledDotProductAttention(ScaledDotProductAttention):
    """At inference, one query row (a decoding step) against a KV cache by the fused decode-attention
    kernel; else the flash kernels where they fit (padding mask and causal=False included); else
    causal attention by cuBLAS and the fused softmax kernels (no padding mask; dropout)."""

    @staticmethod
    def supports(q: Any, k: Any = None, v: Any = None, mask: Any = None, causal: bool = True,
                 dropout_p: float = 0.0, **kwargs: Any) -> bool:
        if _decoding(q, k, v, mask, dropout_p) or flash_attention.fits(q, k, v, mask, causal, dropout_p):
            return True
        # strided q, k, v too (cuBLAS takes them as they are): a decoding step's views of the KV cache;
        # one dtype (a float32 cache under bf16 queries takes the reference, which promotes)
        return (mask is None and causal and q.dtype == k.dtype == v.dtype and usable(q, k, v, contiguous=False)
                and cublas.usable(q, k, v))

    def forward(self, q, k, v, mask=None, causal=True, dropout_p=0.0, generator=None):
        check_sdpa_args(q, k, v, causal, dropout_p)
        if _decoding(q, k, v, mask, dropout_p):  # nothing saved: no backward at inference
            return decode_attention.decode_attention(q, k, v, mask)
        self.flash = _use_flash(q, k, v, mask, causal, dropout_p)
        if self.flash:
            o, lse = flash_attention.forward(q, k, v, mask, causal)
            self.save_for_backward(q, k, v, o, lse)
            self.mask, self.causal = mask, causal
            return o
        o, p, keep = causal_forward(q, k, v, dropout_p, generator)
        self.save_for_backward(q, k, v, p, keep)
        self.dropout_p = dropout_p
        return o

    def backward(self, g):
        g = _grad_like(g, self.saved[0])
        if self.flash:
            q, k, v, o, lse = self.saved
            return flash_attention.backward(g, q, k, v, o, lse, self.mask, self.causal)
        q, k, v, p, keep = self.saved
        return causal_backward(g, q, k, v, p, keep, self.dropout_p)


class CudaCausalAttentionQKV(CausalAttentionQKV):
    """The fused composition. Flash: the kernels read q, k, v inside qkv and write O into the (B, T, C)
    output, dQ, dK, dV into d(qkv) (strided head views, no copies). cuBLAS: one split pass makes every
    head contiguous for its strided batches, one merge pass writes the output; backward: g split in one
    pass, dQ, dK, dV land in one buffer, merged into d(qkv) in one pass. A padding mask needs the flash
    kernels (and n_head passed to supports, to know D)."""

    @staticmethod
    def supports(qkv: Any, mask: Any = None, n_head: Any = None, dropout_p: float = 0.0, **kwargs: Any) -> bool:
        return _fits(qkv, mask=mask) or _flash_qkv(qkv, n_head, mask, dropout_p)

    def forward(self, qkv, n_head=1, mask=None, dropout_p=0.0, generator=None):
        B, T, C3 = qkv.shape
        if C3 % (3 * n_head):
            raise ValueError(f"attention: qkv of shape {qkv.shape} does not split into 3 x {n_head} heads")
        q, k, v = _head_views(qkv, n_head, 3)  # (B, H, T, D) views of qkv: no copy
        self.n_head, self.dropout_p = n_head, dropout_p
        self.flash = _use_flash(q, k, v, mask, True, dropout_p)
        if self.flash:  # the kernels read the heads in qkv and write O's heads into (B, T, C) directly
            out = empty((B, T, C3 // 3), qkv.dtype)
            o, lse = flash_attention.forward(q, k, v, mask, True, out=_head_views(out, n_head, 1)[0])
            self.save_for_backward(q, k, v, o, lse)
            self.mask = mask
            return out
        heads = split_heads(qkv, n_head, 3)  # (3, B, H, T, D) contiguous, for cuBLAS's strided batches
        q, k, v = heads[0], heads[1], heads[2]
        o, p, keep = causal_forward(q, k, v, dropout_p, generator)
        self.save_for_backward(q, k, v, p, keep)
        return merge_heads(o[None])

    def backward(self, g):
        q = self.saved[0]
        g = _grad_like(g, q)
        if self.flash:  # dO read, and dQ, dK, dV written, where they lie in (B, T, C) and (B, T, 3C)
            _, k, v, o, lse = self.saved
            B, H, T, D = q.shape
            dqkv = empty((B, T, 3 * H * D), q.dtype)
            flash_attention.backward(_head_views(g, H, 1)[0], q, k, v, o, lse, self.mask, True,
                                     out=_head_views(dqkv, H, 3))
            return (dqkv,)
        gh = split_heads(g, self.n_head, 1)[0]
        d3 = empty((3,) + q.shape, q.dtype)
        _, k, v, p, keep = self.saved
        causal_backward(gh, q, k, v, p, keep, self.dropout_p, out=(d3[0], d3[1], d3[2]))
        return (merge_heads(d3),)
