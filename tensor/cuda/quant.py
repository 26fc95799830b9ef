"""int8 Linear on the GPU (tensor/quant.py: LinearInt8).

* Decode-sized inputs (at most GEMV_ROWS rows): one kernel reads each int8 weight once and
  dequantizes it inside the product, y[m, n] = s[n] * sum_k x[m, k] q[n, k] + b[n]. One warp
  per 4 output channels (each x value read serves all 4); its lanes stride along k (the row of
  q is contiguous) reading 16 or 4 weights and the matching x values with one load each where
  K and the pointers allow (else one), accumulate up to 8 input rows at a time in float32
  registers and reduce with warp shuffles. The weight bytes read are a quarter of float32's,
  which is what bounds a GEMV at one row.
* Longer inputs (prefill): dequantize the weight into x's dtype with one elementwise kernel,
  then cuBLAS (tensor/cuda/linear.py: matmul) and the bias kernel: the GEMM is compute-bound
  there, and the temporary float weight is freed at once.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import CTYPE, cupy, empty, usable
from tensor.cuda.layout import bias_add
from tensor.cuda.linear import matmul
from tensor.quant import LinearInt8

GEMV_ROWS = 32          # at most this many rows take the fused GEMV kernel
GEMV_CHANNELS = 4       # output channels per warp (the kernel's #define)
WARPS_PER_BLOCK = 4     # 16 channels a block: N = 384 still spreads over 24 SMs
VECTOR_WIDTHS = (16, 4, 1)  # int8 weights per lane per load, widest first
TYPES = ("float", "__half", "__nv_bfloat16")

_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define GEMV_CHANNELS 4   // output channels per warp (GEMV_CHANNELS in Python): one x load feeds them all
#define GEMV_GROUP 8      // input rows per pass; GEMV_GROUP * GEMV_CHANNELS = 32 sums, one per lane
// W consecutive elements read with one load (W * sizeof(E) is 1, 4, 8 or 16 bytes, aligned to it)
template <typename E, int W>
struct alignas(W * sizeof(E)) Chunk { E v[W]; };
// One step of the halving exchange of 2 O sums across the warp: the lanes with bit O set keep sums
// O..2O-1 (moved down to 0..O-1) and add their partner's copies, the others keep 0..O-1. After
// O = 16, 8, 4, 2, 1 lane l holds the warp's total of sum l.
template <int O>
__device__ __forceinline__ void halve(float* acc, int lane) {
    const bool upper = (lane & O) != 0;
    #pragma unroll
    for (int i = 0; i < O; ++i) {
        const float send = upper ? acc[i] : acc[i + O];
        const float keep = upper ? acc[i + O] : acc[i];
        acc[i] = keep + __shfl_xor_sync(0xffffffff, send, O);
    }
}
// y (M, N) = (x (M, K) @ q (N, K)^T) * s (N) + b (N), float32 sums.
// Each warp owns GEMV_CHANNELS consecutive channels n0.. and passes over the rows GEMV_GROUP at a
// time. Lane l reads V int8 weights of each channel at k = V l + 32 V i (V = 16: a uint4 per row of
// q, V = 4: an int, V = 1: a byte; the caller picks V from K and the pointers' alignment), then,
// S = min(V, 16 / sizeof(T)) columns at a time, the matching S values of each input row with one
// load (float4 for float32, 8 halves as a uint4) and adds them into all GEMV_CHANNELS channels:
// each x value read serves GEMV_CHANNELS channels instead of one, cutting the x traffic per
// channel (M K values, which dominate from M = 8 on) by that factor without shared memory (which
// would need a k tiling at M = 32, K = 3072 float32: 384 KiB). The 32 sums (rows x channels) are
// reduced across the warp with a halving exchange (31 shuffles, halve below), after which lane l
// holds sum l = r * GEMV_CHANNELS + c, the output y[m0 + r, n0 + c].
template <typename T, int V>
__global__ void gemv_int8(const T* __restrict__ x, const signed char* __restrict__ q,
                          const float* __restrict__ s, const T* __restrict__ b, T* __restrict__ y,
                          int M, int N, int K, int has_bias) {
    constexpr int S = V < 16 / (int)sizeof(T) ? V : 16 / (int)sizeof(T);
    const int n0 = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5) * GEMV_CHANNELS;
    const int lane = threadIdx.x & 31;
    if (n0 >= N) return;                      // the whole warp leaves together (n0 is per warp)
    const signed char* qn[GEMV_CHANNELS];     // channels past N read the last row, never written
    #pragma unroll
    for (int c = 0; c < GEMV_CHANNELS; ++c) qn[c] = q + (long long)(n0 + c < N ? n0 + c : N - 1) * K;
    for (int m0 = 0; m0 < M; m0 += GEMV_GROUP) {
        float acc[GEMV_GROUP * GEMV_CHANNELS];
        #pragma unroll
        for (int i = 0; i < GEMV_GROUP * GEMV_CHANNELS; ++i) acc[i] = 0.0f;
        for (int k = lane * V; k < K; k += 32 * V) {
            Chunk<signed char, V> qc[GEMV_CHANNELS];
            #pragma unroll
            for (int c = 0; c < GEMV_CHANNELS; ++c) qc[c] = *reinterpret_cast<const Chunk<signed char, V>*>(qn[c] + k);
            #pragma unroll
            for (int j0 = 0; j0 < V; j0 += S) {
                float w[GEMV_CHANNELS][S];
                #pragma unroll
                for (int c = 0; c < GEMV_CHANNELS; ++c)
                    #pragma unroll
                    for (int j = 0; j < S; ++j) w[c][j] = (float)qc[c].v[j0 + j];
                #pragma unroll
                for (int r = 0; r < GEMV_GROUP; ++r) {
                    if (m0 + r >= M) break;       // the same for the whole warp
                    const Chunk<T, S> xc = *reinterpret_cast<const Chunk<T, S>*>(x + (long long)(m0 + r) * K + k + j0);
                    #pragma unroll
                    for (int j = 0; j < S; ++j) {
                        const float xv = (float)xc.v[j];
                        #pragma unroll
                        for (int c = 0; c < GEMV_CHANNELS; ++c) acc[r * GEMV_CHANNELS + c] += w[c][j] * xv;
                    }
                }
            }
        }
        halve<16>(acc, lane); halve<8>(acc, lane); halve<4>(acc, lane); halve<2>(acc, lane); halve<1>(acc, lane);
        const int m = m0 + lane / GEMV_CHANNELS, n = n0 + lane % GEMV_CHANNELS;
        if (m < M && n < N) y[(long long)m * N + n] = (T)(acc[0] * s[n] + (has_bias ? (float)b[n] : 0.0f));
    }
}
// w (N, K) = q (N, K) * s (N), in T
template <typename T>
__global__ void dequant_int8(const signed char* __restrict__ q, const float* __restrict__ s,
                             T* __restrict__ w, long long total, int K) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < total) w[i] = (T)((float)q[i] * s[i / K]);
}
"""


