"""The CPU decoding step: one new token per row through the GPT, in plain NumPy calls on a workspace.

    dec = cpu_decoder(model, caches, pads)     # None where it does not apply (then: model(...))
    logits = dec.step(tokens, positions)       # tokens, positions (B,) -> logits (B, V)

`tinygrad_lm.sample.stream` prefills the prompt with the model's own forward (into `caches`, the
model's KVCaches), then feeds every further token through `step`. The step computes exactly what
`GPT.forward(tokens[:, None], mask, positions, caches)` computes (tests/test_decode_cpu.py checks the
logits to float32 round-off and the greedy tokens for equality), but at one token a step that
forward is mostly Python: ~100 ops a token, each building Tensors, asking the dispatch, checking
shapes and allocating its output, around GEMVs of a few microseconds. Here, per layer:

  * no Tensors, no dispatch, no checks: the weights are read once from the modules (`_Layer`);
  * every activation lives in a buffer preallocated for this generation (`x`, `h`, `qkv`, ...), and
    every product writes its output in place (`np.matmul(..., out=)`), so a step allocates almost
    nothing (a few (B, H) softmax statistics);
  * the new key and value go into the cache with ONE copy: the KVCache keeps k and v in one buffer
    (nn/attention.py), and q|k|v of the fused c_attn product are in the same order;
  * the key-padding mask of left-padded prompts is turned once into a 0/-inf bias over the cache
    columns (the decoded tokens are always real keys), added to the scores: no masking pass;
  * LayerNorm's means are GEMVs with a (C, 1) column of 1/C (one BLAS call instead of a reduction);
  * GELU runs in place on the c_fc output (one temporary buffer, reused), as a / (1 + exp(-2u)):
    the tanh form's value with fewer passes (`gelu`);
  * the attention's scores go into one buffer preallocated for the generation, read and written
    only over the filled part of the cache (tensor/cpu/attention.py: decode_attention);
  * with many rows and a long cache the attention is a stream over the whole cache (~75 MB a token
    at batch 32, length 128, for the 6-layer 384-wide model) that one core reads at ~7 GB/s: then
    the batch is split in two halves, the second on a worker thread (NumPy's matmul releases the
    GIL), where two cores are ours (`CPUDecoder.attention`), from rows x cache length 1024 on; it
    pays once OpenBLAS's idle workers no longer spin on the core that thread needs
    (backend.tune_blas_wait, which `python -m tinygrad_lm sample` calls; measured on Intel in
    RESULTS.md with benchmarks/bench_decode_cpu_threads.py);
  * OpenBLAS runs the small calls (a head's scores and output over the cache, the norms' means) on
    one thread and only the weight products on all (`step`, backend.BlasThreads): it splits any
    product of ~9,000 multiply-adds over its threads, and a worker's wake-up costs more than a
    64 x 256 score row.

The products: one row (batch 1) as x @ W.T (OpenBLAS's GEMV); more rows as W @ x.T into a
transposed buffer, copied back (tensor/cpu/reductions.py: gemm; OpenBLAS is faster in that order for
2..32 rows). int8 weights (nn/quant.py) are converted into one reusable float buffer before their
product and the scale applied after it, as tensor/cpu/quant.py does.

What it does not handle, `cpu_decoder` says None for, and the model's forward runs instead: arrays
on the GPU, fast paths switched off (TINYGRAD_LM_FAST=0, `reference_only()`), mixed precision
(compute_dtype), 16-bit weights, and modules it does not know.
"""
from __future__ import annotations

import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from nn.layers import LayerNorm, Linear, RMSNorm
from nn.quant import QuantizedEmbedding, QuantizedLinear
from nn.rotary import rotate
from tensor.backend import BlasThreads
from tensor.cpu.attention import decode_attention
from tensor.dispatch import fast_paths_enabled
from tensor.ops.elementwise import GELU_K

SPLIT_ROWS_X_LENGTH = 1024  # batch rows x cache length from which the attention runs on two threads


def _two_cores() -> bool:
    """Two cores are ours: the affinity allows two, and no thread count of 1 was asked for."""
    if any(os.environ.get(k) == "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")):
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= 2


