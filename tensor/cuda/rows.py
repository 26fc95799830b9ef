"""What the row kernels share: block-wide reductions, one thread block per row.

`ROW_COMMON` is CUDA source prepended to each op's own kernels (tensor/cuda/layernorm.py,
softmax.py, cross_entropy.py), so each op compiles only its kernels: `block_sum` and `block_max`
reduce one value per thread to one per block with warp shuffles, then one shared slot per warp;
`block_merge_max_sum` does the same for a running (max m, sum z of exp(x - m)) pair (an online
log-sum-exp: one pass over the row). Statistics are accumulated in float32 (double for float64
data): `acc_exp` / `acc_log` are the fast float intrinsics or double's exp / log.
"""
from __future__ import annotations

import functools
from typing import Any

from tensor.cuda.common import cupy

ROW_COMMON = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
template <typename A>
__device__ A block_sum(A x, A* shared) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffff, x, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    A total = 0;
    int nw = (blockDim.x + 31) >> 5;
    for (int i = 0; i < nw; ++i) total += shared[i];
    return total;
}
template <typename A>
__device__ A block_max(A x, A* shared) {
    for (int o = 16; o > 0; o >>= 1) { A y = __shfl_down_sync(0xffffffff, x, o); x = y > x ? y : x; }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    A total = shared[0];
    int nw = (blockDim.x + 31) >> 5;
    for (int i = 1; i < nw; ++i) total = shared[i] > total ? shared[i] : total;
    return total;
}
__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return __logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
// (m, z) <- the pair of the union of two parts, each summarised by its max m and z = sum exp(x - m)
// (an empty part, or one of only -inf: m = -inf, z = 0)
template <typename A>
__device__ __forceinline__ void merge_max_sum(A& m, A& z, A m2, A z2) {
    A M = m2 > m ? m2 : m;
    if (M == -(A)__int_as_float(0x7f800000)) return;  // both empty (-inf - -inf would be NaN)
    z = z * acc_exp(m - M) + z2 * acc_exp(m2 - M);
    m = M;
}
// every thread's (m, z) merged over the block; every thread gets the block's pair
template <typename A>
__device__ void block_merge_max_sum(A& m, A& z, A* shm, A* shz) {
    for (int o = 16; o > 0; o >>= 1)
        merge_max_sum(m, z, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, z, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { shm[warp] = m; shz[warp] = z; }
    __syncthreads();
    m = shm[0]; z = shz[0];
    int nw = (blockDim.x + 31) >> 5;
    for (int i = 1; i < nw; ++i) merge_max_sum(m, z, shm[i], shz[i]);
}
"""


@functools.lru_cache(maxsize=None)
def row_module(kernels: str, names: tuple) -> Any:
    """ROW_COMMON + `kernels` compiled once (NVRTC caches it on disk) with the template
    instantiations `names` (e.g. "ln_fwd<float,float>")."""
    return cupy().RawModule(code=ROW_COMMON + kernels, options=("--std=c++14",), name_expressions=list(names))
