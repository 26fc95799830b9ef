"""Rotary position embedding (RoPE; Su et al., RoFormer, 2021), the rotate-half convention of
GPT-NeoX and Hugging Face's Llama: channel i of a head is paired with channel i + D/2 (not with
its neighbour i + 1, as in RoFormer's and Meta's interleaved layout), and the pair at position m
is rotated by the angle m * theta_i, theta_i = base^(-2i/D), i < D/2:

    (x1, x2) = (x[..., :D/2], x[..., D/2:])
    rope(x, m) = (x1 cos(m theta) - x2 sin(m theta),  x2 cos(m theta) + x1 sin(m theta))

(= x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) and the angles repeated for
both halves.) Applied to q and k after the heads are split, so q_m . k_n = q . R((n - m) theta) k
depends on the two positions only through n - m (tests/test_rope_rmsnorm.py checks it); no parameters.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from nn.module import Module
from tensor.backend import array_module
from tensor.tensor import Function, Tensor, shape_str


def rotary_tables(length: int, dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos(m theta), sin(m theta) for positions m < length, each (length, dim/2) float32 (computed in float64)."""
    if dim % 2:
        raise ValueError(f"rotary: the head dimension must be even, got {dim}")
    theta = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)     # (dim/2,)
    angle = np.arange(length, dtype=np.float64)[:, None] * theta[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rotate(x: Any, cos: Any, sin: Any) -> Any:
    """(x1 cos - x2 sin, x2 cos + x1 sin) for the halves x1, x2 of x's last axis (a new array)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    y = array_module(x).empty_like(x)
    y1, y2 = y[..., :h], y[..., h:]
    y1[...] = x1 * cos
    y1 -= x2 * sin
    y2[...] = x2 * cos
    y2 += x1 * sin
    return y


class Rotary(Function):
    """x (..., T, D) -> each pair (x1, x2) = (x[..., i], x[..., i + D/2]) rotated by its angle;
    cos, sin (..., T, D/2) broadcastable against either half of x (not differentiated)."""
    # y = R x with R a rotation: dx = R^T g, the rotation by minus the angle (sin -> -sin)
    def forward(self, x, cos, sin):
        if x.shape[-1] % 2 or 2 * cos.shape[-1] != x.shape[-1]:
            raise ValueError(f"rotary: x {shape_str(x)} needs an even last axis, twice that of the tables "
                             f"{shape_str(cos)}")
        cos, sin = cos.astype(x.dtype, copy=False), sin.astype(x.dtype, copy=False)
        self.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    def backward(self, g):
        cos, sin = self.saved
        return rotate(g, cos, -sin), None, None


def apply_rotary(x: Tensor, cos: Any, sin: Any) -> Tensor:
    """Rotate x (B, H, T, D) by tables cos, sin of shape (T, D/2), or (B, T, D/2) for per-row positions."""
    if getattr(cos, "ndim", 0) == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2): the same angles for every head
    return Rotary.apply(x, cos, sin)


class RotaryEmbedding(Module):
    """The position hook of attention: forward(q, k, positions) -> (q, k) rotated, q and k
    (B, H, T, D), positions (T,) or (B, T) ints below max_len (default 0..T-1).
    Holds the cos/sin tables (max_len, D/2) as buffers; no parameters."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        self.head_dim, self.max_len, self.base = head_dim, max_len, base
        cos, sin = rotary_tables(max_len, head_dim, base)
        self.cos, self.sin = Tensor(cos), Tensor(sin)

    def forward(self, q: Tensor, k: Tensor, positions: Any = None) -> tuple[Tensor, Tensor]:
        xp = array_module(self.cos.data)
        if positions is None:
            positions = xp.arange(q.shape[-2])
        # (checked on the host only: on the GPU the check would wait for the device)
        host = type(positions) is np.ndarray and positions.size
        if host and (positions.min() < 0 or positions.max() >= self.max_len):
            raise ValueError(f"RotaryEmbedding: positions must lie in [0, {self.max_len}), got values in "
                             f"[{positions.min()}, {positions.max()}]")
        cos, sin = self.cos.data[positions], self.sin.data[positions]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_len={self.max_len}, base={self.base:g}"
