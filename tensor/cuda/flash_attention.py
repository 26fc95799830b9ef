"""Fused attention on the GPU in the manner of FlashAttention-2: softmax(Q K^T / sqrt(D) + mask) V and
its backward without ever forming the (Tq, Tk) scores in memory.

Shapes: q (B, H, Tq, D), k and v (B, H, Tk, D), one dtype (float16, bfloat16 or float32), D in {32, 64, 128}:
views of any batch, head and row strides with D contiguous and every row 16-byte aligned (`views_fit`), so
the heads inside a fused (B, T, 3C) qkv buffer are read where they lie and O (and dQ, dK, dV) written into
token-major buffers, with no head permute (tensor/cuda/attention.py's fused op); causal (query i sits at i + Tk - Tq, tensor/attention.py's
allowed_keys) or not; an optional key-padding mask (B, Tk) bool, True = attend. No dropout: with
dropout_p > 0 tensor/cuda/attention.py keeps its cuBLAS path (which draws the reference's keep-mask).

    forward  (flash_fwd, block = 64 query rows, 4 warps of 16 rows): K/V tiles of N keys streamed
             through shared memory (cp.async, double-buffered where two stages fit the 48 KiB of
             static shared memory); S = Q K^T on the tensor cores, online softmax (running max m and
             sum l per row, float32, base-2 exponentials), O += P V; fully masked causal tiles skipped.
             Out: O in the input dtype and L = m + log(l), the row log-sum-exp of the scaled scores
             (float32, (B, H, Tq)); a row with every key masked gives O = 0 and L = +inf (then P = 0
             in backward), the reference's P = 0 row.
    backward (FA-2): Delta = rowsum(dO * O) (flash_bwd_delta); per block of 64 (or 128) keys, a loop over
             query tiles recomputing P = exp(S / sqrt(D) - L): dV += P^T dO, dP = dO V^T,
             dS = P (dP - Delta), dK += dS^T Q / sqrt(D) (flash_bwd_dkdv). dQ = dS K / sqrt(D):
             16-bit types in the same loop (dS^T through shared memory, the tile's (N, D) product
             added by float32 atomics into a buffer that flash_bwd_delta zeroes, then cast by
             flash_bwd_dq_convert: summation order not deterministic); float32 by its own kernel per
             block of 64 queries recomputing S and dP over key tiles (flash_bwd_dq, deterministic).
             The dK/dV kernel's tiles live in dynamic shared memory (dkdv_smem_bytes). Its builds
             (BWD_VARIANTS: warps per block, dQ atomic width, grid order, stages, register bound, exp2,
             and the Delta kernel's loads) are template parameters (BwdV, each trade stated there);
             BWD_DEFAULT picks one per dtype (benchmarks/tune_flash.py times them all).

Matrix products: 16-bit inputs use `mma.sync.aligned.m16n8k16` (inline PTX, float32 accumulation;
P and dS are rounded to the input dtype before their product, as FlashAttention does); float32 uses
the same fragments as float pairs, each value split into three bfloat16 parts whose six significant
part products go through the bfloat16 mma (`mma_f32_split`: float32 accuracy on the tensor cores,
no (T, T) rounding of P or dS), so one kernel text serves every dtype. Fragment layout of m16n8k16 (PTX ISA), groupID g = lane >> 2,
threadID_in_group t = lane % 4, each "pair" two consecutive-k (A, B) or consecutive-column (C) values:
    A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
    B (16x8, "col"):      b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
    C (16x8, float32):    c0, c1 = C[g][2t], C[g][2t+1];  c2, c3 = C[g+8][2t], C[g+8][2t+1]
Shared-memory operands reach the fragments by `ldmatrix.x4` (.trans where the tile is stored k-major),
two 8-column B tiles per instruction (16-bit types; float32 loads scalars). Rows of shared tiles are
padded by 8 elements: 16-byte aligned for ldmatrix and free of bank conflicts at D = 32, 64, 128.
The device-only primitives (PTX mma, ldmatrix and conversions, 16-byte copies) are `_PRIMITIVES`; the kernels
(`_SOURCE`) use nothing else, so tests/test_flash_on_cpu.py runs `_SOURCE` on the CPU with host
versions of those primitives (tests/cuda_emulation.py). No host sync, no data-dependent allocation,
kernels on CuPy's current stream: capturable in a CUDA graph.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from tensor import backend
from tensor.cuda.common import cupy, element_strides, empty, usable, views_fit

HEADS = (32, 64, 128)   # head sizes compiled
BLOCK = 64              # rows (queries in fwd/dq, keys in dkdv) per block: 4 warps x 16
# the forward's query tiles of 16 rows per warp (flash_fwd's MT; 1 where absent): with 2 a block takes 128
# rows and each K/V fragment read from shared memory feeds two products (registers: 16-bit types, D <= 64)
FWD_ROW_TILES = {("bfloat16", 32): 2, ("bfloat16", 64): 2, ("float16", 32): 2, ("float16", 64): 2}
TRAITS = {"float32": "Fp32", "float16": "Fp16", "bfloat16": "Bf16"}

# device-only primitives; tests/cuda_emulation.py's FRAGMENT_HOST defines the same names on the host
_PRIMITIVES = r"""
__device__ __forceinline__ float bf16_to_f32(unsigned short x) { return __uint_as_float((unsigned)x << 16); }
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned short r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r; }
__device__ __forceinline__ float f16_to_f32(unsigned short x) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r; }
// c += a b for one m16n8k16 tile, float32 accumulation (fragment layouts in the module docstring)
__device__ __forceinline__ void mma_bf16(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_f16(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// four 8x8 b16 matrices from shared memory (ldmatrix): lanes 8i .. 8i+7 give the row addresses of
// matrix i (16-byte aligned); lane l receives in r[i] matrix i's row l/4, columns 2(l%4), 2(l%4)+1
// (.trans: rows 2(l%4), 2(l%4)+1 of column l/4), the lower column (row) in the low half
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void ldsm_x4(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
// 16 bytes global -> shared without registers (cp.async; zero-filled when !valid, src then unread);
// copies issued since the last commit form a group; wait<n> returns once at most n groups are pending
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int n>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(n) : "memory"); }
__device__ __forceinline__ void copy16(void* dst, const void* src) { *(uint4*)dst = *(const uint4*)src; }
__device__ __forceinline__ void zero16(void* dst) { *(uint4*)dst = make_uint4(0u, 0u, 0u, 0u); }
// float32 vector reductions into global memory (sm_90): p[0] += a, p[1] += b (8-byte aligned), and the
// same for four floats (16-byte aligned); each element atomic, as atomicAdd, one instruction per vector
__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" :: "l"(p), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
// 2^x by the MUFU unit (ex2.approx.ftz.f32: ~2 ulp; -inf gives 0, results below 2^-126 flush to 0)
__device__ __forceinline__ float fast_exp2(float x) { float r; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }
// the block's dynamic shared memory (bytes as the launch gave them: dynamic_smem_size())
#define FA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
__device__ __forceinline__ unsigned dynamic_smem_size() {
    unsigned r; asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r)); return r; }
"""

_SOURCE = r"""
#define FA_NEG_INF __int_as_float(0xff800000)
#define FA_POS_INF __int_as_float(0x7f800000)
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
#define FA_FULL 0xffffffffu
#define FA_PAD 8   // shared rows padded by 8 elements: 16-byte aligned rows, fewer bank conflicts

