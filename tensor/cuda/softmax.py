"""Attention's softmax on the GPU: the causal softmax of raw scores and its backward.

    causal_softmax(s, scale, out_dtype)   p = softmax(scale * s) over the keys each query may see
    softmax_backward(p, dp, scale)        ds = scale * p * (dp - rowsum(dp * p))

The same formulas as the reference softmax (tensor/functional.py: Softmax, its backward comment).
Rows of at most 1024 keys take a warp per row (the row in registers, warp shuffles); longer rows a
thread block per row (tensor/cuda/rows.py). Sums and maxima in float32.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import CTYPE, FLOATS, cupy, empty, threads
from tensor.cuda.rows import row_module

SOFTMAX_KERNELS = r"""
// causal softmax of scores s (rows of Tk; row r is query r % Tq at position r % Tq + Tk - Tq):
// p_j = exp(scale*s_j - max) / sum over allowed keys; masked keys get 0
template <typename S, typename P>
__global__ void causal_softmax(const S* s, P* p, int Tq, int Tk, float scale) {
    __shared__ float sh[32];
    long long off = (long long)blockIdx.x * Tk;
    int last = (int)(blockIdx.x % Tq) + Tk - Tq;  // the last key this query may see
    float m = -__int_as_float(0x7f800000);  // -inf
    for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, scale * (float)s[off + j]);
    m = block_max(m, sh);
    float z = 0;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) z += __expf(scale * (float)s[off + j] - m);
    z = block_sum(z, sh);
    float inv = 1.0f / z;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        p[off + j] = (P)(j <= last ? __expf(scale * (float)s[off + j] - m) * inv : 0.0f);
}

// softmax backward: ds_j = scale * p_j * (dp_j - sum_k dp_k p_k)   (ds in p's type; dp may be wider)
template <typename P, typename G>
__global__ void softmax_bwd(const P* p, const G* dp, P* ds, int Tk, float scale) {
    __shared__ float sh[32];
    long long off = (long long)blockIdx.x * Tk;
    float s = 0;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) s += (float)p[off + j] * (float)dp[off + j];
    s = block_sum(s, sh);
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        ds[off + j] = (P)(scale * (float)p[off + j] * ((float)dp[off + j] - s));
}
"""


WARP_ROWS = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// Row kernels with one warp per row, for rows of at most 32*N elements: lane l holds elements
// l, l+32, ..., l+32(N-1) in registers, so each row is read once and reduced with warp shuffles
// (the block-per-row kernels above re-read the row and synchronise the block).
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}
// causal softmax, as causal_softmax above (row r is query r % Tq at position r % Tq + Tk - Tq)
template <typename S, typename P, int N>
__global__ void causal_softmax_warp(const S* s, P* p, long long rows, int Tq, int Tk, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const S* sr = s + row * Tk;
    P* pr = p + row * Tk;
    int last = (int)(row % Tq) + Tk - Tq;
    float v[N];
    float m = -__int_as_float(0x7f800000);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        v[i] = (j <= last && j < Tk) ? scale * (float)sr[j] : -__int_as_float(0x7f800000);
        m = fmaxf(m, v[i]);
    }
    m = warp_max(m);
    float z = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        v[i] = (j <= last && j < Tk) ? __expf(v[i] - m) : 0.0f;
        z += v[i];
    }
    float inv = 1.0f / warp_sum(z);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        if (j < Tk) pr[j] = (P)(v[i] * inv);
    }
}
// softmax backward, as softmax_bwd above: ds_j = scale * p_j * (dp_j - sum_k dp_k p_k)
template <typename P, typename G, int N>
__global__ void softmax_bwd_warp(const P* p, const G* dp, P* ds, long long rows, int Tk, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    long long off = row * Tk;
    float pv[N], gv[N];
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        pv[i] = j < Tk ? (float)p[off + j] : 0.0f;
        gv[i] = j < Tk ? (float)dp[off + j] : 0.0f;
        acc += pv[i] * gv[i];
    }
    acc = warp_sum(acc);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        if (j < Tk) ds[off + j] = (P)(scale * pv[i] * (gv[i] - acc));
    }
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(expr: str) -> Any:
    """A block-per-row kernel (every dtype pair compiled in one module)."""
    names = tuple(f"{k}<{CTYPE[t]},{CTYPE[p]}>" for t in FLOATS for p in FLOATS for k in ("causal_softmax", "softmax_bwd"))
    return row_module(SOFTMAX_KERNELS, names).get_function(expr)


@functools.lru_cache(maxsize=None)
def _warp_kernel(name: str) -> Any:
    """One instantiation of a WARP_ROWS template, compiled on first use (NVRTC caches it on disk)."""
    mod = cupy().RawModule(code=WARP_ROWS, options=("--std=c++14",), name_expressions=[name])
    return mod.get_function(name)


def _warp_n(Tk: int) -> int | None:
    """Elements per lane for a row of Tk (a power of two up to 32), None past 1024."""
    n = 1
    while 32 * n < Tk:
        n *= 2
    return n if n <= 32 else None


_ROWS_PER_BLOCK = 4


def causal_softmax(s: Any, scale: float, out_dtype: Any) -> Any:
    """s (..., Tq, Tk) raw scores, contiguous -> causal softmax(scale * s) in out_dtype, same shape
    (query i of Tq sits at position i + Tk - Tq and sees keys 0..i + Tk - Tq)."""
    Tq, Tk = s.shape[-2], s.shape[-1]
    p = empty(s.shape, out_dtype)
    types = f"{CTYPE[backend.dtype_name(s.dtype)]},{CTYPE[backend.dtype_name(out_dtype)]}"
    rows, n = s.size // Tk, _warp_n(Tk)
    if n is not None:  # a warp per row
        _warp_kernel(f"causal_softmax_warp<{types},{n}>")(
            ((rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,), (32 * _ROWS_PER_BLOCK,),
            (s, p, np.int64(rows), np.int32(Tq), np.int32(Tk), np.float32(scale)))
    else:
        _kernel(f"causal_softmax<{types}>")((rows,), (threads(Tk),), (s, p, np.int32(Tq), np.int32(Tk), np.float32(scale)))
    return p


def softmax_backward(p: Any, dp: Any, scale: float) -> Any:
    """ds = scale * p * (dp - rowsum(dp * p)), rows along the last axis; p, dp (..., Tk) contiguous,
    ds in p's dtype (dp may be float32 for 16-bit p: the product of a half-precision GEMM kept wide)."""
    Tk = p.shape[-1]
    ds = empty(p.shape, p.dtype)
    types = f"{CTYPE[backend.dtype_name(p.dtype)]},{CTYPE[backend.dtype_name(dp.dtype)]}"
    rows, n = p.size // Tk, _warp_n(Tk)
    if n is not None:  # a warp per row
        _warp_kernel(f"softmax_bwd_warp<{types},{n}>")(
            ((rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,), (32 * _ROWS_PER_BLOCK,),
            (p, dp, ds, np.int64(rows), np.int32(Tk), np.float32(scale)))
    else:
        _kernel(f"softmax_bwd<{types}>")((rows,), (threads(Tk),), (p, dp, ds, np.int32(Tk), np.float32(scale)))
    return ds
