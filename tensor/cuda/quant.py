"""int8 Linear on the GPU (tensor/quant.py: LinearInt8).

* Decode-sized inputs (at most GEMV_ROWS rows): one kernel reads each int8 weight once and
  dequantizes it inside the product, y[m, n] = s[n] * sum_k x[m, k] q[n, k] + b[n]. One warp
  per output channel n; its lanes stride along k (the row of q is contiguous), accumulate up to
  8 input rows at a time in float32 registers and reduce with warp shuffles. The weight bytes
  read are a quarter of float32's, which is what bounds a GEMV.
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
WARPS_PER_BLOCK = 8

_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// y (M, N) = (x (M, K) @ q (N, K)^T) * s (N) + b (N); one warp per output channel n
template <typename T>
__global__ void gemv_int8(const T* __restrict__ x, const signed char* __restrict__ q,
                          const float* __restrict__ s, const T* __restrict__ b, T* __restrict__ y,
                          int M, int N, int K, int has_bias) {
    const int n = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (n >= N) return;                       // the whole warp leaves together (n is per warp)
    const signed char* qn = q + (long long)n * K;
    const float scale = s[n];
    const float shift = has_bias ? (float)b[n] : 0.0f;
    for (int m0 = 0; m0 < M; m0 += 8) {
        float acc[8];
        #pragma unroll
        for (int r = 0; r < 8; ++r) acc[r] = 0.0f;
        for (int k = lane; k < K; k += 32) {
            const float w = (float)qn[k];
            #pragma unroll
            for (int r = 0; r < 8; ++r)
                if (m0 + r < M) acc[r] += w * (float)x[(long long)(m0 + r) * K + k];
        }
        #pragma unroll
        for (int r = 0; r < 8; ++r) {
            float v = acc[r];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
            if (lane == 0 && m0 + r < M) y[(long long)(m0 + r) * N + n] = (T)(v * scale + shift);
        }
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
    names = [f"{k}<{t}>" for k in ("gemv_int8", "dequant_int8") for t in ("float", "__half", "__nv_bfloat16")]
    return cupy().RawModule(code=_SOURCE, options=("--std=c++14",), name_expressions=names)


def _kernel(name: str, dtype: Any) -> Any:
    return _module().get_function(f"{name}<{CTYPE[backend.dtype_name(dtype)]}>")


def gemv_int8(x2: Any, q: Any, s: Any, bias: Any) -> Any:
    """x2 (M, K) contiguous, M <= GEMV_ROWS, q (N, K) int8, s (N,) float32, bias (N,) in x2's dtype
    or None -> (M, N) in x2's dtype."""
    M, K = x2.shape
    N = q.shape[0]
    y = empty((M, N), x2.dtype)
    threads = 32 * WARPS_PER_BLOCK
    blocks = (N + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
    b = bias if bias is not None else y  # (a placeholder pointer, never read without has_bias)
    _kernel("gemv_int8", x2.dtype)((blocks,), (threads,),
                                   (x2, q, s, b, y, np.int32(M), np.int32(N), np.int32(K),
                                    np.int32(bias is not None)))
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