// float32 on the tensor cores: each value split into three bfloat16 parts, x = h + m + l (the two
// remainders are exact in float32, so h + m + l carries ~27 bits of x's 24), and the product
// accumulated from the six part products that matter (m*l, l*m, l*l fall below float32's epsilon)
__device__ __forceinline__ void split3(float x, unsigned& h, unsigned& m, unsigned& l) {
    const unsigned short hb = f32_to_bf16(x);
    const float r = x - bf16_to_f32(hb);
    const unsigned short mb = f32_to_bf16(r);
    h = hb; m = mb; l = f32_to_bf16(r - bf16_to_f32(mb));
}
__device__ __forceinline__ void split_pair(float2 p, unsigned& h, unsigned& m, unsigned& l) {
    unsigned h0, m0, l0, h1, m1, l1;
    split3(p.x, h0, m0, l0);
    split3(p.y, h1, m1, l1);
    h = h0 | (h1 << 16); m = m0 | (m1 << 16); l = l0 | (l1 << 16);
}
__device__ __forceinline__ void mma_f32_split(float c[4], const float2 a[4], const float2 b[2]) {
    unsigned ah[4], am[4], al[4], bh[2], bm[2], bl[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) split_pair(a[i], ah[i], am[i], al[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) split_pair(b[i], bh[i], bm[i], bl[i]);
    mma_bf16(c, al, bh);   // smallest terms first
    mma_bf16(c, ah, bl);
    mma_bf16(c, am, bm);
    mma_bf16(c, am, bh);
    mma_bf16(c, ah, bm);
    mma_bf16(c, ah, bh);
}

// dtype traits: storage S, fragment pair P, conversions and the tile product
struct Fp32 {
    typedef float S; typedef float2 P;
    static constexpr bool CACHE = false;   // A fragments reloaded at each use (RowFrags)
    static constexpr bool FUSED_DQ = false;   // dQ by its own kernel (flash_bwd_dq)
    static __device__ __forceinline__ float tof(S x) { return x; }
    static __device__ __forceinline__ S fromf(float x) { return x; }
    static __device__ __forceinline__ P pair(S lo, S hi) { return make_float2(lo, hi); }
    static __device__ __forceinline__ P pack(float lo, float hi) { return make_float2(lo, hi); }
    static __device__ __forceinline__ void mma(float c[4], const P a[4], const P b[2]) { mma_f32_split(c, a, b); }
};
struct Fp16 {
    typedef unsigned short S; typedef unsigned P;
    static constexpr bool CACHE = true;
    static constexpr bool FUSED_DQ = true;    // dQ by atomics in the dK/dV kernel
    static __device__ __forceinline__ float tof(S x) { return f16_to_f32(x); }
    static __device__ __forceinline__ S fromf(float x) { return f32_to_f16(x); }
    static __device__ __forceinline__ P pair(S lo, S hi) { return (unsigned)lo | ((unsigned)hi << 16); }
    static __device__ __forceinline__ P pack(float lo, float hi) { return pair(fromf(lo), fromf(hi)); }
    static __device__ __forceinline__ void mma(float c[4], const P a[4], const P b[2]) { mma_f16(c, a, b); }
};
struct Bf16 {
    typedef unsigned short S; typedef unsigned P;
    static constexpr bool CACHE = true;
    static constexpr bool FUSED_DQ = true;    // dQ by atomics in the dK/dV kernel
    static __device__ __forceinline__ float tof(S x) { return bf16_to_f32(x); }
    static __device__ __forceinline__ S fromf(float x) { return f32_to_bf16(x); }
    static __device__ __forceinline__ P pair(S lo, S hi) { return (unsigned)lo | ((unsigned)hi << 16); }
    static __device__ __forceinline__ P pack(float lo, float hi) { return pair(fromf(lo), fromf(hi)); }
    static __device__ __forceinline__ void mma(float c[4], const P a[4], const P b[2]) { mma_bf16(c, a, b); }
};

// ---- fragment loads (m: element (0, 0) of the tile, ld: its row stride in elements)
// A[r][k] = m[r ld + k], rows r >= valid read as zero
template <class T>
__device__ __forceinline__ void load_a(typename T::P a[4], const typename T::S* m, int ld, int valid) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const typename T::S z = 0;
    const typename T::S* r0 = m + (long long)g * ld + 2 * t;
    const typename T::S* r8 = m + (long long)(g + 8) * ld + 2 * t;
    const bool v0 = g < valid, v8 = g + 8 < valid;
    if constexpr (sizeof(typename T::S) == 2) {   // a pair is one aligned 32-bit word (rows 16-byte aligned)
        a[0] = v0 ? *(const unsigned*)r0 : 0u;
        a[1] = v8 ? *(const unsigned*)r8 : 0u;
        a[2] = v0 ? *(const unsigned*)(r0 + 8) : 0u;
        a[3] = v8 ? *(const unsigned*)(r8 + 8) : 0u;
    } else {
        a[0] = T::pair(v0 ? r0[0] : z, v0 ? r0[1] : z);
        a[1] = T::pair(v8 ? r8[0] : z, v8 ? r8[1] : z);
        a[2] = T::pair(v0 ? r0[8] : z, v0 ? r0[9] : z);
        a[3] = T::pair(v8 ? r8[8] : z, v8 ? r8[9] : z);
    }
}
// B[k][n] = m[n ld + k] (B = M^T: the keys of S = Q K^T)
template <class T>
__device__ __forceinline__ void load_b_nk(typename T::P b[2], const typename T::S* m, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const typename T::S* r = m + g * ld + 2 * t;
    b[0] = T::pair(r[0], r[1]);
    b[1] = T::pair(r[8], r[9]);
}
// B[k][n] = m[k ld + n] (the values of O = P V)
template <class T>
__device__ __forceinline__ void load_b_kn(typename T::P b[2], const typename T::S* m, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const typename T::S* c = m + 2 * t * ld + g;
    b[0] = T::pair(c[0], c[ld]);
    b[1] = T::pair(c[8 * ld], c[9 * ld]);
}
// the B fragments of two adjacent 8-column tiles, b[0] for columns 0-7 and b[1] for 8-15: one
// ldmatrix.x4 for 16-bit types (matrix i -> b[i >> 1][i & 1]), scalar loads for float32
template <class T>
__device__ __forceinline__ void load_b_nk2(typename T::P b[2][2], const typename T::S* m, int ld) {
    if constexpr (sizeof(typename T::S) == 2) {
        const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
        unsigned x[4];
        ldsm_x4(x, m + ((i >> 1) * 8 + r) * ld + (i & 1) * 8);   // rows n, columns k: b = row-major 8x8
        b[0][0] = x[0]; b[0][1] = x[1]; b[1][0] = x[2]; b[1][1] = x[3];
    } else {
        load_b_nk<T>(b[0], m, ld);
        load_b_nk<T>(b[1], m + 8 * ld, ld);
    }
}
template <class T>
__device__ __forceinline__ void load_b_kn2(typename T::P b[2][2], const typename T::S* m, int ld) {
    if constexpr (sizeof(typename T::S) == 2) {
        const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
        unsigned x[4];
        ldsm_x4_trans(x, m + ((i & 1) * 8 + r) * ld + (i >> 1) * 8);   // rows k, columns n: transposed
        b[0][0] = x[0]; b[0][1] = x[1]; b[1][0] = x[2]; b[1][1] = x[3];
    } else {
        load_b_kn<T>(b[0], m, ld);
        load_b_kn<T>(b[1], m + 8, ld);
    }
}
// A[r][k] = m[r ld + k] from shared memory (16-bit types): one ldmatrix.x4, matrix i = rows 8 (i & 1) ..,
// columns 8 (i >> 1) .. -> a[i]
template <class T>
__device__ __forceinline__ void load_a_sm(typename T::P a[4], const typename T::S* m, int ld) {
    const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    ldsm_x4(a, m + ((i & 1) * 8 + r) * ld + (i >> 1) * 8);
}
// two float32 C tiles (columns 0-7 and 8-15) -> one A fragment of 16 columns, rounded to the dtype
template <class T>
__device__ __forceinline__ void c_to_a(typename T::P a[4], const float c0[4], const float c1[4]) {
    a[0] = T::pack(c0[0], c0[1]);
    a[1] = T::pack(c0[2], c0[3]);
    a[2] = T::pack(c1[0], c1[1]);
    a[3] = T::pack(c1[2], c1[3]);
}
// this warp's 16 rows of a (rows, D) matrix as A fragments, one per 16 columns: kept in registers
// (CACHE: 16-bit types by default), or reloaded at each use (float32, whose fragments take twice the
// registers; the dK/dV kernel's V at D = 128, where K, V and two accumulators would not fit)
template <class T, int D, bool CACHE = T::CACHE>
struct RowFrags {
    typename T::P f[CACHE ? D / 16 : 1][4];
    const typename T::S* base;
    int valid, ld;
    __device__ __forceinline__ void init(const typename T::S* b, int v, int ld_) {   // ld_: the row stride
        base = b; valid = v; ld = ld_;
        if constexpr (CACHE) {
#pragma unroll
            for (int kc = 0; kc < D / 16; ++kc) load_a<T>(f[kc], b + kc * 16, ld_, v);
        }
    }
    __device__ __forceinline__ const typename T::P* get(int kc, typename T::P* tmp) const {
        if constexpr (CACHE) return f[kc];
        else { load_a<T>(tmp, base + kc * 16, ld, valid); return tmp; }
    }
};
// a row of C lives in the 4 lanes of a group
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(FA_FULL, x, 1));
    return fmaxf(x, __shfl_xor_sync(FA_FULL, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(FA_FULL, x, 1);
    return x + __shfl_xor_sync(FA_FULL, x, 2);
}
// rows row0 .. row0 + ROWS - 1 of an (nrows, D) matrix of row stride ld into shared memory, zero past nrows
template <class T, int D, int ROWS>
__device__ __forceinline__ void load_tile(typename T::S (*dst)[D + FA_PAD], const typename T::S* src, int row0,
                                          int nrows, int ld) {
    constexpr int V = 16 / sizeof(typename T::S), PER_ROW = D / V;
    for (int i = threadIdx.x; i < ROWS * PER_ROW; i += blockDim.x) {
        const int r = i / PER_ROW, c = (i % PER_ROW) * V;
        if (row0 + r < nrows) copy16(&dst[r][c], src + (long long)(row0 + r) * ld + c);
        else zero16(&dst[r][c]);
    }
}
// load_tile by cp.async (the caller commits and waits): rows past nrows zero-filled from row 0's address
template <class T, int D, int ROWS>
__device__ __forceinline__ void load_tile_async(typename T::S (*dst)[D + FA_PAD], const typename T::S* src,
                                                int row0, int nrows, int ld) {
    constexpr int V = 16 / sizeof(typename T::S), PER_ROW = D / V;
    for (int i = threadIdx.x; i < ROWS * PER_ROW; i += blockDim.x) {
        const int r = i / PER_ROW, c = (i % PER_ROW) * V;
        const bool in = row0 + r < nrows;
        cp_async16(&dst[r][c], src + (long long)(in ? row0 + r : 0) * ld + c, in);
    }
}
// the dK/dV kernel's query tile at row0: Q and dO by cp.async (the caller commits and waits), L (times
// log2(e); +inf past Tq: P = 0) and Delta by plain stores
template <class T, int D, int N>
__device__ __forceinline__ void load_query_tile(typename T::S (*sq)[D + FA_PAD], typename T::S (*sg)[D + FA_PAD],
        float* sl, float* sd, const typename T::S* q, const typename T::S* go, const float* lse, const float* delta,
        int row0, int Tq, int qld, int gld) {
    load_tile_async<T, D, N>(sq, q, row0, Tq, qld);
    load_tile_async<T, D, N>(sg, go, row0, Tq, gld);
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const bool in = row0 + i < Tq;
        sl[i] = in ? lse[row0 + i] * FA_LOG2E : FA_POS_INF;
        sd[i] = in ? delta[row0 + i] : 0.f;
    }
}
// Operands are (B, H, T, D) views of any batch, head and row strides (D contiguous, in elements), e.g. the
// heads inside the fused (B, T, 3C) qkv buffer, read and written where they lie. Head bh = b H + h starts at
// b sb + h sh. The strides come in groups: Q (q), K (k and v), O (O and dO), dQ, dKV (dK and dV).
__device__ __forceinline__ long long fa_head(int bh, int H, long long sb, long long sh) {
    return (long long)(bh / H) * sb + (long long)(bh % H) * sh;
}
#define FA_IN_STRIDES long long qsb, long long qsh, int qst, long long ksb, long long ksh, int kst, \
                      long long osb, long long osh, int ost
