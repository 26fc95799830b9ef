"""Layers: the pieces a GPT is made of. Shapes: B batch, T time, C channels."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

import tensor.functional as F
from nn.attention import causal_attention_qkv, merge_heads, scaled_dot_product_attention, split_heads
from nn.module import Module, Parameter
from nn.rotary import RotaryEmbedding
from tensor.backend import array_module
from tensor.tensor import Function, Tensor, shape_str


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


class Linear(Module):
    """y = x @ W.T + b. x (..., in) -> (..., out); weight (out, in) as in PyTorch.
    Init as PyTorch: U(-1/sqrt(in), 1/sqrt(in))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rng: np.random.Generator | None = None) -> None:
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        r = _rng(rng)
        self.weight = Parameter(r.uniform(-bound, bound, (out_features, in_features)).astype(np.float32, copy=False))
        self.bias = (Parameter(r.uniform(-bound, bound, (out_features,)).astype(np.float32, copy=False))
                     if bias else None)

    compute_dtype: Any = None  # set by nn.amp.autocast_ for mixed precision

    def forward(self, x: Tensor) -> Tensor:
        # mixed precision (compute_dtype set): a low-precision GEMM; the float32 weights stay the
        # master copy and receive float32 gradients
        return F.linear(x, self.weight, self.bias, compute_dtype=self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Rows of a (num, dim) table picked by integer ids (...) -> (..., dim). Init N(0, 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rng: np.random.Generator | None = None) -> None:
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        table = _rng(rng).standard_normal((num_embeddings, embedding_dim))
        self.weight = Parameter(table.astype(np.float32, copy=False))

    def forward(self, ids: Any) -> Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise the last axis (size C) to mean 0, variance 1, then scale and shift."""
    out_dtype: Any = None  # set by nn.amp.autocast_: the output in the compute dtype of the product it feeds

    def __init__(self, ndim: int, eps: float = 1e-5, bias: bool = True) -> None:
        self.ndim, self.eps = ndim, eps
        self.weight = Parameter(np.ones(ndim, dtype=np.float32))
        self.bias = Parameter(np.zeros(ndim, dtype=np.float32)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps, out_dtype=self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.ndim}, eps={self.eps}"


class RMSNormFunction(Function):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich, 2019).
    x (..., C), weight (C,); statistics in float32 for half inputs."""
    # r = 1/sqrt(mean(x^2) + eps), xhat = x*r, dxhat = g*w: dx = r * (dxhat - xhat * mean(dxhat*xhat)), dw = sum(g*xhat)
    def forward(self, x, weight, eps=1e-5):
        if weight.shape != x.shape[-1:]:
            raise ValueError(f"rms_norm: weight of shape {shape_str(weight)} does not match the last axis of x "
                             f"{shape_str(x)} (expected ({x.shape[-1]},))")
        xp = array_module(x)
        x32 = x.astype(np.float32) if x.dtype.itemsize < 4 else x
        r = 1.0 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + eps)
        xhat = x32 * r
        self.save_for_backward(xhat, r, weight)
        return (xhat * weight.astype(xhat.dtype, copy=False)).astype(x.dtype, copy=False)

    def backward(self, g):
        xhat, r, w = self.saved
        g32 = g.astype(xhat.dtype, copy=False)
        dxhat = g32 * w.astype(xhat.dtype, copy=False)
        dx = r * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        dw = (g32 * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
        return dx.astype(g.dtype, copy=False), dw.astype(w.dtype, copy=False)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last axis: x (..., C), weight (C,) -> (..., C)."""
    return RMSNormFunction.apply(x, weight, eps=eps)


class RMSNorm(Module):
    """Scale the last axis (size C) to unit root mean square, then by a weight (no bias, no centring)."""

    def __init__(self, ndim: int, eps: float = 1e-5) -> None:
        self.ndim, self.eps = ndim, eps
        self.weight = Parameter(np.ones(ndim, dtype=np.float32))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.ndim}, eps={self.eps}"


NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, ndim: int, bias: bool = True) -> Module:
    """LayerNorm(ndim, bias=bias) for "layernorm", RMSNorm(ndim) (weight only) for "rmsnorm"."""
    if kind == "layernorm":
        return LayerNorm(ndim, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(ndim)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class Dropout(Module):
    """Inverted dropout with probability p, active in training mode only.
    `generator` (a numpy/CuPy Generator) makes the masks reproducible."""

    def __init__(self, p: float = 0.0, generator: Any = None) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p, self.generator = p, generator

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training, self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GELU(Module):
    """GELU, tanh approximation."""

    def forward(self, x: Tensor) -> Tensor:
        return x.gelu()


class CausalSelfAttention(Module):
    """Multi-head causal self-attention: one fused c_attn (C -> 3C), heads, c_proj (C -> C).

    forward(x (B, T, C), mask=None, cache=None, positions=None) -> (B, T, C); mask (B, T) bool
    marks real (True) vs padding (False) keys, for batches of prompts of different lengths;
    positions (T,) or (B, T) feed the position hook `rotary` (RoPE, nn/rotary.py) when given.
    `generator` (as in Dropout) draws the attention-dropout masks; the trainer sets it,
    like every Dropout's, so that a resumed run draws the same masks.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 rng: np.random.Generator | None = None, generator: Any = None,
                 rotary: RotaryEmbedding | None = None) -> None:
        if n_embd % n_head:
            raise ValueError(f"CausalSelfAttention: n_embd {n_embd} is not divisible by n_head {n_head}")
        self.n_embd, self.n_head, self.dropout, self.generator = n_embd, n_head, dropout, generator
        self.c_attn = Linear(n_embd, 3 * n_embd, bias=bias, rng=rng)
        self.c_proj = Linear(n_embd, n_embd, bias=bias, rng=rng)
        self.resid_dropout = Dropout(dropout)
        self.rotary = rotary

    def forward(self, x: Tensor, mask: Any = None, cache: Any = None, positions: Any = None) -> Tensor:
        """cache: a KVCache for incremental decoding (inference), or None."""
        p = self.dropout if self.training else 0.0
        qkv = self.c_attn(x)                                  # (B, T, 3C)
        if self.rotary is None and cache is None:
            # nothing between split and sdpa: the composition below as one node, fused where it pays
            y = causal_attention_qkv(qkv, self.n_head, mask=mask, dropout_p=p, generator=self.generator)
        else:
            q, k, v = split_heads(qkv, self.n_head)           # (B, H, T, D) each
            if self.rotary is not None:
                q, k = self.rotary(q, k, positions)           # the position hook
            if cache is not None:
                k, v = cache.append(k, v)                     # every key so far: (B, H, L, D)
                mask = None if mask is None else mask[:, :k.shape[2]]
            y = scaled_dot_product_attention(q, k, v, causal=True, mask=mask, dropout_p=p, generator=self.generator)
            y = merge_heads(y)                                # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}"


