"""The Adam update on the GPU: one fused kernel per parameter, or one launch for many.

The reference (nn/optim.py: `adam_reference`) is a chain of ~13 array calls: on the GPU each is a
kernel launch that reads and writes whole arrays. Here the update is one pass over memory, the
same formulas computed in double and rounded once into p, m and v:

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p = p*decay - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)

with bc1 = 1 - b1^t, bc2 = 1 - b2^t (bias corrections) and decay = 1 - lr*wd (AdamW; 1 for Adam).

    adam_step    one parameter of any of float16/bfloat16/float32 (an ElementwiseKernel)
    adam_multi   many float32 parameters in one launch (a "multi-tensor apply": each thread
                 block updates one CHUNK of one tensor, found through small device tables)

`chunk_tables` and `pinned_upload` are shared with the other multi-tensor kernels (tensor/cuda/clip.py).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import cupy, usable

__all__ = ["supports", "supports_multi", "adam_step", "adam_multi", "CHUNK", "chunk_tables", "pinned_upload"]

CHUNK = 1 << 16  # elements per thread block in the multi-tensor kernels


def supports(p: Any, g: Any, m: Any, v: Any) -> bool:
    """`adam_step` applies: contiguous CuPy float16/bfloat16/float32 arrays of one dtype, fast paths on."""
    return usable(p, g, m, v) and g.dtype == p.dtype == m.dtype == v.dtype


def supports_multi(p: Any, g: Any, m: Any, v: Any) -> bool:
    """`adam_multi` applies: contiguous float32 CuPy arrays, fast paths on."""
    return p.dtype == np.float32 and supports(p, g, m, v)


@functools.lru_cache(maxsize=None)
def _adam_kernel() -> Any:
    # m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p = p*decay - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
    return cupy().ElementwiseKernel(
            "T g, float64 lr, float64 b1, float64 b2, float64 eps, float64 bc1, float64 sqrt_bc2, float64 decay",
            "T p, T m, T v", """
            double gd = (double)g;
            double md = b1 * (double)m + (1.0 - b1) * gd;
            double vd = b2 * (double)v + (1.0 - b2) * gd * gd;
            m = (T)md; v = (T)vd;
            p = (T)((double)p * decay - (lr / bc1) * md / (sqrt(vd) / sqrt_bc2 + eps));""", "tglm_adam")


def adam_step(p: Any, g: Any, m: Any, v: Any, lr: float, beta1: float, beta2: float, eps: float,
              step: int, decay: float = 1.0) -> None:
    """In place: the Adam moments and p <- p * decay - lr * m_hat / (sqrt(v_hat) + eps)."""
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    _adam_kernel()(g, lr, beta1, beta2, eps, bc1, bc2 ** 0.5, decay, p, m, v)


_ADAM_MULTI = r"""
// One launch updates many float32 parameters (a "multi-tensor apply"): block b handles chunk b,
// which belongs to tensor chunk_tensor[b] and starts at chunk_offset[b]. Per tensor: pointers to
// p, g, m, v and 7 numbers: lr, decay, beta1, beta2, eps, 1 - beta1^t, sqrt(1 - beta2^t).
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p = p*decay - lr/bc1 * m / (sqrt(v)/sqrt_bc2 + eps)
__device__ __forceinline__ void adam_one(float& p, float g, float& m, float& v, const double* h) {
    double gd = (double)g;
    double md = h[2] * (double)m + (1.0 - h[2]) * gd;
    double vd = h[3] * (double)v + (1.0 - h[3]) * gd * gd;
    m = (float)md;
    v = (float)vd;
    p = (float)((double)p * h[1] - (h[0] / h[5]) * md / (sqrt(vd) / h[6] + h[4]));
}
extern "C" __global__ void adam_multi(const unsigned long long* ptrs, const long long* sizes, const double* hp,
                                      const int* chunk_tensor, const long long* chunk_offset, int chunk) {
    int t = chunk_tensor[blockIdx.x];
    long long start = chunk_offset[blockIdx.x];
    long long end = min(start + (long long)chunk, sizes[t]);
    float* p = (float*)ptrs[4 * t];
    const float* g = (const float*)ptrs[4 * t + 1];
    float* m = (float*)ptrs[4 * t + 2];
    float* v = (float*)ptrs[4 * t + 3];
    const double* h = hp + 7 * t;   // lr, decay, b1, b2, eps, bc1, sqrt_bc2
    long long i = start;
    // 16-byte loads and stores where the four arrays allow them (chunks start at multiples of 4 elements)
    if (((ptrs[4 * t] | ptrs[4 * t + 1] | ptrs[4 * t + 2] | ptrs[4 * t + 3]) & 15) == 0) {
        const long long vend = start + (end - start) / 4 * 4;
        for (long long j = start + 4 * threadIdx.x; j < vend; j += 4 * blockDim.x) {
            float4 pv = *(float4*)(p + j), mv = *(float4*)(m + j), vv = *(float4*)(v + j);
            const float4 gv = *(const float4*)(g + j);
            adam_one(pv.x, gv.x, mv.x, vv.x, h);
            adam_one(pv.y, gv.y, mv.y, vv.y, h);
            adam_one(pv.z, gv.z, mv.z, vv.z, h);
            adam_one(pv.w, gv.w, mv.w, vv.w, h);
            *(float4*)(p + j) = pv; *(float4*)(m + j) = mv; *(float4*)(v + j) = vv;
        }
        i = vend;
    }
    for (i += threadIdx.x; i < end; i += blockDim.x) adam_one(p[i], g[i], m[i], v[i], h);
}
"""


@functools.lru_cache(maxsize=None)
def _adam_multi_kernel() -> Any:
    return cupy().RawKernel(_ADAM_MULTI, "adam_multi")


@functools.lru_cache(maxsize=None)
def pinned_upload() -> backend.HostToDevice:
    """The uploader of the multi-tensor kernels' small tables when the caller gives none: through
    pinned memory, so that the copies queue behind the GPU's work instead of waiting for it."""
    return backend.HostToDevice()