// may query i (of Tq) see key j (of Tk)?  causal: j <= i + Tk - Tq;  mask: (B, Tk), True = attend
__device__ __forceinline__ bool fa_allowed(int i, int j, int Tk, int off, int causal, const unsigned char* mrow) {
    return j < Tk && (!causal || j <= i + off) && (mrow == nullptr || mrow[j]);
}

// ---- forward: grid (ceil(Tq / (64 MT)), B * H), 128 threads; each warp takes MT tiles of 16 query rows
// (16 MT consecutive rows), so every K and V fragment read from shared memory feeds MT products
template <class T, int D, int N, int MT>
__global__ void __launch_bounds__(128) flash_fwd(const typename T::S* __restrict__ q,
        const typename T::S* __restrict__ k, const typename T::S* __restrict__ v, const unsigned char* __restrict__ mask,
        typename T::S* __restrict__ o, float* __restrict__ lse, int H, int Tq, int Tk, int causal, int has_mask,
        float scale_log2, FA_IN_STRIDES) {
    typedef typename T::S S; typedef typename T::P P;
    // K/V tiles double-buffered (ST = 2: the next tile's cp.async in flight during this one's
    // products) where two stages fit the 48 KiB of static shared memory, else one stage
    constexpr int ST = 4 * N * (D + FA_PAD) * (int)sizeof(S) <= 48 * 1024 ? 2 : 1;
    __shared__ __align__(16) S sK[ST][N][D + FA_PAD];
    __shared__ __align__(16) S sV[ST][N][D + FA_PAD];
    const int bh = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.x * 64 * MT, row0 = m0 + warp * 16 * MT, off = Tk - Tq;
    const long long qoff = fa_head(bh, H, qsb, qsh), koff = fa_head(bh, H, ksb, ksh), ooff = fa_head(bh, H, osb, osh);
    const unsigned char* mrow = has_mask ? mask + (long long)(bh / H) * Tk : nullptr;
    RowFrags<T, D> qa[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) qa[mt].init(q + qoff + (long long)(row0 + 16 * mt) * qst, Tq - row0 - 16 * mt, qst);
    float acc[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
    float mrun[MT][2], lrun[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) { mrun[mt][0] = mrun[mt][1] = FA_NEG_INF; lrun[mt][0] = lrun[mt][1] = 0.f; }
    const int kend = causal ? min(Tk, m0 + 64 * MT + off) : Tk;   // later key tiles are fully masked
    for (int n0 = 0, it = 0; n0 < kend; n0 += N, ++it) {
        const int cur = ST == 2 ? (it & 1) : 0;
        if (ST == 1 || it == 0) {   // this tile, unless the previous iteration prefetched it
            load_tile_async<T, D, N>(sK[cur], k + koff, n0, Tk, kst);
            load_tile_async<T, D, N>(sV[cur], v + koff, n0, Tk, kst);
        }
        cp_async_commit();
        if (ST == 2 && n0 + N < kend) {   // the next tile, into the stage the last iteration finished with
            load_tile_async<T, D, N>(sK[cur ^ 1], k + koff, n0 + N, Tk, kst);
            load_tile_async<T, D, N>(sV[cur ^ 1], v + koff, n0 + N, Tk, kst);
        }
        cp_async_commit();
        cp_async_wait<1>();   // every group but the newest (the prefetch): this tile has landed
        __syncthreads();
        float s[MT][N / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < N / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            P tq[MT][4];
            const P* a[MT];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) a[mt] = qa[mt].get(kc, tq[mt]);
#pragma unroll
            for (int nt = 0; nt < N / 8; nt += 2) {
                P bb[2][2];
                load_b_nk2<T>(bb, &sK[cur][nt * 8][kc * 16], D + FA_PAD);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    T::mma(s[mt][nt], a[mt], bb[0]);
                    T::mma(s[mt][nt + 1], a[mt], bb[1]);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int r0 = row0 + 16 * mt;
            float mx[2] = {mrun[mt][0], mrun[mt][1]};
            // every key of the tile allowed to every row of this m-tile (warp-uniform): no per-element test
            const bool full = !has_mask && n0 + N <= Tk && (!causal || n0 + N - 1 <= r0 + off);
            if (full) {
#pragma unroll
                for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[mt][nt][e] *= scale_log2;
                        mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][nt][e]);
                    }
            } else {
#pragma unroll
                for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = r0 + g + 8 * (e >> 1), j = n0 + nt * 8 + 2 * t + (e & 1);
                        s[mt][nt][e] = fa_allowed(i, j, Tk, off, causal, mrow) ? s[mt][nt][e] * scale_log2 : FA_NEG_INF;
                        mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][nt][e]);
                    }
            }
            float base[2], corr[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mx[h] = quad_max(mx[h]);
                base[h] = mx[h] == FA_NEG_INF ? 0.f : mx[h];   // a row masked so far: every p is 0
                corr[h] = exp2f(mrun[mt][h] - base[h]);
                mrun[mt][h] = mx[h];
                lrun[mt][h] *= corr[h];
            }
