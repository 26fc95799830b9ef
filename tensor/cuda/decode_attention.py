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
from tensor.cuda.common import CTYPE, cupy, element_strides, empty, usable, views_fit

MAX_HEAD = 128        # D <= 32 * EPL_MAX
WARPS = 4             # warps per block of pass 1; each takes every WARPS-th key of the chunk
MIN_CHUNK = 32        # keys per split at least
TARGET_BLOCKS = 264   # enough blocks of pass 1 to fill the GPU (2 per SM of an H100/H200)
VEC_HEADS = (32, 64, 128)   # head sizes of the 16-byte-load kernel (decode_attn_vec)
VEC_TARGET_BLOCKS = 528     # its blocks of pass 1 (4 per SM of an H100/H200)
VEC_MIN_CHUNK = 64          # its keys per split at least
MAX_CHUNK = 1024            # its keys per split at most (the scores of a chunk sit in shared memory)

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

// The same chunk, with 16-byte loads: G = D / VEC lanes hold one key (or value) row, VEC elements each,
// so a block of 128 threads reads KPB = 128 / G rows at a time and U such batches are in flight before
// any is used. Phase 1 puts the chunk's scores in shared memory (masked keys: -inf, never read); then the
// block's max M and p_j = exp(s_j - M) in place, L = sum p_j; phase 2 accumulates p_j v_j per group and
// sums the groups. With one split (gridDim.y == 1) the block writes O itself (no combine pass).
template <typename T, int D>
__global__ void __launch_bounds__(128) decode_attn_vec(const T* __restrict__ q, const T* __restrict__ k,
        const T* __restrict__ v, const unsigned char* __restrict__ mask, float* __restrict__ part_acc,
        float* __restrict__ part_ml, T* __restrict__ out, int H, int Tk, int chunk,
        long long qsb, long long qsh, long long ksb, long long ksh, long long kst,
        long long vsb, long long vsh, long long vst, long long msb, int has_mask, float scale) {
    constexpr int NT = 128, VEC = 16 / sizeof(T), G = D / VEC, KPB = NT / G, U = 4;
    __shared__ float s_p[MAX_CHUNK];
    __shared__ float s_red[KPB * D];
    __shared__ float s_wm[NT / 32], s_wl[NT / 32];
    const int bh = blockIdx.x, b = bh / H, h = bh % H, split = blockIdx.y, S = gridDim.y;
    const int t = threadIdx.x, grp = t / G, sub = t % G, lane = t & 31, warp = t >> 5;
    const int start = split * chunk, n = min(chunk, Tk - start);
    const T* kp = k + b * ksb + h * ksh + (long long)start * kst + sub * VEC;
    const T* vp = v + b * vsb + h * vsh + (long long)start * vst + sub * VEC;
    const unsigned char* mp = mask + b * msb + start;
    float qf[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) qf[e] = (float)q[b * qsb + h * qsh + sub * VEC + e] * scale;
    // phase 1: the scores (every thread runs the same trips: the shuffles need the whole warp)
    for (int base = 0; base < n; base += KPB * U) {
        uint4 kr[U];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = base + u * KPB + grp;
            ok[u] = j < n && (!has_mask || mp[j]);
            if (ok[u]) kr[u] = *reinterpret_cast<const uint4*>(kp + (long long)j * kst);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float s = 0.f;
            if (ok[u]) {
                const T* e = reinterpret_cast<const T*>(&kr[u]);
#pragma unroll
                for (int i = 0; i < VEC; ++i) s += qf[i] * (float)e[i];
            }
#pragma unroll
            for (int o = G / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
            const int j = base + u * KPB + grp;
            if (sub == 0 && j < n) s_p[j] = ok[u] ? s : NEG_INF;
        }
    }
    __syncthreads();
    float M = NEG_INF;
    for (int j = t; j < n; j += NT) M = fmaxf(M, s_p[j]);
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffff, M, o));
    if (lane == 0) s_wm[warp] = M;
    __syncthreads();
    M = NEG_INF;
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) M = fmaxf(M, s_wm[w]);
    float L = 0.f;
    for (int j = t; j < n; j += NT) {
        const float p = M == NEG_INF ? 0.f : expf(s_p[j] - M);
        s_p[j] = p;
        L += p;
    }
    for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffff, L, o);
    if (lane == 0) s_wl[warp] = L;
    __syncthreads();
    L = 0.f;
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) L += s_wl[w];
    // phase 2: sum_j p_j v_j, a group per row, U rows in flight per thread
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
    for (int base = 0; base < n; base += KPB * U) {
        uint4 vr[U];
        float p[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = base + u * KPB + grp;
            p[u] = j < n ? s_p[j] : 0.f;
            if (p[u] != 0.f) vr[u] = *reinterpret_cast<const uint4*>(vp + (long long)j * vst);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (p[u] != 0.f) {
                const T* e = reinterpret_cast<const T*>(&vr[u]);
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[i] += p[u] * (float)e[i];
            }
        }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) s_red[grp * D + sub * VEC + e] = acc[e];
    __syncthreads();
    if (t < D) {
        float a = 0.f;
#pragma unroll 4
        for (int g = 0; g < KPB; ++g) a += s_red[g * D + t];
        if (S == 1) {
            out[(long long)bh * D + t] = (T)(L > 0.f ? a / L : 0.f);
        } else {
            const long long idx = (long long)bh * S + split;
            part_acc[idx * D + t] = a;
            if (t == 0) { part_ml[2 * idx] = M; part_ml[2 * idx + 1] = L; }
        }
    }
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
    names += [f"decode_attn_vec<{CTYPE[t]},{d}>" for t in ("float32", "float16", "bfloat16") for d in VEC_HEADS]
    names += [f"decode_attn_combine<{CTYPE[t]}>" for t in ("float32", "float16", "bfloat16")]
    return cupy().RawModule(code=_SOURCE, options=("--std=c++14", f"-DMAX_CHUNK={MAX_CHUNK}"),
                            name_expressions=names)


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


