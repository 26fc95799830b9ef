"""Global-norm gradient clipping and the fp16 loss scaler's unscale, over many tensors at once.

The references (nn/utils.py: `clip_grad_norm_`, nn/amp.py: `LossScaler.unscale_`) loop over the
gradients with a few array calls each: on the GPU, two or three kernel launches per parameter,
hundreds per step. Here the same formulas run as multi-tensor kernels (the chunk tables of
tensor/cuda/adam.py): each thread block takes one CHUNK of one tensor.

    sum_of_squares_multi   sum over every tensor and element of g^2 (float32): 2 launches
    clip_multi             g *= min(1, max_norm / (sqrt(sumsq) + 1e-6)) unless not finite: 1 launch
    unscale_multi          g *= 1/scale, and a device flag set when some result is inf/nan: 1 launch
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor.cuda.adam import CHUNK, chunk_tables, pinned_upload
from tensor.cuda.common import cupy, empty, usable

__all__ = ["supports", "sum_of_squares_multi", "clip_multi", "unscale_multi"]


def supports(*arrays: Any) -> bool:
    """The kernels here apply: contiguous float32 CuPy arrays, fast paths on."""
    return all(a.dtype == np.float32 for a in arrays) and usable(*arrays)


_NORM_MULTI = r"""
// Global-norm clipping over many float32 tensors (multi-tensor apply, as adam_multi).
// sumsq_multi: block b writes the sum of squares of its chunk to partial[b] (summed afterwards
// in a fixed order, so the norm is reproducible).
extern "C" __global__ void sumsq_multi(const unsigned long long* ptrs, const long long* sizes,
                                       const int* chunk_tensor, const long long* chunk_offset, int chunk,
                                       float* partial) {
    __shared__ float sh[32];
    int t = chunk_tensor[blockIdx.x];
    long long start = chunk_offset[blockIdx.x];
    long long end = min(start + (long long)chunk, sizes[t]);
    const float* g = (const float*)ptrs[t];
    float s = 0.0f;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) s += g[i] * g[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffff, s, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < (blockDim.x + 31) / 32; ++w) total += sh[w];
        partial[blockIdx.x] = total;
    }
}
// clip_multi: g *= min(1, max_norm / (sqrt(sumsq) + 1e-6)); nothing changes when the norm is not finite
extern "C" __global__ void clip_multi(const unsigned long long* ptrs, const long long* sizes,
                                      const int* chunk_tensor, const long long* chunk_offset, int chunk,
                                      const float* sumsq, float max_norm) {
    float n = sqrtf(sumsq[0]);
    if (!isfinite(n)) return;
    float c = fminf(max_norm / (n + 1e-6f), 1.0f);
    if (c >= 1.0f) return;
    int t = chunk_tensor[blockIdx.x];
    long long start = chunk_offset[blockIdx.x];
    long long end = min(start + (long long)chunk, sizes[t]);
    float* g = (float*)ptrs[t];
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) g[i] *= c;
}
// unscale_multi: g *= inv (the loss scaler's 1/scale); found_inf[0] = 1 if any result is inf/nan
extern "C" __global__ void unscale_multi(const unsigned long long* ptrs, const long long* sizes,
                                         const int* chunk_tensor, const long long* chunk_offset, int chunk,
                                         float inv, int* found_inf) {
    int t = chunk_tensor[blockIdx.x];
    long long start = chunk_offset[blockIdx.x];
    long long end = min(start + (long long)chunk, sizes[t]);
    float* g = (float*)ptrs[t];
    bool bad = false;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float v = g[i] * inv;
        g[i] = v;
        bad |= !isfinite(v);
    }
    if (bad) found_inf[0] = 1;  // every writer writes the same value
}
"""


@functools.lru_cache(maxsize=None)
def _norm_module() -> Any:
    return cupy().RawModule(code=_NORM_MULTI)


def _tables(arrays: list, upload: Any) -> tuple:
    """((device tables of pointers, sizes, chunk tensor, chunk offset; CHUNK), number of chunks)."""
    sizes = [a.size for a in arrays]
    chunk_t, chunk_o = chunk_tables(sizes)
    return (upload(np.array([a.data.ptr for a in arrays], dtype=np.uint64)), upload(np.array(sizes, dtype=np.int64)),
            upload(np.array(chunk_t, dtype=np.int32)), upload(np.array(chunk_o, dtype=np.int64)),
            np.int32(CHUNK)), len(chunk_t)


def sum_of_squares_multi(arrays: list, upload: Any = None) -> tuple[Any, tuple]:
    """Sum of squares of many contiguous float32 CuPy arrays -> (0-d float32 array, tables for
    `clip_multi`). Two launches: per-chunk partial sums, then one reduction of the partials.
    upload: how the tables reach the device (a backend.HostToDevice; `pinned_upload()` by default)."""
    tables, n = _tables(arrays, upload or pinned_upload())
    if n == 0:  # only empty arrays
        return cupy().zeros((), dtype=np.float32), (tables, n)
    partial = empty(n, np.float32)
    _norm_module().get_function("sumsq_multi")((n,), (256,), tables + (partial,))
    return partial.sum(), (tables, n)


def unscale_multi(arrays: list, inv: float, upload: Any = None) -> Any:
    """In place: every contiguous float32 CuPy array *= inv; returns a 1-element int32 device
    flag, 1 when some result is not finite (the loss scaler's overflow check), in one launch."""
    args, n = _tables(arrays, upload or pinned_upload())
    found = cupy().zeros(1, dtype=np.int32)
    if n:
        _norm_module().get_function("unscale_multi")((n,), (256,), args + (np.float32(inv), found))
    return found


def clip_multi(tables: tuple, sumsq: Any, max_norm: float) -> None:
    """In place, on the device: every array *= min(1, max_norm / (sqrt(sumsq) + 1e-6)), unless the
    norm is not finite. tables: from `sum_of_squares_multi` over the same arrays."""
    args, n = tables
    if n:
        _norm_module().get_function("clip_multi")((n,), (256,), args + (sumsq, np.float32(max_norm)))
