"""Column sums on the GPU: x (rows, C) -> (C,), the bias and LayerNorm-weight gradients.

CuPy's reduction along a long leading axis measured ~10x slower (16384 rows). Reached through
tensor.functional.sum_rows.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import CTYPE, FLOATS, cupy, empty

COLSUM = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// Column sums of a row-major (rows, C) matrix, out[j] = sum_i x[i, j], accumulated in float.
// Block (32, 8) threads; grid (C/32 column tiles, S row slices). Each block writes its slice's
// partial sums; the last block of a tile to finish (an atomic counter per tile, reset by that
// block) adds the S partials in slice order, so the result does not depend on block timing.
template <typename T, typename O>
__global__ void colsum(const T* x, O* out, float* partial, unsigned int* counter, long long rows, int C) {
    __shared__ float sh[8][33];
    __shared__ bool last;
    int j = blockIdx.x * 32 + threadIdx.x;
    long long per = (rows + gridDim.y - 1) / gridDim.y;
    long long r0 = blockIdx.y * per, r1 = min(rows, r0 + per);
    float s = 0.0f;
    if (j < C)
        for (long long i = r0 + threadIdx.y; i < r1; i += blockDim.y) s += (float)x[i * C + j];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0) {
        float t = 0.0f;
        for (int k = 0; k < blockDim.y; ++k) t += sh[k][threadIdx.x];
        if (j < C) partial[(long long)blockIdx.y * C + j] = t;
        __threadfence();
    }
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) last = atomicAdd(&counter[blockIdx.x], 1u) == gridDim.y - 1;
    __syncthreads();
    if (last && threadIdx.y == 0) {
        if (j < C) {
            const volatile float* pv = partial;
            float t = 0.0f;
            for (int r = 0; r < gridDim.y; ++r) t += pv[(long long)r * C + j];
            out[j] = (O)t;
        }
        if (threadIdx.x == 0) counter[blockIdx.x] = 0u;
    }
}
"""
_COLSUM_SLICES = 64  # row slices per column tile (partial sums), fewer for short matrices


@functools.lru_cache(maxsize=None)
def _colsum_module() -> Any:
    names = [f"colsum<{CTYPE[t]},{CTYPE[o]}>" for t in FLOATS for o in FLOATS]
    return cupy().RawModule(code=COLSUM, options=("--std=c++14",), name_expressions=names)


@functools.lru_cache(maxsize=None)
def _colsum_kernel(t: str, o: str) -> Any:
    return _colsum_module().get_function(f"colsum<{CTYPE[t]},{CTYPE[o]}>")


@functools.lru_cache(maxsize=8)
def _colsum_counters(tiles: int, device: int) -> Any:
    """Zeroed per-tile counters (each launch leaves them zero again); one buffer per width,
    reused by the launches of one stream in turn."""
    return cupy().zeros(tiles, dtype=np.uint32)


def column_sums(x: Any, out_dtype: Any) -> Any:
    """x (rows, C) contiguous float16/bfloat16/float32 -> (C,) column sums in out_dtype, float32
    accumulation, one launch, the same bits every run."""
    cp = cupy()
    rows, C = x.shape
    tiles = (C + 31) // 32
    out = empty(C, out_dtype)
    slices = max(1, min(_COLSUM_SLICES, rows // 128))
    partial = empty((slices, C), np.float32)
    counters = _colsum_counters(tiles, cp.cuda.runtime.getDevice())
    _colsum_kernel(backend.dtype_name(x.dtype), backend.dtype_name(out.dtype))(
        (tiles, slices), (32, 8), (x, out, partial, counters, np.int64(rows), np.int32(C)))
    return out