#pragma unroll
            for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[mt][nt][e] = exp2f(s[mt][nt][e] - base[e >> 1]);
                    lrun[mt][e >> 1] += s[mt][nt][e];
                }
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][nt][e] *= corr[e >> 1];
        }
#pragma unroll
        for (int kc = 0; kc < N / 16; ++kc) {
            P pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) c_to_a<T>(pa[mt], s[mt][2 * kc], s[mt][2 * kc + 1]);
#pragma unroll
            for (int nt = 0; nt < D / 8; nt += 2) {
                P bb[2][2];
                load_b_kn2<T>(bb, &sV[cur][kc * 16][nt * 8], D + FA_PAD);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    T::mma(acc[mt][nt], pa[mt], bb[0]);
                    T::mma(acc[mt][nt + 1], pa[mt], bb[1]);
                }
            }
        }
        __syncthreads();   // every warp done with stage cur before a later iteration refills it
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float l = quad_sum(lrun[mt][h]);
            const int i = row0 + 16 * mt + g + 8 * h;
            if (i >= Tq) continue;
            const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                o[ooff + (long long)i * ost + nt * 8 + 2 * t] = T::fromf(acc[mt][nt][2 * h] * inv);
                o[ooff + (long long)i * ost + nt * 8 + 2 * t + 1] = T::fromf(acc[mt][nt][2 * h + 1] * inv);
            }
            if (t == 0) lse[(long long)bh * Tq + i] = l > 0.f ? (mrun[mt][h] + log2f(l)) * FA_LN2 : FA_POS_INF;
        }
}

// ---- backward 1: Delta = rowsum(dO * O); with FUSED_DQ it also zeroes the row of the float32 dQ
// accumulator (rows, D) that flash_bwd_dkdv adds to. 128 threads; VEC false: one warp per row, one element
// per lane at a time (grid ceil(rows / 4)); VEC true: 16 bytes per thread (R = D * sizeof(S) / 16 threads
// a row, 128 / R rows per block, grid ceil(rows / (128 / R))): whole 16-byte loads and stores instead of
// 2-byte ones, for a narrower shuffle reduction
template <class T, int D, bool VEC>
__global__ void __launch_bounds__(128) flash_bwd_delta(const typename T::S* __restrict__ go,
        const typename T::S* __restrict__ o, float* __restrict__ delta, float* __restrict__ dq_acc, int rows, int H,
        int Tq, long long osb, long long osh, int ost) {
    typedef typename T::S S;
    constexpr int E = 16 / sizeof(S), R = VEC ? D / E : 32;   // elements per load, threads per row
    const int r = blockIdx.x * (128 / R) + threadIdx.x / R, lane = threadIdx.x % R;
    const bool in = r < rows;   // (no early return: every lane of the warp takes part in the shuffles)
    const long long ro = in ? fa_head(r / Tq, H, osb, osh) + (long long)(r % Tq) * ost : 0;   // row r of O, dO
    float s = 0.f;
    if constexpr (VEC) {
        if (in) {
            __align__(16) S a[E], b[E];
            copy16(a, go + ro + lane * E);
            copy16(b, o + ro + lane * E);
#pragma unroll
            for (int e = 0; e < E; ++e) s += T::tof(a[e]) * T::tof(b[e]);
        }
    } else if (in) {
        for (int d = lane; d < D; d += 32) s += T::tof(go[ro + d]) * T::tof(o[ro + d]);
    }
    for (int w = R / 2; w > 0; w >>= 1) s += __shfl_xor_sync(FA_FULL, s, w);
    if (!in) return;
    if (lane == 0) delta[r] = s;
    if constexpr (T::FUSED_DQ) {
        if constexpr (VEC)
            for (int d = lane * 4; d < D; d += 4 * R) zero16(dq_acc + (long long)r * D + d);
        else
            for (int d = lane; d < D; d += 32) dq_acc[(long long)r * D + d] = 0.f;
    }
}

// ---- backward 4 (FUSED_DQ): dQ = dq_acc / sqrt(D) in the dtype (dQ strides), one thread per element
template <class T, int D>
__global__ void __launch_bounds__(256) flash_bwd_dq_convert(const float* __restrict__ dq_acc,
        typename T::S* __restrict__ dq, long long n, float scale, int H, int Tq, long long dsb, long long dsh,
        int dst) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int row = (int)(i / D);   // of B * H * Tq (< 2^31 rows)
    dq[fa_head(row / Tq, H, dsb, dsh) + (long long)(row % Tq) * dst + i % D] = T::fromf(dq_acc[i] * scale);
}