def product(x: np.ndarray, w: np.ndarray, out: np.ndarray, spare: np.ndarray) -> None:
    """out (B, out) = x (B, in) @ w.T for w (out, in); spare: a buffer of at least out*B elements
    (the transposed product for B > 1). benchmarks/bench_sample.py replaces this to time the rest."""
    if x.shape[0] == 1:
        np.matmul(x, w.T, out=out)
    else:
        t = spare[:w.shape[0] * x.shape[0]].reshape(w.shape[0], x.shape[0])
        np.matmul(w, x.T, out=t)
        out[...] = t.T


class _Linear:
    """One Linear's weight (out, in) float, or int8 with its scales, and its bias, as arrays; rows:
    only the first rows outputs (the head of a padded vocabulary), else all."""

    def __init__(self, layer: Any, rows: int | None = None) -> None:
        keep = slice(rows)
        self.w = layer.weight.data[keep]
        self.scale = layer.weight_scale.data[keep] if isinstance(layer, QuantizedLinear) else None
        self.bias = None if layer.bias is None else layer.bias.data[keep]
        self.out_features = self.w.shape[0]


class _Norm:
    """A LayerNorm (weight, bias or None) or an RMSNorm (weight only, rms=True), as arrays."""

    def __init__(self, layer: Any) -> None:
        self.rms = isinstance(layer, RMSNorm)
        self.weight = layer.weight.data
        self.bias = None if self.rms or layer.bias is None else layer.bias.data
        self.eps = layer.eps


class _Layer:
    """One Block's weights: ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj; rotary tables or None."""

    def __init__(self, block: Any) -> None:
        self.ln_1, self.ln_2 = _Norm(block.ln_1), _Norm(block.ln_2)
        self.c_attn, self.attn_proj = _Linear(block.attn.c_attn), _Linear(block.attn.c_proj)
        self.c_fc, self.mlp_proj = _Linear(block.mlp.c_fc), _Linear(block.mlp.c_proj)
        rot = block.attn.rotary
        self.rotary = None if rot is None else (rot.cos.data, rot.sin.data)


def refusal(model: Any) -> str | None:
    """Why the CPU decoding step cannot run this model, or None when it can."""
    if not fast_paths_enabled():
        return "fast paths are off (TINYGRAD_LM_FAST=0 or reference_only())"
    tr = model.transformer
    if type(tr.wte.weight.data) is not np.ndarray:
        return "the model is not on the CPU"
    dtype = tr.ln_f.weight.data.dtype
    if dtype not in (np.float32, np.float64):
        return f"{dtype} weights (the step runs in float32 or float64)"
    for block in tr.h:
        for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            if type(lin) not in (Linear, QuantizedLinear) or getattr(lin, "compute_dtype", None) is not None:
                return f"a {type(lin).__name__} with compute_dtype {getattr(lin, 'compute_dtype', None)}"
        for norm in (block.ln_1, block.ln_2):
            if type(norm) not in (LayerNorm, RMSNorm):
                return f"a {type(norm).__name__} norm"
    if type(tr.ln_f) not in (LayerNorm, RMSNorm) or type(model.lm_head) not in (Linear, QuantizedLinear):
        return "an unknown final norm or lm_head"
    return None


def cpu_decoder(model: Any, caches: list, pads: np.ndarray) -> "CPUDecoder | None":
    """The CPU decoding step for `model` over `caches` (model.new_caches(B)) and left-padded
    prompts with pads (B,) padding tokens, or None where it does not apply (`refusal`)."""
    return None if refusal(model) is not None else CPUDecoder(model, caches, pads)


