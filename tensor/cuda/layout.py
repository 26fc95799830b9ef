"""Layouts on the GPU, one pass each: attention's head split/merge and a Linear's bias add.

    split_heads(x, n_head, parts)   (B, T, parts*C) -> (parts, B, H, T, D)
    merge_heads(x)                  (parts, B, H, T, D) -> (B, T, parts*H*D)
    bias_add(y, b)                  y (..., C) += b (C,) in float, whatever the two dtypes
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import CTYPE, FLOATS, cupy, empty, threads

LAYOUT = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// Attention's head layouts. A row is one head's D contiguous values at one position, contiguous
// on both sides; threadIdx.x walks a row, threadIdx.y picks the row (index arithmetic once per row).
// Row r = ((s*B + b)*H + h)*T + t of the head-major layout (S, B, H, T, D) is row
// ((b*T + t)*S + s)*H + h of the token-major layout (B, T, S, H, D) (S = 3 for a fused qkv, 1 for a
// gradient). merge = 0: x token-major -> y head-major (split); merge = 1: the reverse.
template <typename T>
__global__ void heads_permute(const T* x, T* y, int rows, int B, int Tn, int S, int H, int D, int merge) {
    int r = blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= rows) return;
    int t = r % Tn, q = r / Tn;
    int h = q % H; q /= H;
    int b = q % B, s = q / B;
    long long tok = (((long long)b * Tn + t) * S + s) * H + h;
    const T* src = x + (merge ? (long long)r : tok) * D;
    T* dst = y + (merge ? tok : (long long)r) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
}
// y (rows, C) += b (C,), in float: the bias of a Linear, whatever the two dtypes; a block per row
template <typename Y, typename Bt>
__global__ void bias_add_rows(Y* y, const Bt* b, int C) {
    Y* yr = y + (long long)blockIdx.x * C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) yr[j] = (Y)((float)yr[j] + (float)b[j]);
}
"""


@functools.lru_cache(maxsize=None)
def _layout_module() -> Any:
    names = []
    for t in FLOATS:
        names.append(f"heads_permute<{CTYPE[t]}>")
        names += [f"bias_add_rows<{CTYPE[t]},{CTYPE[b]}>" for b in FLOATS]
    return cupy().RawModule(code=LAYOUT, options=("--std=c++14",), name_expressions=names)


@functools.lru_cache(maxsize=None)
def _layout_kernel(name: str) -> Any:
    return _layout_module().get_function(name)


def bias_add(y: Any, b: Any) -> None:
    """In place: y (..., C) contiguous += b (C,), computed in float, any float dtypes."""
    t = f"{CTYPE[backend.dtype_name(y.dtype)]},{CTYPE[backend.dtype_name(b.dtype)]}"
    C = b.size
    _layout_kernel(f"bias_add_rows<{t}>")((y.size // C,), (threads(min(C, 256)),), (y, b, np.int32(C)))


def _heads_permute(x: Any, y: Any, B: int, T: int, S: int, H: int, D: int, merge: bool) -> Any:
    rows = S * B * H * T  # 32 threads along a row, 8 rows per block
    _layout_kernel(f"heads_permute<{CTYPE[backend.dtype_name(x.dtype)]}>")(
        ((rows + 7) // 8,), (min(32, max(D, 1)), 8),
        (x, y, np.int32(rows), np.int32(B), np.int32(T), np.int32(S), np.int32(H), np.int32(D), np.int32(merge)))
    return y


def split_heads(x: Any, n_head: int, parts: int) -> Any:
    """x (B, T, parts*C) contiguous -> (parts, B, H, T, D) contiguous, D = C / n_head, one pass."""
    B, T, C3 = x.shape
    D = C3 // (parts * n_head)
    return _heads_permute(x, empty((parts, B, n_head, T, D), x.dtype), B, T, parts, n_head, D, merge=False)


def merge_heads(x: Any) -> Any:
    """x (parts, B, H, T, D) contiguous -> (B, T, parts*H*D), one pass (the inverse of split_heads)."""
    S, B, H, T, D = x.shape
    return _heads_permute(x, empty((B, T, S * H * D), x.dtype), B, T, S, H, D, merge=True)