// ---- backward 2: dK, dV for 16 * V::WARPS keys per block (16 per warp), looping over query tiles of N;
// with FUSED_DQ also dQ += dS K / sqrt(D) for each tile, added into dq_acc (float32, zeroed by
// flash_bwd_delta) by atomics (no second recomputation of S and dP); 32 * V::WARPS threads; grid
// (ceil(Tk / KB), B * H), or (B * H, ceil(Tk / KB)) with V::HEAVY_FIRST; dynamic shared memory of
// dkdv_smem_bytes (flash_attention.py computes the same count; a launch with less traps)
template <int WARPS_, int ATOM_, bool HEAVY_FIRST_, int STAGES_, int MIN_BLOCKS_, bool FAST_EXP_>
struct BwdV {
    // 4: 64 keys per block (128 threads); 8: 128 keys (256 threads): each query tile's Q/dO loads and
    // fused-dQ atomics serve twice the keys (half the global traffic and atomics per key), for twice
    // the shared memory (K and dS^T of 128 keys) and half the blocks (a coarser causal tail)
    static constexpr int WARPS = WARPS_;
    // fused dQ's atomics: 1 = atomicAdd per float; 2 = red.global.add.v2.f32 (the two adjacent columns a
    // lane holds: half the atomic instructions); 4 = red.v4 after one pair exchange with the lane t ^ 1
    // (a quarter of the atomics, for two shuffles per 8 columns)
    static constexpr int ATOM = ATOM_;
    // grid (B * H, key blocks): blocks are dispatched in order of their linear index, so every head's
    // first key blocks (causal: the most query tiles) start in the first wave and the short ones fill
    // the tail; false: (key blocks, B * H), head after head
    static constexpr bool HEAVY_FIRST = HEAVY_FIRST_;
    // query-tile stages: 2 = the next tile's cp.async in flight during this one's products (more shared
    // memory, fewer blocks per SM); 1 = load then compute; 0 = 2 where the total fits 48 KiB, else 1
    static constexpr int STAGES = STAGES_;
    // blocks per SM the compiler must fit (__launch_bounds__' second argument; 0: no bound): 3 blocks of 4
    // warps cap registers at 168 (12 warps per SM to hide the mma/ldmatrix latencies instead of 8), at the
    // price of spills where the kernel needs more
    static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
    // P = 2^x by ex2.approx.ftz (one MUFU op; results below 2^-126 flushed to 0) instead of exp2f's
    // denormal-safe sequence
    static constexpr bool FAST_EXP = FAST_EXP_;
};
template <class T, int D, int N, class V>
struct DkdvSmem {
    static constexpr bool F = T::FUSED_DQ;
    static constexpr int KB = 16 * V::WARPS, FK = F ? KB : 1, FN = F ? N : 1;   // FK, FN: the fused dQ's buffers
    static constexpr int tiles(int st) { return (2 * st * N * (D + FA_PAD) + FK * (D + FA_PAD) + FK * (FN + FA_PAD)); }
    static constexpr int bytes_for(int st) { return (tiles(st) * (int)sizeof(typename T::S) + 15) / 16 * 16 + 8 * st * N; }
    static constexpr int ST = V::STAGES ? V::STAGES : (bytes_for(2) <= 48 * 1024 ? 2 : 1);
    static constexpr int BYTES = bytes_for(ST), FLOATS_AT = BYTES - 8 * ST * N;   // L and Delta after the tiles
    static_assert(BYTES <= 227 * 1024, "flash_bwd_dkdv: shared memory");
};
template <class T, int D, int N, class V>
__global__ void __launch_bounds__(32 * V::WARPS, V::MIN_BLOCKS) flash_bwd_dkdv(const typename T::S* __restrict__ q,
        const typename T::S* __restrict__ k, const typename T::S* __restrict__ v, const unsigned char* __restrict__ mask,
        const typename T::S* __restrict__ go, const float* __restrict__ lse, const float* __restrict__ delta,
        typename T::S* __restrict__ dk, typename T::S* __restrict__ dv, float* __restrict__ dq_acc, int H, int Tq,
        int Tk, int causal, int has_mask, float scale_log2, float scale, FA_IN_STRIDES, long long dsb, long long dsh,
        int dst) {
    typedef typename T::S S; typedef typename T::P P;
    typedef DkdvSmem<T, D, N, V> M;
    constexpr int ST = M::ST, KB = M::KB, FK = M::FK, FN = M::FN, W = V::WARPS;
    FA_DYNAMIC_SMEM(smem);
    if (dynamic_smem_size() < (unsigned)M::BYTES) __trap();   // the launch's byte count disagrees with M
    S (*sQ)[N][D + FA_PAD] = reinterpret_cast<S (*)[N][D + FA_PAD]>(smem);   // [ST]: the query tile's Q
    S (*sG)[N][D + FA_PAD] = sQ + ST;                                        // [ST]: its dO
    S (*sK)[D + FA_PAD] = reinterpret_cast<S (*)[D + FA_PAD]>(sG + ST);      // [FK]: the block's keys (dS K)
    S (*sdS)[FN + FA_PAD] = reinterpret_cast<S (*)[FN + FA_PAD]>(sK + FK);   // [FK]: dS^T, rows = keys
    float (*sL)[N] = reinterpret_cast<float (*)[N]>(smem + M::FLOATS_AT);   // [ST]
    float (*sD)[N] = sL + ST;                                                                                 // [ST]
    const int bh = V::HEAVY_FIRST ? blockIdx.x : blockIdx.y, kblock = V::HEAVY_FIRST ? blockIdx.y : blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k0 = kblock * KB, key0 = k0 + warp * 16, off = Tk - Tq;
    const long long qoff = fa_head(bh, H, qsb, qsh), koff = fa_head(bh, H, ksb, ksh), goff = fa_head(bh, H, osb, osh);
    const long long dkoff = fa_head(bh, H, dsb, dsh);   // dK and dV: the dKV strides
    const unsigned char* mrow = has_mask ? mask + (long long)(bh / H) * Tk : nullptr;
    RowFrags<T, D, T::CACHE && !T::FUSED_DQ> ka;   // with FUSED_DQ: K's fragments from sK by ldmatrix
    RowFrags<T, D, T::CACHE && D <= 64> va;
    ka.init(k + koff + (long long)key0 * kst, Tk - key0, kst);
    va.init(v + koff + (long long)key0 * kst, Tk - key0, kst);
    float ak[D / 8][4], av[D / 8][4];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) ak[nt][e] = av[nt][e] = 0.f;
    if constexpr (T::FUSED_DQ) load_tile<T, D, FK>(sK, k + koff, k0, Tk, kst);   // visible after the loop's barrier
    int qstart = causal ? max(0, k0 - off) : 0;   // earlier queries see none of these keys
    qstart -= qstart % N;
    for (int q0 = qstart, it = 0; q0 < Tq; q0 += N, ++it) {
        const int cur = ST == 2 ? (it & 1) : 0;
        // (a stage is refilled only after the closing barrier of the iteration that last read it)
        if (ST == 1 || it == 0)   // this tile, unless the previous iteration prefetched it
            load_query_tile<T, D, N>(sQ[cur], sG[cur], sL[cur], sD[cur], q + qoff, go + goff, lse + (long long)bh * Tq,
                                     delta + (long long)bh * Tq, q0, Tq, qst, ost);
        cp_async_commit();
        if (ST == 2 && q0 + N < Tq)
            load_query_tile<T, D, N>(sQ[cur ^ 1], sG[cur ^ 1], sL[cur ^ 1], sD[cur ^ 1], q + qoff, go + goff,
                                     lse + (long long)bh * Tq, delta + (long long)bh * Tq, q0 + N, Tq, qst, ost);
        cp_async_commit();
        cp_async_wait<1>();   // every group but the newest (the prefetch): this tile has landed
        __syncthreads();
        float st[N / 8][4], dpt[N / 8][4];   // S^T and dP^T: rows = this warp's keys, columns = queries
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            P tk[4], tv[4];
            const P* a = tk;
            if constexpr (T::FUSED_DQ) load_a_sm<T>(tk, &sK[warp * 16][kc * 16], D + FA_PAD);
            else a = ka.get(kc, tk);
            const P* b = va.get(kc, tv);
#pragma unroll
            for (int nt = 0; nt < N / 8; nt += 2) {
                P bb[2][2];
                load_b_nk2<T>(bb, &sQ[cur][nt * 8][kc * 16], D + FA_PAD);
                T::mma(st[nt], a, bb[0]);
                T::mma(st[nt + 1], a, bb[1]);
                load_b_nk2<T>(bb, &sG[cur][nt * 8][kc * 16], D + FA_PAD);
                T::mma(dpt[nt], b, bb[0]);
                T::mma(dpt[nt + 1], b, bb[1]);
            }
        }
        // every query of the tile sees every key of this warp (warp-uniform): no per-element test
        const bool full = !has_mask && key0 + 16 <= Tk && q0 + N <= Tq && (!causal || key0 + 15 <= q0 + off);
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = key0 + g + 8 * (e >> 1), c = nt * 8 + 2 * t + (e & 1), i = q0 + c;
                const float p = full || (i < Tq && fa_allowed(i, j, Tk, off, causal, mrow))
                                ? (V::FAST_EXP ? fast_exp2(st[nt][e] * scale_log2 - sL[cur][c])
                                               : exp2f(st[nt][e] * scale_log2 - sL[cur][c])) : 0.f;
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - sD[cur][c]);   // dS^T (times sqrt(D) at the end)
            }
