"""A float32 tensor plus a 16-bit one in one kernel: the residual add of a mixed-precision branch
(a bfloat16/float16 c_proj output) into the float32 residual stream, out = a + float(b), where the
reference (tensor/ops/elementwise.py: Add) runs CuPy's promotion: a cast kernel, then the add.
The backward gives g to each side, b's narrowed to b's dtype by a second kernel (`narrow`, vectorized like
add_widen; CuPy's astype is an element-at-a-time kernel).

Each thread reads 4 float32 (one float4) and 4 16-bit values (one uint2) per step of a grid-stride
loop, the few trailing elements by the first threads; arrays not aligned for that (a view at an odd
offset) take the same kernel one element at a time.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import CTYPE, GRID_THREADS, cupy, empty, grid_blocks, usable
from tensor.ops.elementwise import Add

ADD_WIDEN = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// y = a + (float)b: a, y float32, b 16-bit; V = 4 (float4 / uint2 vectors) or 1
template <typename B, int V>
__global__ void add_widen(const float* __restrict__ a, const B* __restrict__ b, float* __restrict__ y,
                          long long n) {
    long long nv = n / V, stride = (long long)gridDim.x * blockDim.x;
    long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = i0; i < nv; i += stride) {
        if (V == 4) {
            float4 va = reinterpret_cast<const float4*>(a)[i];
            uint2 rb = reinterpret_cast<const uint2*>(b)[i];
            const B* eb = reinterpret_cast<const B*>(&rb);
            va.x += (float)eb[0]; va.y += (float)eb[1]; va.z += (float)eb[2]; va.w += (float)eb[3];
            reinterpret_cast<float4*>(y)[i] = va;
        } else {
            y[i] = a[i] + (float)b[i];
        }
    }
    long long t = nv * V + i0;   // the tail: fewer than V elements
    if (t < n) y[t] = a[t] + (float)b[t];
}
// y = (B)a, rounded to nearest even: the residual gradient (float32) into the 16-bit branch; V as above
template <typename B, int V>
__global__ void narrow(const float* __restrict__ a, B* __restrict__ y, long long n) {
    long long nv = n / V, stride = (long long)gridDim.x * blockDim.x;
    long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = i0; i < nv; i += stride) {
        if (V == 4) {
            const float4 va = reinterpret_cast<const float4*>(a)[i];
            uint2 r;
            B* e = reinterpret_cast<B*>(&r);
            e[0] = (B)va.x; e[1] = (B)va.y; e[2] = (B)va.z; e[3] = (B)va.w;
            reinterpret_cast<uint2*>(y)[i] = r;
        } else {
            y[i] = (B)a[i];
        }
    }
    long long t = nv * V + i0;
    if (t < n) y[t] = (B)a[t];
}
"""
LOW = ("float16", "bfloat16")


@functools.lru_cache(maxsize=None)
def _module() -> Any:
    names = [f"{k}<{CTYPE[t]},{v}>" for k in ("add_widen", "narrow") for t in LOW for v in (4, 1)]
    return cupy().RawModule(code=ADD_WIDEN, options=("--std=c++14",), name_expressions=names)


@functools.lru_cache(maxsize=None)
def _kernel(name: str) -> Any:
    return _module().get_function(name)


def add_widen(a: Any, b: Any) -> Any:
    """a (float32) + b (float16/bfloat16), both contiguous, one shape -> float32 (same shape), one kernel."""
    y = empty(a.shape, np.float32)
    n = a.size
    if n:
        vector = a.data.ptr % 16 == 0 and y.data.ptr % 16 == 0 and b.data.ptr % 8 == 0
        v = 4 if vector else 1
        _kernel(f"add_widen<{CTYPE[backend.dtype_name(b.dtype)]},{v}>")((grid_blocks(n // v),), (GRID_THREADS,),
                                                                        (a, b, y, np.int64(n)))
    return y


def narrow(a: Any, dtype: Any) -> Any:
    """a (float32, contiguous) -> the same values in dtype (float16/bfloat16), one vectorized pass (CuPy's
    astype is an element-at-a-time kernel at about a third of the memory bandwidth)."""
    y = empty(a.shape, dtype)
    n = a.size
    if n:
        v = 4 if a.data.ptr % 16 == 0 and y.data.ptr % 8 == 0 else 1
        _kernel(f"narrow<{CTYPE[backend.dtype_name(y.dtype)]},{v}>")((grid_blocks(n // v),), (GRID_THREADS,),
                                                                     (a, y, np.int64(n)))
    return y


def widening_pair(a: Any, b: Any) -> bool:
    """True when one of a, b is float32 and the other float16/bfloat16, one shape, both contiguous
    CuPy arrays (what add_widen takes, in either order)."""
    if not hasattr(a, "shape") or not hasattr(b, "shape") or a.shape != b.shape or not usable(a, b):
        return False
    ta, tb = backend.dtype_name(a.dtype), backend.dtype_name(b.dtype)
    return (ta == "float32" and tb in LOW) or (tb == "float32" and ta in LOW)


class AddCUDA(Add):
    """Add of a float32 and a 16-bit array of one shape as one kernel (tensor/dispatch.py picks it
    only for adds of two dtypes: tensor/tensor.py, Tensor.__add__)."""

    @staticmethod
    def supports(a: Any, b: Any) -> bool:
        return widening_pair(a, b)

    def forward(self, a, b):
        self.low = 1 if a.dtype == np.float32 else 0   # which input is the 16-bit one
        self.low_dtype = (a, b)[self.low].dtype
        return add_widen(a, b) if self.low else add_widen(b, a)

    def backward(self, g):
        # one shape: nothing to sum back; the 16-bit side's gradient is g in its dtype, narrowed here in one
        # vectorized pass (else the engine's astype)
        low = narrow(g, self.low_dtype) if usable(g) and g.dtype == np.float32 else g
        return (g, low) if self.low else (low, g)
