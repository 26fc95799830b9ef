"""Decode attention on the GPU: one query row per (batch, head) against the keys and values of a
KV cache, read in place (any strides, last axis contiguous), in two passes:

    pass 1 (split-K): the key axis is cut into S chunks; block (b*H + h, s) computes, for the keys
        j of chunk s that the mask allows, the running max m, the sum l of exp(q.k_j * scale - m)
        and acc = sum_j exp(q.k_j * scale - m) v_j (online softmax, float32), one warp per key
    pass 2 (combine): O = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s,  M = max_s m_s

This is the reference's softmax(q K^T / sqrt(D) + mask) V (tensor/attention.py) for Tq = 1 (one
query sees every key: no causal mask); a row with every key masked gives O = 0, as there.
mask (B, Tk) bool, True = attend, read from device memory: the CUDA-graph decoder
(tinygrad_lm/decode_cuda.py) keeps its filled length there, so a replay needs no host value.
float32 / float16 / bfloat16 q, k, v (one dtype), float32 accumulation, head size D <= 128.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import CTYPE, cupy, element_strides, empty, usable

MAX_HEAD = 128        # D <= 32 * EPL_MAX
WARPS = 4             # warps per block of pass 1; each takes every WARPS-th key of the chunk
MIN_CHUNK = 32        # keys per split at least
TARGET_BLOCKS = 264   # enough blocks of pass 1 to fill the GPU (2 per SM of an H100/H200)

_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define NEG_INF __int_as_float(0xff800000)

template <typename T, int EPL>
__global__ void decode_attn_partial(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
        const unsigned char* __restrict__ mask, float* __restrict__ part_acc, float* __restrict__ part_ml,
        int H, int D, int Tk, int chunk,
        long long qsb, long long qsh, long long ksb, long long ksh, long long kst,
        long long vsb, long long vsh, long long vst, long long msb, int has_mask, float scale) {
    __shared__ float s_m[8], s_l[8];
    __shared__ float s_acc[8][32 * EPL];
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int split = blockIdx.y, S = gridDim.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = blockDim.x >> 5;
    const T* qp = q + b * qsb + h * qsh;
    const T* kp = k + b * ksb + h * ksh;
    const T* vp = v + b * vsb + h * vsh;
    float qr[EPL], acc[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
        int d = lane + 32 * i;
        qr[i] = d < D ? (float)qp[d] * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    const int start = split * chunk, end = min(start + chunk, Tk);
    for (int j = start + warp; j < end; j += nwarp) {
        if (has_mask && !mask[b * msb + j]) continue;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
            int d = lane + 32 * i;
            if (d < D) s += qr[i] * (float)kp[j * kst + d];
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        float mn = fmaxf(m, s);
        float corr = m == NEG_INF ? 0.f : expf(m - mn);
        float p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
            int d = lane + 32 * i;
            float vv = d < D ? (float)vp[j * vst + d] : 0.f;
            acc[i] = acc[i] * corr + p * vv;
        }
        m = mn;
    }
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < EPL; ++i) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    float M = NEG_INF;
    for (int w = 0; w < nwarp; ++w) M = fmaxf(M, s_m[w]);
    float L = 0.f, a[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) a[i] = 0.f;
    for (int w = 0; w < nwarp; ++w) {
        float e = s_m[w] == NEG_INF ? 0.f : expf(s_m[w] - M);
        L += e * s_l[w];
#pragma unroll
        for (int i = 0; i < EPL; ++i) a[i] += e * s_acc[w][lane + 32 * i];
    }
    const long long idx = (long long)bh * S + split;
    if (lane == 0) { part_ml[2 * idx] = M; part_ml[2 * idx + 1] = L; }
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
        int d = lane + 32 * i;
        if (d < D) part_acc[idx * D + d] = a[i];
    }
}

template <typename T>
__global__ void decode_attn_combine(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                    T* __restrict__ out, int D, int S) {
    const int bh = blockIdx.x, d = threadIdx.x;
    if (d >= D) return;
    const long long base = (long long)bh * S;
    float M = NEG_INF;
    for (int s = 0; s < S; ++s) M = fmaxf(M, part_ml[2 * (base + s)]);
    float L = 0.f, a = 0.f;
    for (int s = 0; s < S; ++s) {
        float ms = part_ml[2 * (base + s)];
        float e = ms == NEG_INF ? 0.f : expf(ms - M);
        L += e * part_ml[2 * (base + s) + 1];
        a += e * part_acc[(base + s) * D + d];
    }
    out[(long long)bh * D + d] = (T)(L > 0.f ? a / L : 0.f);
}
"""


_WRITE_SOURCE = r"""
extern "C" __global__ void kv_cache_write(const void* k_, const void* v_, void* ck_, void* cv_, const int* col,
                               int H, int D, int itemsize, long long ksb, long long ksh, long long vsb, long long vsh,
                               long long csb, long long csh, long long cst, int n) {
    // element (b, h, d) of the new token's k and v -> column col[0] of the caches (bytes copied as-is)
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int d = i % D, h = (i / D) % H, b = i / (D * H);
    long long c = col[0];
    long long src_k = (b * ksb + h * ksh + d) * itemsize, src_v = (b * vsb + h * vsh + d) * itemsize;
    long long dst = (b * csb + h * csh + c * cst + d) * itemsize;
    const char* k = (const char*)k_; const char* v = (const char*)v_;
    char* ck = (char*)ck_; char* cv = (char*)cv_;
    for (int e = 0; e < itemsize; ++e) { ck[dst + e] = k[src_k + e]; cv[dst + e] = v[src_v + e]; }
}
"""