def num_splits(batch_heads: int, tk: int, vector: bool = False) -> int:
    """S, the chunks of the key axis: enough blocks to fill the GPU, chunks of MIN_CHUNK keys at least
    (the vector kernel: VEC_TARGET_BLOCKS and VEC_MIN_CHUNK, and at most MAX_CHUNK keys a chunk)."""
    target, least = (VEC_TARGET_BLOCKS, VEC_MIN_CHUNK) if vector else (TARGET_BLOCKS, MIN_CHUNK)
    want = max(1, -(-target // batch_heads))
    S = max(1, min(want, -(-tk // least)))
    return max(S, -(-tk // MAX_CHUNK)) if vector else S


def vector_fits(q: Any, k: Any, v: Any) -> bool:
    """Whether the 16-byte-load kernel takes these (on top of `fits`): D in VEC_HEADS, and k, v views
    of 16-byte-aligned rows (common.views_fit)."""
    return q.shape[3] in VEC_HEADS and views_fit(k, v)


def decode_attention(q: Any, k: Any, v: Any, mask: Any = None, splits: int | None = None,
                     kernel: str | None = None) -> Any:
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, 1, D), k, v (B, H, Tk, D) -> (B, H, 1, D) in q's
    dtype; mask (B, Tk) bool (True = attend) or None. Check `fits` first. splits: S (default num_splits);
    kernel: "vector" (16-byte loads, where `vector_fits`), "scalar" (any D, any alignment) or None (the
    vector kernel where it fits)."""
    B, H, _, D = q.shape
    Tk = k.shape[2]
    vector = vector_fits(q, k, v) if kernel is None else kernel == "vector"
    if vector and not vector_fits(q, k, v):
        raise ValueError(f"decode_attention: the vector kernel needs D in {VEC_HEADS} and 16-byte-aligned k, v; "
                         f"got D={D}, k strides {k.strides}, v strides {v.strides}")
    S = splits or num_splits(B * H, Tk, vector)
    if vector:
        S = max(S, -(-Tk // MAX_CHUNK))
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
    strides = (i64(qs[0]), i64(qs[1]), i64(ks[0]), i64(ks[1]), i64(ks[2]), i64(vs[0]), i64(vs[1]), i64(vs[2]),
               i64(msb), np.int32(has_mask), np.float32(1.0 / math.sqrt(D)))
    if vector:
        mod.get_function(f"decode_attn_vec<{ctype},{D}>")(
            (B * H, S), (128,), (q, k, v, m, part_acc, part_ml, out, np.int32(H), np.int32(Tk), np.int32(chunk))
            + strides)
        if S == 1:
            return out
    else:
        mod.get_function(f"decode_attn_partial<{ctype},{epl}>")(
            (B * H, S), (32 * WARPS,),
            (q, k, v, m, part_acc, part_ml, np.int32(H), np.int32(D), np.int32(Tk), np.int32(chunk)) + strides)
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
