"""What the row kernels share: block-wide reductions, one thread block per row.

`ROW_COMMON` is CUDA source prepended to each op's own kernels (tensor/cuda/layernorm.py,
softmax.py, cross_entropy.py), so each op compiles only its kernels: `block_sum` and `block_max`
reduce one value per thread to one per block with warp shuffles, then one shared slot per warp.
Statistics are accumulated in float32 (double for float64 data).
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
"""


@functools.lru_cache(maxsize=None)
def row_module(kernels: str, names: tuple) -> Any:
    """ROW_COMMON + `kernels` compiled once (NVRTC caches it on disk) with the template
    instantiations `names` (e.g. "ln_fwd<float,float>")."""
    return cupy().RawModule(code=ROW_COMMON + kernels, options=("--std=c++14",), name_expressions=list(names))