class MLP(Module):
    """c_fc (C -> 4C), GELU, c_proj (4C -> C), dropout."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True,
                 rng: np.random.Generator | None = None) -> None:
        self.c_fc = Linear(n_embd, 4 * n_embd, bias=bias, rng=rng)
        self.gelu = GELU()
        self.c_proj = Linear(4 * n_embd, n_embd, bias=bias, rng=rng)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if type(self.c_fc) is Linear:  # GELU(c_fc(x)) as one op: on the GPU the GELU rides in the GEMM
            fc = self.c_fc
            h = F.linear_gelu(x, fc.weight, fc.bias, compute_dtype=fc.compute_dtype)
        else:                          # a c_fc replaced (tensor-parallel, int8): its own forward
            h = self.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(Module):
    """Pre-norm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).
    norm: "layernorm" or "rmsnorm" for ln_1 and ln_2; rotary: attention's position hook or None."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 rng: np.random.Generator | None = None, norm: str = "layernorm",
                 rotary: RotaryEmbedding | None = None) -> None:
        self.ln_1 = make_norm(norm, n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, rng, rotary=rotary)
        self.ln_2 = make_norm(norm, n_embd, bias)
        self.mlp = MLP(n_embd, dropout, bias, rng)

    def forward(self, x: Tensor, mask: Any = None, cache: Any = None, positions: Any = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask=mask, cache=cache, positions=positions)
        return x + self.mlp(self.ln_2(x))


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(same); (length, dim) float32."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = np.power(10000.0, -np.arange(0, dim, 2, dtype=np.float64) / dim)
    pe = np.zeros((length, dim), dtype=np.float64)
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq)[:, : dim // 2]
    return pe.astype(np.float32)


class SinusoidalPositionalEncoding(Module):
    """Fixed (not learned) positions of Vaswani et al. §3.5. forward(positions) -> (..., C):
    a constant tensor, rows of the table picked by integer positions (T,) or (B, T).
    Holds a buffer, no parameters."""

    def __init__(self, block_size: int, n_embd: int) -> None:
        self.block_size = block_size
        self.pe = Tensor(sinusoidal_table(block_size, n_embd))

    def forward(self, positions: Any) -> Tensor:
        # (checked on the host only: on the GPU the check would wait for the device every step,
        # and the GPT builds its positions in range; see GPT.forward)
        if type(positions) is np.ndarray and positions.size and int(positions.max()) >= self.block_size:
            raise ValueError(f"SinusoidalPositionalEncoding: position {int(positions.max())} is past "
                             f"block_size {self.block_size}")
        return Tensor.wrap(self.pe.data[positions])