@functools.lru_cache(maxsize=None)
def _module() -> Any:
    names = [f"gemv_int8<{t}, {v}>" for t in TYPES for v in VECTOR_WIDTHS]
    names += [f"dequant_int8<{t}>" for t in TYPES]
    return cupy().RawModule(code=_SOURCE, options=("--std=c++14",), name_expressions=names)


def _kernel(name: str, dtype: Any, *more: int) -> Any:
    """The instantiation name<T of dtype, more...>."""
    return _module().get_function(f"{name}<{', '.join([CTYPE[backend.dtype_name(dtype)], *map(str, more)])}>")


def vector_width(x2: Any, q: Any) -> int:
    """The int8 weights a lane of gemv_int8 reads with one load: 16 or 4 where K is a multiple and
    q's and x2's pointers are aligned to the loads (V bytes of q, min(V, 16 / itemsize) elements of
    x2), else 1 (odd K, a view at an odd offset)."""
    K, size = x2.shape[1], x2.dtype.itemsize
    for v in VECTOR_WIDTHS[:-1]:
        if K % v == 0 and q.data.ptr % v == 0 and x2.data.ptr % (min(v, 16 // size) * size) == 0:
            return v
    return 1


def gemv_int8(x2: Any, q: Any, s: Any, bias: Any) -> Any:
    """x2 (M, K) contiguous, M <= GEMV_ROWS, q (N, K) int8, s (N,) float32, bias (N,) in x2's dtype
    or None -> (M, N) in x2's dtype."""
    M, K = x2.shape
    N = q.shape[0]
    y = empty((M, N), x2.dtype)
    threads = 32 * WARPS_PER_BLOCK
    per_block = GEMV_CHANNELS * WARPS_PER_BLOCK
    b = bias if bias is not None else y  # (a placeholder pointer, never read without has_bias)
    blocks = (N + per_block - 1) // per_block
    _kernel("gemv_int8", x2.dtype, vector_width(x2, q))(
        (blocks,), (threads,), (x2, q, s, b, y, np.int32(M), np.int32(N), np.int32(K), np.int32(bias is not None)))
    return y


def dequantize(q: Any, s: Any, dtype: Any) -> Any:
    """q (N, K) int8 * s (N,) -> (N, K) in dtype, one kernel."""
    N, K = q.shape
    w = empty((N, K), dtype)
    total = N * K
    _kernel("dequant_int8", dtype)(((total + 255) // 256,), (256,), (q, s, w, np.int64(total), np.int32(K)))
    return w


class LinearInt8CUDA(LinearInt8):
    """The fused GEMV for up to GEMV_ROWS rows, dequantize + cuBLAS beyond."""

    backward = LinearInt8.backward  # inference only: the reference's refusal

    @staticmethod
    def supports(x: Any, q: Any, s: Any, bias: Any = None) -> bool:
        """CuPy float16/bfloat16/float32 x of any layout (copied to rows when strided: a decoding step's
        merged heads), contiguous bias of x's dtype, contiguous int8 q, float32 s."""
        if not usable(x, contiguous=False) or not usable(bias) or bias is not None and bias.dtype != x.dtype:
            return False
        return (q.dtype == np.int8 and q.ndim == 2 and q._c_contiguous and s.dtype == np.float32
                and s._c_contiguous and q.shape[1] == x.shape[-1] and x.size > 0 and q.shape[0] > 0)

    def forward(self, x, q, s, bias=None):
        self.check(x, q, s, bias)
        x2 = x.reshape(-1, x.shape[-1])
        if not x2._c_contiguous:  # the kernels read whole rows (the reference would go through CuPy's
            x2 = x2.copy()        # cuBLAS, which a CUDA-graph capture refuses)
        if x2.shape[0] <= GEMV_ROWS:
            y = gemv_int8(x2, q, s, bias)
        else:
            y = matmul(x2, dequantize(q, s, x.dtype).T)
            if bias is not None:
                bias_add(y, bias)
        return y.reshape(x.shape[:-1] + (q.shape[0],))