def chunk_tables(sizes: list) -> tuple[list, list]:
    """Split tensors of the given sizes into CHUNK-element chunks: (tensor index, start) per chunk."""
    chunk_t, chunk_o = [], []
    for t, n in enumerate(sizes):
        starts = range(0, n, CHUNK)
        chunk_t += [t] * len(starts)
        chunk_o += list(starts)
    return chunk_t, chunk_o


def adam_multi(updates: list, upload: Any = None) -> None:
    """Apply the Adam update to many float32 CuPy parameters in one kernel launch.

    updates: (p, g, m, v, lr, decay, beta1, beta2, eps, step) per parameter, arrays contiguous
    (see `supports_multi`). Same formulas as `adam_step`. upload: how the small tables reach the
    device (a backend.HostToDevice; `pinned_upload()` by default)."""
    upload = upload or pinned_upload()
    ptrs, sizes, hp = [], [], []
    for p, g, m, v, lr, decay, b1, b2, eps, step in updates:
        ptrs += [p.data.ptr, g.data.ptr, m.data.ptr, v.data.ptr]
        sizes.append(p.size)
        hp += [lr, decay, b1, b2, eps, 1.0 - b1 ** step, (1.0 - b2 ** step) ** 0.5]
    chunk_t, chunk_o = chunk_tables(sizes)
    if not chunk_t:  # nothing but empty parameters: no blocks to launch
        return
    args = (upload(np.array(ptrs, dtype=np.uint64)), upload(np.array(sizes, dtype=np.int64)),
            upload(np.array(hp, dtype=np.float64)), upload(np.array(chunk_t, dtype=np.int32)),
            upload(np.array(chunk_o, dtype=np.int64)), np.int32(CHUNK))
    _adam_multi_kernel()((len(chunk_t),), (256,), args)