#pragma unroll
        for (int kc = 0; kc < N / 16; ++kc) {
            P pa[4], sa[4];
            c_to_a<T>(pa, st[2 * kc], st[2 * kc + 1]);
            c_to_a<T>(sa, dpt[2 * kc], dpt[2 * kc + 1]);
#pragma unroll
            for (int nt = 0; nt < D / 8; nt += 2) {
                P bb[2][2];
                load_b_kn2<T>(bb, &sG[cur][kc * 16][nt * 8], D + FA_PAD);
                T::mma(av[nt], pa, bb[0]);   // dV += P^T dO
                T::mma(av[nt + 1], pa, bb[1]);
                load_b_kn2<T>(bb, &sQ[cur][kc * 16][nt * 8], D + FA_PAD);
                T::mma(ak[nt], sa, bb[0]);   // dK += dS^T Q
                T::mma(ak[nt + 1], sa, bb[1]);
            }
        }
        if constexpr (T::FUSED_DQ) {
            // dS^T (rounded as for dK) to shared memory; then warp w computes rows 16 (w % MT) .. of the
            // tile's (N, D) product dS K, columns NT * 8 (w / MT) .., and adds them to dq_acc
#pragma unroll
            for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    *(P*)&sdS[warp * 16 + g + 8 * h][nt * 8 + 2 * t] = T::pack(dpt[nt][2 * h], dpt[nt][2 * h + 1]);
            __syncthreads();
            constexpr int MT = N / 16, NT = D / 8 / (W / MT);   // m-tiles of the tile; n-tiles per warp
            static_assert(W % MT == 0 && NT % 2 == 0, "flash_bwd_dkdv: fused dQ split");
            const int mt = warp % MT, nb = (warp / MT) * NT, i = lane >> 3, r = lane & 7;
            float dqa[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) dqa[nt][0] = dqa[nt][1] = dqa[nt][2] = dqa[nt][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < KB / 16; ++kc) {   // the block's keys, 16 at a time
                P a[4];   // A = dS (queries x keys): the transposes of sdS's 8x8 blocks
                ldsm_x4_trans(a, &sdS[kc * 16 + (i >> 1) * 8 + r][mt * 16 + (i & 1) * 8]);
#pragma unroll
                for (int nt = 0; nt < NT; nt += 2) {
                    P bb[2][2];
                    load_b_kn2<T>(bb, &sK[kc * 16][(nb + nt) * 8], D + FA_PAD);
                    T::mma(dqa[nt], a, bb[0]);
                    T::mma(dqa[nt + 1], a, bb[1]);
                }
            }
            float* tile_acc = dq_acc + ((long long)bh * Tq + q0 + mt * 16) * D + nb * 8;   // (16, NT * 8) of D
            if constexpr (V::ATOM == 4) {
                // lanes t, t ^ 1 swap pairs: even t then holds row g, columns 4 (t / 2) .. + 3; odd t row g + 8
                const bool even = (t & 1) == 0;
                const int row = g + (even ? 0 : 8);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const float s0 = even ? dqa[nt][2] : dqa[nt][0], s1 = even ? dqa[nt][3] : dqa[nt][1];
                    const float r0 = __shfl_xor_sync(FA_FULL, s0, 1), r1 = __shfl_xor_sync(FA_FULL, s1, 1);
                    if (q0 + mt * 16 + row < Tq) {   // (after the exchange: every lane shuffles)
                        float* p = tile_acc + (long long)row * D + nt * 8 + 4 * (t >> 1);
                        if (even) red_add_v4(p, dqa[nt][0], dqa[nt][1], r0, r1);
                        else red_add_v4(p, r0, r1, dqa[nt][2], dqa[nt][3]);
                    }
                }
            } else {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    if (q0 + mt * 16 + g + 8 * h >= Tq) continue;
                    float* p = tile_acc + (long long)(g + 8 * h) * D + 2 * t;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        if constexpr (V::ATOM == 2) red_add_v2(p + nt * 8, dqa[nt][2 * h], dqa[nt][2 * h + 1]);
                        else {
                            atomicAdd(p + nt * 8, dqa[nt][2 * h]);
                            atomicAdd(p + nt * 8 + 1, dqa[nt][2 * h + 1]);
                        }
                    }
                }
            }
        }
        __syncthreads();   // every warp done with stage cur (and sdS) before a later iteration refills it
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j = key0 + g + 8 * h;
        if (j >= Tk) continue;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const long long idx = dkoff + (long long)j * dst + nt * 8 + 2 * t + c;
                dk[idx] = T::fromf(ak[nt][2 * h + c] * scale);
                dv[idx] = T::fromf(av[nt][2 * h + c]);
            }
    }
}

// ---- backward 3 (float32, not FUSED_DQ): dQ for 64 queries per block (16 per warp), looping over key
// tiles of N; grid (ceil(Tq / 64), B * H), 128 threads
template <class T, int D, int N>
__global__ void __launch_bounds__(128) flash_bwd_dq(const typename T::S* __restrict__ q,
        const typename T::S* __restrict__ k, const typename T::S* __restrict__ v, const unsigned char* __restrict__ mask,
        const typename T::S* __restrict__ go, const float* __restrict__ lse, const float* __restrict__ delta,
        typename T::S* __restrict__ dq, int H, int Tq, int Tk, int causal, int has_mask, float scale_log2,
        float scale, FA_IN_STRIDES, long long dsb, long long dsh, int dst) {
    typedef typename T::S S; typedef typename T::P P;
    __shared__ __align__(16) S sK[N][D + FA_PAD];
    __shared__ __align__(16) S sV[N][D + FA_PAD];
    const int bh = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.x * 64, row0 = m0 + warp * 16, off = Tk - Tq;
    const long long qoff = fa_head(bh, H, qsb, qsh), koff = fa_head(bh, H, ksb, ksh), goff = fa_head(bh, H, osb, osh);
    const unsigned char* mrow = has_mask ? mask + (long long)(bh / H) * Tk : nullptr;
    RowFrags<T, D> qa, ga;
    qa.init(q + qoff + (long long)row0 * qst, Tq - row0, qst);
    ga.init(go + goff + (long long)row0 * ost, Tq - row0, ost);
    float L[2], Dl[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = row0 + g + 8 * h;
        L[h] = i < Tq ? lse[(long long)bh * Tq + i] * FA_LOG2E : FA_POS_INF;
        Dl[h] = i < Tq ? delta[(long long)bh * Tq + i] : 0.f;
    }
    float acc[D / 8][4];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    const int kend = causal ? min(Tk, m0 + 64 + off) : Tk;
    for (int n0 = 0; n0 < kend; n0 += N) {
        __syncthreads();
        load_tile<T, D, N>(sK, k + koff, n0, Tk, kst);
        load_tile<T, D, N>(sV, v + koff, n0, Tk, kst);
        __syncthreads();
        float s[N / 8][4], dp[N / 8][4];
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            P tq[4], tg[4];
            const P* a = qa.get(kc, tq);
            const P* b = ga.get(kc, tg);
#pragma unroll
            for (int nt = 0; nt < N / 8; nt += 2) {
                P bb[2][2];
                load_b_nk2<T>(bb, &sK[nt * 8][kc * 16], D + FA_PAD);
                T::mma(s[nt], a, bb[0]);    // S = Q K^T
                T::mma(s[nt + 1], a, bb[1]);
                load_b_nk2<T>(bb, &sV[nt * 8][kc * 16], D + FA_PAD);
                T::mma(dp[nt], b, bb[0]);   // dP = dO V^T
                T::mma(dp[nt + 1], b, bb[1]);
            }
        }
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = row0 + g + 8 * (e >> 1), j = n0 + nt * 8 + 2 * t + (e & 1);
                const float p = fa_allowed(i, j, Tk, off, causal, mrow) ? exp2f(s[nt][e] * scale_log2 - L[e >> 1]) : 0.f;
                s[nt][e] = p * (dp[nt][e] - Dl[e >> 1]);   // dS (times sqrt(D) at the end)
            }