@functools.lru_cache(maxsize=None)
def _write_kernel() -> Any:
    return cupy().RawKernel(_WRITE_SOURCE, "kv_cache_write")


@functools.lru_cache(maxsize=None)
def _module() -> Any:
    names = [f"decode_attn_partial<{CTYPE[t]},{e}>" for t in ("float32", "float16", "bfloat16") for e in (1, 2, 3, 4)]
    names += [f"decode_attn_combine<{CTYPE[t]}>" for t in ("float32", "float16", "bfloat16")]
    return cupy().RawModule(code=_SOURCE, options=("--std=c++14",), name_expressions=names)


def fits(q: Any, k: Any, v: Any, mask: Any = None, dropout_p: float = 0.0) -> bool:
    """Whether decode_attention takes these arrays: CuPy q (B, H, 1, D), k, v (B, H, Tk, D) of one
    float dtype with D <= 128 and the last axis contiguous; mask None or bool (B, Tk), last axis
    contiguous; no dropout."""
    if k is None or v is None or dropout_p != 0.0 or not usable(q, k, v, contiguous=False):
        return False
    if q.ndim != 4 or k.ndim != 4 or q.shape[2] != 1 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        return False
    if q.shape[3] != k.shape[3] or q.shape[3] > MAX_HEAD or not q.dtype == k.dtype == v.dtype:
        return False
    if any(a.strides[-1] != a.itemsize for a in (q, k, v)) or k.shape[2] == 0:
        return False
    if mask is not None:
        if mask.dtype != bool or mask.shape != (k.shape[0], k.shape[2]) or backend.array_module(mask) is np:
            return False
        if mask.strides[1] != 1:
            return False
    return True


def num_splits(batch_heads: int, tk: int) -> int:
    """S, the chunks of the key axis: enough blocks to fill the GPU, chunks of MIN_CHUNK keys at least."""
    want = max(1, -(-TARGET_BLOCKS // batch_heads))
    return max(1, min(want, -(-tk // MIN_CHUNK)))


def decode_attention(q: Any, k: Any, v: Any, mask: Any = None, splits: int | None = None) -> Any:
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, 1, D), k, v (B, H, Tk, D) -> (B, H, 1, D) in q's
    dtype; mask (B, Tk) bool (True = attend) or None. Check `fits` first. splits: S (default num_splits)."""
    B, H, _, D = q.shape
    Tk = k.shape[2]
    S = splits or num_splits(B * H, Tk)
    chunk = -(-Tk // S)
    S = -(-Tk // chunk)
    part_acc = empty((B * H * S * D,), np.float32)
    part_ml = empty((B * H * S * 2,), np.float32)
    out = empty((B, H, 1, D), q.dtype)
    ctype = CTYPE[backend.dtype_name(q.dtype)]
    epl = -(-D // 32)
    qs, ks, vs = element_strides(q), element_strides(k), element_strides(v)
    has_mask = mask is not None
    m = mask if has_mask else q
    msb = mask.strides[0] if has_mask else 0
    mod = _module()
    i64 = np.int64
    mod.get_function(f"decode_attn_partial<{ctype},{epl}>")(
        (B * H, S), (32 * WARPS,),
        (q, k, v, m, part_acc, part_ml, np.int32(H), np.int32(D), np.int32(Tk), np.int32(chunk),
         i64(qs[0]), i64(qs[1]), i64(ks[0]), i64(ks[1]), i64(ks[2]), i64(vs[0]), i64(vs[1]), i64(vs[2]),
         i64(msb), np.int32(has_mask), np.float32(1.0 / math.sqrt(D))))
    mod.get_function(f"decode_attn_combine<{ctype}>")(
        (B * H,), (32 * epl,), (part_acc, part_ml, out, np.int32(D), np.int32(S)))
    return out


def kv_cache_write(cache_k: Any, cache_v: Any, k: Any, v: Any, col: Any) -> None:
    """cache_k[:, :, col[0]] = k[:, :, 0] and the same for v, with col a device int32 (1,): the column
    is read when the kernel runs (a CUDA-graph replay writes where the device counter points).
    cache_k, cache_v (B, H, L, D) of one layout; k, v (B, H, 1, D) of the caches' dtype; last axes contiguous."""
    B, H, _, D = k.shape
    if k.dtype != cache_k.dtype or v.dtype != cache_v.dtype or cache_k.strides != cache_v.strides:
        raise ValueError(f"kv_cache_write: keys {k.dtype} {k.shape} and values {v.dtype} {v.shape} do not fit the "
                         f"caches {cache_k.dtype} {cache_k.shape}")
    if any(a.strides[-1] != a.itemsize for a in (k, v, cache_k)) or col.dtype != np.int32:
        raise ValueError("kv_cache_write: the last axes must be contiguous and col a device int32")
    n = B * H * D
    ks, vs, cs = element_strides(k), element_strides(v), element_strides(cache_k)
    i64 = np.int64
    _write_kernel()(
        (-(-n // 256),), (256,),
        (k, v, cache_k, cache_v, col, np.int32(H), np.int32(D), np.int32(k.itemsize), i64(ks[0]), i64(ks[1]),
         i64(vs[0]), i64(vs[1]), i64(cs[0]), i64(cs[1]), i64(cs[2]), np.int32(n)))