class CPUDecoder:
    """`step(tokens, positions)`: one token per row -> logits (B, V), appended to the caches.

    model: a GPT in eval mode; caches: its KVCaches (B rows), filled by the prefill; pads (B,): the
    left padding of each prompt (those cache columns are never attended to). The returned logits
    are a workspace buffer, overwritten by the next step."""

    def __init__(self, model: Any, caches: list, pads: np.ndarray) -> None:
        cfg, tr = model.config, model.transformer
        B, C = caches[0].k.shape[0], cfg.n_embd
        self.model, self.caches, self.cfg = model, caches, cfg
        self.dtype = dt = tr.ln_f.weight.data.dtype
        self.H, self.D = cfg.n_head, C // cfg.n_head
        self.layers = [_Layer(b) for b in tr.h]
        # the head's rows past the vocabulary are padding (pad_vocab_to): never computed
        self.ln_f, self.head = _Norm(tr.ln_f), _Linear(model.lm_head, rows=cfg.vocab_size)
        wte = tr.wte
        self.wte = wte.weight.data
        self.wte_scale = wte.weight_scale.data if isinstance(wte, QuantizedEmbedding) else None
        self.wpe = tr.wpe.weight.data if cfg.pos_encoding == "learned" else None
        self.pe = model.pos.pe.data if cfg.pos_encoding == "sinusoidal" else None
        # the workspace: every activation of a step, in place
        self.x, self.h, self.y, self.proj = (np.empty((B, C), dt) for _ in range(4))
        self.qkv = np.empty((B, 3 * C), dt)
        self.fc, self.tmp = np.empty((B, 4 * C), dt), np.empty((B, 4 * C), dt)
        self.logits = np.empty((B, cfg.vocab_size), dt)
        self.stat = np.empty((B, 1), dt)
        self.inv_c = np.full((C, 1), 1.0 / C, dt)   # x @ inv_c: the row means, as one GEMV
        linears = [m for layer in self.layers for m in (layer.c_attn, layer.attn_proj, layer.c_fc, layer.mlp_proj)]
        linears.append(self.head)
        self.spare = np.empty(max(lin.out_features for lin in linears) * B, dt)
        int8 = [lin.w.size for lin in linears if lin.scale is not None]
        self.wbuf = np.empty(max(int8), dt) if int8 else None  # int8 weights, converted per product
        max_len = caches[0].k.shape[2]
        self.scores = np.empty((B, self.H, 1, max_len), dt)  # one query's scores per head, then P
        # a worker thread for the second half of the batch's attention (shut down with the decoder)
        self.pool = ThreadPoolExecutor(max_workers=1) if B > 1 and B * max_len >= SPLIT_ROWS_X_LENGTH \
            and _two_cores() else None
        if self.pool is not None:
            weakref.finalize(self, self.pool.shutdown, wait=False)
        self.blas, self.wide = BlasThreads.find(), 0   # wide: the products' BLAS threads during a step
        self.bias = None  # 0 for real keys, -inf for the padding columns: (B, 1, 1, max_len)
        if pads.any():
            cols = np.arange(max_len)
            self.bias = np.where(cols[None, :] >= pads[:, None], 0.0, -np.inf).astype(dt)[:, None, None, :]

    # ---------------------------------------------------------------- the pieces
    def linear(self, lin: _Linear, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = x @ W.T + b (W dequantized: (x @ q.T) * s + b)."""
        w = lin.w
        if lin.scale is not None:
            w = self.wbuf[:w.size].reshape(w.shape)
            np.copyto(w, lin.w)  # int8 -> float, into the reused buffer
        if self.wide:   # the products on every BLAS thread, the small calls between them on one (`step`)
            self.blas.set(self.wide)
        product(x, w, out, self.spare)
        if self.wide:
            self.blas.set(1)
        if lin.scale is not None:
            out *= lin.scale
        if lin.bias is not None:
            out += lin.bias
        return out

    def norm(self, n: _Norm, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """LayerNorm (x - mean) / sqrt(var + eps) * w + b, or RMSNorm x / sqrt(mean(x^2) + eps) * w, per row."""
        s = self.stat
        if n.rms:
            np.multiply(x, x, out=out)
            np.matmul(out, self.inv_c, out=s)            # mean(x^2)
            np.copyto(out, x)
        else:
            np.matmul(x, self.inv_c, out=s)              # mean
            np.subtract(x, s, out=out)                   # xc
            sq = self.tmp.reshape(-1)[:out.size].reshape(out.shape)
            np.multiply(out, out, out=sq)
            np.matmul(sq, self.inv_c, out=s)             # var
        s += n.eps
        np.sqrt(s, out=s)
        out /= s
        out *= n.weight
        if n.bias is not None:
            out += n.bias
        return out

    def gelu(self, a: np.ndarray) -> None:
        """a <- 0.5 a (1 + tanh(u)), u = k (a + 0.044715 a^3), in place, as a / (1 + exp(-2u))
        (the same function: 1 + tanh(u) = 2 / (1 + exp(-2u))); self.tmp holds exp(-2u). Six passes
        and an exp instead of eight and a tanh (measured ~1.3x at batch 32); exp(-2u) overflows to
        inf for a < ~-10, where a / inf = -0, as GELU's 0 there."""
        t = self.tmp[:a.shape[0]]
        np.multiply(a, a, out=t)
        t *= -2.0 * 0.044715 * GELU_K
        t += -2.0 * GELU_K
        t *= a                                   # -2u
        with np.errstate(over="ignore"):
            np.exp(t, out=t)
        t += 1.0
        a /= t

    def embed(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x (B, C) = the token rows (x sqrt(C) + sinusoid, or + learned row, or as they are for rope)."""
        x = self.x
        if self.wte_scale is None:
            np.take(self.wte, tokens, axis=0, out=x)
        else:  # int8 rows times their scales
            np.multiply(self.wte[tokens], self.wte_scale[tokens][:, None], out=x)
        if self.pe is not None:
            x *= math.sqrt(self.cfg.n_embd)
            x += self.pe[positions]
        elif self.wpe is not None:
            x += self.wpe[positions]
        return x

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, bias: Any,
                  scores: np.ndarray) -> None:
        """out = softmax(q K^T / sqrt(D) + bias) V over the filled cache; q (B, H, 1, D), k, v (B, H, L, D);
        rows [h:] on the worker thread when the batch x length is large enough (`SPLIT_ROWS_X_LENGTH`)."""
        def rows(r: slice) -> None:
            decode_attention(q[r], k[r], v[r], out[r], bias=None if bias is None else bias[r], scores=scores[r])

        B, L = q.shape[0], k.shape[2]
        if self.pool is None or B * L < SPLIT_ROWS_X_LENGTH:
            rows(slice(None))
            return
        rest = self.pool.submit(rows, slice(B // 2, None))
        rows(slice(B // 2))
        rest.result()

    # ---------------------------------------------------------------- the step
    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """tokens, positions (B,) ints (the new token of each row and its position) -> logits (B, V).

        OpenBLAS runs the step's small calls (a head's scores and output, the norms' means) on one
        thread and only the weight products (`linear`) on all of them; its count is restored after."""
        n = self.blas.get() if self.blas is not None else 1
        if n == 1:
            return self._step(tokens, positions)
        self.wide = n
        self.blas.set(1)
        try:
            return self._step(tokens, positions)
        finally:
            self.wide = 0
            self.blas.set(n)

    def _step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        B, H, D = self.x.shape[0], self.H, self.D
        x = self.embed(tokens, positions)
        L = self.caches[0].length
        for layer, cache in zip(self.layers, self.caches):
            if L + 1 > cache.k.shape[2]:
                raise ValueError(f"CPUDecoder: {L + 1} positions exceed the cache size {cache.k.shape[2]}")
            qkv = self.linear(layer.c_attn, self.norm(layer.ln_1, x, self.h), self.qkv).reshape(B, 3, H, D)
            if layer.rotary is not None:  # q and k rotated by their position's angles
                cos, sin = (t[positions][:, None, None, :] for t in layer.rotary)
                qkv[:, :2] = rotate(qkv[:, :2], cos.astype(self.dtype, copy=False), sin.astype(self.dtype, copy=False))
            cache.kv[:, :, :, L] = qkv[:, 1:].swapaxes(0, 1)   # k and v into the cache: one copy
            cache.length = L + 1
            bias = None if self.bias is None else self.bias[..., :L + 1]
            self.attention(qkv[:, 0, :, None, :], cache.k[:, :, :L + 1], cache.v[:, :, :L + 1],
                           self.y.reshape(B, H, 1, D), bias, self.scores[..., :L + 1])
            x += self.linear(layer.attn_proj, self.y, self.proj)
            fc = self.linear(layer.c_fc, self.norm(layer.ln_2, x, self.h), self.fc)
            self.gelu(fc)
            x += self.linear(layer.mlp_proj, fc, self.proj)
        return self.linear(self.head, self.norm(self.ln_f, x, self.h), self.logits)