#pragma unroll
        for (int kc = 0; kc < N / 16; ++kc) {
            P sa[4];
            c_to_a<T>(sa, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
            for (int nt = 0; nt < D / 8; nt += 2) {
                P bb[2][2];
                load_b_kn2<T>(bb, &sK[kc * 16][nt * 8], D + FA_PAD);
                T::mma(acc[nt], sa, bb[0]);   // dQ += dS K
                T::mma(acc[nt + 1], sa, bb[1]);
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = row0 + g + 8 * h;
        if (i >= Tq) continue;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c)
                dq[fa_head(bh, H, dsb, dsh) + (long long)i * dst + nt * 8 + 2 * t + c] = T::fromf(acc[nt][2 * h + c] * scale);
    }
}
"""


def tile(dtype_name: str, D: int, backward: bool) -> int:
    """N, the streamed tile (keys in fwd/dq, queries in dkdv): 64, or 32 where registers or the 48 KiB of
    static shared memory would not hold 64 (forward: D*itemsize = 256, where 32 lets two stages of K/V
    fit, and beyond; backward: D*itemsize > 128), 16 for float32 D=128 backward (registers: the dK/dV
    kernel spilled at 32)."""
    size = D * (4 if dtype_name == "float32" else 2)
    if backward and size >= 512:
        return 16
    return 64 if size < (256 if not backward else 129) else 32


class BwdVariant(NamedTuple):
    """One build of the backward (BwdV and flash_bwd_delta in _SOURCE, where each field's trade is stated):
    warps per dK/dV block (4: 64 keys, 8: 128 keys), the fused dQ's atomic width (1, 2, 4 floats; 16-bit
    types only), heavy_first (grid (B * H, key blocks)), query-tile stages (0: 2 where 48 KiB hold them,
    else 1), min_blocks per SM for the register bound (0: none), fast_exp (ex2.approx.ftz), and
    delta_vec (the Delta kernel's 16-byte loads)."""
    warps: int = 4
    atom: int = 1
    heavy_first: bool = False
    stages: int = 0
    min_blocks: int = 0
    fast_exp: bool = False
    delta_vec: bool = False


# the backward's builds, by name; BWD_DEFAULT picks one per dtype, or per (dtype, head size) where such a key
# is present (benchmarks/tune_flash.py times them all)
BWD_VARIANTS = {
    "base": BwdVariant(),                             # 64 keys per block, scalar atomics (the first build)
    "vec2": BwdVariant(atom=2),
    "vec4": BwdVariant(atom=4),
    "heavy": BwdVariant(heavy_first=True),
    "vec2_heavy_st2": BwdVariant(atom=2, heavy_first=True, stages=2),
    "w8": BwdVariant(warps=8, stages=2),              # 128 keys per block
    "w8_vec2": BwdVariant(warps=8, atom=2, stages=2),
    "w8_vec2_heavy": BwdVariant(warps=8, atom=2, heavy_first=True, stages=2),
    "w8_vec4_heavy": BwdVariant(warps=8, atom=4, heavy_first=True, stages=2),
    "occ3_vec2": BwdVariant(atom=2, min_blocks=3),   # 4 warps, registers capped for 3 blocks per SM
    "vec2_heavy_fast": BwdVariant(atom=2, heavy_first=True, fast_exp=True, delta_vec=True),
    "w8_vec4_heavy_fast": BwdVariant(warps=8, atom=4, heavy_first=True, stages=2, fast_exp=True, delta_vec=True),
}
# chosen by benchmarks/tune_flash.py on the H200 (RESULTS.md): the fastest backward per head size
BWD_DEFAULT = {"float32": "base", "float16": "occ3_vec2", "bfloat16": "occ3_vec2", ("float16", 128): "vec2_heavy_st2", ("bfloat16", 128): "vec2_heavy_st2"}


def default_variant(dtype_name: str, D: int) -> str:
    """BWD_DEFAULT's backward build for this dtype and head size."""
    return BWD_DEFAULT.get((dtype_name, D), BWD_DEFAULT[dtype_name])


def _variant(dtype_name: str, D: int, variant: str | None) -> BwdVariant:
    name = default_variant(dtype_name, D) if variant is None else variant
    if name not in BWD_VARIANTS:
        raise ValueError(f"flash backward: variant {name!r}, expected one of {sorted(BWD_VARIANTS)}")
    return BWD_VARIANTS[name]


def dkdv_smem_bytes(dtype_name: str, D: int, variant: str | None = None) -> int:
    """Dynamic shared memory of the dK/dV kernel (the count of DkdvSmem in _SOURCE: ST stages of the (N, D)
    Q and dO tiles, K and dS^T of the block's keys with the fused dQ, rows padded by 8; then ST * N
    float32 L and Delta); the kernel traps when launched with less."""
    V, N, pad = _variant(dtype_name, D, variant), tile(dtype_name, D, True), 8
    item = 4 if dtype_name == "float32" else 2
    fk, fn = (16 * V.warps, N) if fused_dq(dtype_name) else (1, 1)

    def nbytes(st: int) -> int:
        return -(-(2 * st * N * (D + pad) + fk * (D + pad) + fk * (fn + pad)) * item // 16) * 16 + 8 * st * N
    return nbytes(V.stages or (2 if nbytes(2) <= 48 * 1024 else 1))


def kernel_names(dtype_name: str, D: int, variant: str | None = None) -> dict:
    """The four kernels of one dtype, head size and backward variant (None: BWD_DEFAULT's):
    {"fwd", "delta", "dkdv", "dq" or "dq_convert"} -> name expression."""
    tr, nf, nb = TRAITS[dtype_name], tile(dtype_name, D, False), tile(dtype_name, D, True)
    V = _variant(dtype_name, D, variant)
    b = {True: "true", False: "false"}
    bv = f"BwdV<{V.warps},{V.atom},{b[V.heavy_first]},{V.stages},{V.min_blocks},{b[V.fast_exp]}>"
    names = {"fwd": f"flash_fwd<{tr},{D},{nf},{fwd_row_tiles(dtype_name, D)}>", "delta": f"flash_bwd_delta<{tr},{D},{b[V.delta_vec]}>",
             "dkdv": f"flash_bwd_dkdv<{tr},{D},{nb},{bv}>"}
    if fused_dq(dtype_name):
        names["dq_convert"] = f"flash_bwd_dq_convert<{tr},{D}>"
    else:
        names["dq"] = f"flash_bwd_dq<{tr},{D},{nb}>"
    return names


def fwd_row_tiles(dtype_name: str, D: int) -> int:
    """MT, the forward's 16-row query tiles per warp (64 MT rows a block): FWD_ROW_TILES's entry for
    (dtype, D), else 1."""
    return FWD_ROW_TILES.get((dtype_name, D), 1)


def fused_dq(dtype_name: str) -> bool:
    """16-bit types add dQ into a float32 buffer by atomics in the dK/dV kernel (the traits' FUSED_DQ);
    float32 (no ldmatrix, and its buffers would pass 48 KiB of shared memory at D=128) has its own dQ kernel."""
    return dtype_name != "float32"


@functools.lru_cache(maxsize=None)
def _module(names: tuple) -> dict:
    """Kernels compiled together: {key: function} for the (key, name expression) pairs (NVRTC takes seconds
    per module)."""
    mod = cupy().RawModule(code=_PRIMITIVES + _SOURCE, options=("--std=c++17",), name_expressions=[n for _, n in names])
    return {key: mod.get_function(n) for key, n in names}


@functools.lru_cache(maxsize=None)
def _allow_smem(kernel: Any, nbytes: int) -> Any:
    """kernel, allowed nbytes of dynamic shared memory (CUDA's default limit is 48 KiB); once per kernel."""
    kernel.max_dynamic_shared_size_bytes = nbytes
    return kernel


def _kernels(dtype_name: str, D: int, variant: str | None = None) -> dict:
    """The kernels of kernel_names, compiled at their first use: one module per dtype and head size, and one
    per backward variant for its dK/dV kernel."""
    names = kernel_names(dtype_name, D, variant)
    own = ("dkdv", "delta")   # the variant's own module
    out = dict(_module(tuple((key, n) for key, n in names.items() if key not in own)))
    out.update(_module(tuple((key, names[key]) for key in own)))
    out["dkdv"] = _allow_smem(out["dkdv"], dkdv_smem_bytes(dtype_name, D, variant))
    return out


def _strides(*arrays: Any) -> tuple:
    """The kernels' stride arguments of (B, H, T, D) arrays, in elements: batch and head as int64, row as int32."""
    out: tuple = ()
    for a in arrays:
        sb, sh, st, _ = element_strides(a)
        out += (np.int64(sb), np.int64(sh), np.int32(st))
    return out


def fits(q: Any, k: Any, v: Any, mask: Any = None, causal: bool = True, dropout_p: float = 0.0) -> bool:
    """Whether forward/backward take these arrays: CuPy q (B, H, Tq, D), k, v (B, H, Tk, D), one float16/
    bfloat16/float32 dtype, views the kernels address in place (views_fit; k and v of one layout), D in HEADS,
    Tq <= Tk when causal, B * H <= 65535; mask None or a CuPy bool (B, Tk); no dropout."""
    if k is None or v is None or dropout_p != 0.0 or not usable(q, k, v, contiguous=False):
        return False
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return False
    if q.shape[3] not in HEADS or not q.dtype == k.dtype == v.dtype or min(q.shape[2], k.shape[2]) == 0:
        return False
    if (causal and q.shape[2] > k.shape[2]) or not views_fit(q, k, v) or k.strides != v.strides:
        return False
    if q.shape[0] * q.shape[1] > 65535:   # grid.y
        return False
    if mask is not None:
        if backend.array_module(mask) is np or mask.dtype != bool or mask.shape != (k.shape[0], k.shape[2]):
            return False
    return True


def _args(q: Any, k: Any, mask: Any, causal: bool) -> tuple:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    m = q if mask is None else (mask if mask.flags.c_contiguous else mask.copy())
    i32 = np.int32
    return m, (i32(H), i32(Tq), i32(Tk), i32(bool(causal)), i32(mask is not None)), \
        np.float32(math.log2(math.e) / math.sqrt(D))


def _out_view(name: str, a: Any, like: Any) -> Any:
    """`a` (a given output), checked: like's shape and dtype, a view the kernels address (views_fit)."""
    if a.shape != like.shape or a.dtype != like.dtype or not views_fit(a):
        raise ValueError(f"flash attention: {name} must be a {like.shape} {like.dtype} view with D contiguous and "
                         f"16-byte aligned rows, got {a.shape} {a.dtype} strides {a.strides}")
    return a


def forward(q: Any, k: Any, v: Any, mask: Any = None, causal: bool = True, out: Any = None) -> tuple:
    """(O (B, H, Tq, D) in q's dtype, L (B, H, Tq) float32 row log-sum-exp) of softmax(Q K^T / sqrt(D) + mask) V.
    Check `fits` first. out: where to write O (a view of q's shape, e.g. the heads of a (B, Tq, H, D) buffer);
    default a new C-contiguous array."""
    B, H, Tq, D = q.shape
    o = empty(q.shape, q.dtype) if out is None else _out_view("out", out, q)
    lse = empty((B, H, Tq), np.float32)
    m, ints, scale_log2 = _args(q, k, mask, causal)
    name = backend.dtype_name(q.dtype)
    _kernels(name, D)["fwd"](
        (-(-Tq // (BLOCK * fwd_row_tiles(name, D))), B * H), (128,),
        (q, k, v, m, o, lse) + ints + (scale_log2,) + _strides(q, k, o))
    return o, lse


def backward(g: Any, q: Any, k: Any, v: Any, o: Any, lse: Any, mask: Any = None, causal: bool = True,
             out: tuple = (None, None, None), variant: str | None = None) -> tuple:
    """(dQ, dK, dV) in q's dtype for dL/dO = g (q's dtype and shape, laid out as O: the same strides), from
    forward's O and L; each written into `out` where given (views of q's / k's shape the kernels address; dK
    and dV of one layout), else into new C-contiguous arrays. variant: a name in BWD_VARIANTS (None:
    default_variant's)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dtype_name = backend.dtype_name(q.dtype)
    V = _variant(dtype_name, D, variant)
    if g.shape != o.shape or g.dtype != o.dtype or g.strides != o.strides:
        raise ValueError(f"flash attention backward: dO must be laid out as O ({o.shape} {o.dtype} strides "
                         f"{o.strides}), got {g.shape} {g.dtype} strides {g.strides}")
    dq, dk, dv = (empty(a.shape, a.dtype) if d is None else _out_view(name, d, a)
                  for d, a, name in zip(out, (q, k, v), ("dq", "dk", "dv")))
    if dk.strides != dv.strides:
        raise ValueError(f"flash attention backward: dk and dv must share strides, got {dk.strides} and {dv.strides}")
    delta = empty((B, H, Tq), np.float32)
    m, ints, scale_log2 = _args(q, k, mask, causal)
    scale = np.float32(1.0 / math.sqrt(D))
    kern = _kernels(dtype_name, D, variant)
    fused = fused_dq(dtype_name)
    dq_acc = empty(q.shape if fused else (0,), np.float32)   # float32 dQ sums (zeroed by the delta kernel)
    rows_per_block = 128 // (D * q.dtype.itemsize // 16) if V.delta_vec else 4
    kern["delta"]((-(-(B * H * Tq) // rows_per_block),), (128,),
                  (g, o, delta, dq_acc, np.int32(B * H * Tq), np.int32(H), np.int32(Tq)) + _strides(o))
    strides = _strides(q, k, o)
    kblocks = -(-Tk // (16 * V.warps))
    kern["dkdv"]((B * H, kblocks) if V.heavy_first else (kblocks, B * H), (32 * V.warps,),
                 (q, k, v, m, g, lse, delta, dk, dv, dq_acc) + ints + (scale_log2, scale) + strides + _strides(dk),
                 shared_mem=dkdv_smem_bytes(dtype_name, D, variant))
    if fused:
        kern["dq_convert"]((-(-dq.size // 256),), (256,),
                           (dq_acc, dq, np.int64(dq.size), scale, np.int32(H), np.int32(Tq)) + _strides(dq))
    else:
        kern["dq"](
            (-(-Tq // BLOCK), B * H), (128,),
            (q, k, v, m, g, lse, delta, dq) + ints + (scale_log2, scale) + strides + _strides(dq))
    return dq, dk, dv
