"""GELU on the GPU: the reference formula (tensor/ops/elementwise.py: Gelu) as one elementwise
kernel each way, computed in float32 whatever the storage dtype.

Bandwidth-bound by construction: each thread moves 16 bytes per load (8 bfloat16/float16 or 4
float32 values through one uint4), a grid-stride loop over those vectors, the few trailing
elements (n not a multiple of the vector) by the first threads of the grid. Arrays whose address
is not 16-byte aligned (a view at an odd offset) take the same kernel with one element per vector.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import CTYPE, FLOATS, GRID_THREADS, cupy, empty, grid_blocks, usable
from tensor.ops.elementwise import Gelu

GELU_KERNELS = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define K0 0.7978845608028654f   // sqrt(2/pi)
#define K1 0.044715f
// y = 0.5 x (1 + tanh(u)), u = K0 (x + K1 x^3); computed as x * sigmoid(2u), since
// 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)): one fast exponential instead of tanhf
__device__ __forceinline__ float gelu_f(float x) {
    float u = K0 * (x + K1 * x * x * x);
    return x / (1.0f + __expf(-2.0f * u));
}
// dx = g (0.5 (1 + t) + 0.5 x (1 - t^2) K0 (1 + 3 K1 x^2)), t = tanh(u); with s = sigmoid(2u) =
// 0.5 (1 + t) and 1 - t^2 = 4 s (1 - s): dx = g (s + 2 x s (1 - s) K0 (1 + 3 K1 x^2))
__device__ __forceinline__ float dgelu_f(float x, float g) {
    float u = K0 * (x + K1 * x * x * x);
    float s = 1.0f / (1.0f + __expf(-2.0f * u));
    return g * (s + 2.0f * x * s * (1.0f - s) * K0 * (1.0f + 3.0f * K1 * x * x));
}
// V elements of T per vector (V * sizeof(T) == 16 when vectorized, V == 1 otherwise); W is the
// vector's storage type (uint4, or T itself)
template <typename T, typename W, int V>
__global__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ y, long long n) {
    long long nv = n / V, stride = (long long)gridDim.x * blockDim.x;
    long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = i0; i < nv; i += stride) {
        W raw = reinterpret_cast<const W*>(x)[i];
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int k = 0; k < V; ++k) e[k] = (T)gelu_f((float)e[k]);
        reinterpret_cast<W*>(y)[i] = raw;
    }
    long long t = nv * V + i0;   // the tail: fewer than V elements
    if (t < n) y[t] = (T)gelu_f((float)x[t]);
}
template <typename T, typename W, int V>
__global__ void gelu_bwd(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ dx, long long n) {
    long long nv = n / V, stride = (long long)gridDim.x * blockDim.x;
    long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = i0; i < nv; i += stride) {
        W rx = reinterpret_cast<const W*>(x)[i];
        W rg = reinterpret_cast<const W*>(g)[i];
        T* ex = reinterpret_cast<T*>(&rx);
        const T* eg = reinterpret_cast<const T*>(&rg);
#pragma unroll
        for (int k = 0; k < V; ++k) ex[k] = (T)dgelu_f((float)ex[k], (float)eg[k]);
        reinterpret_cast<W*>(dx)[i] = rx;
    }
    long long t = nv * V + i0;
    if (t < n) dx[t] = (T)dgelu_f((float)x[t], (float)g[t]);
}
"""

def _targs(t: str, vector: bool) -> str:
    c = CTYPE[t]
    if not vector:
        return f"{c},{c},1"
    return f"{c},uint4,{4 if t == 'float32' else 8}"


@functools.lru_cache(maxsize=None)
def _module() -> Any:
    names = [f"gelu_{d}<{_targs(t, v)}>" for t in FLOATS for v in (True, False) for d in ("fwd", "bwd")]
    return cupy().RawModule(code=GELU_KERNELS, options=("--std=c++14",), name_expressions=names)


@functools.lru_cache(maxsize=None)
def _kernel(name: str) -> Any:
    return _module().get_function(name)


def _launch(which: str, arrays: tuple, n: int) -> None:
    t = backend.dtype_name(arrays[0].dtype)
    vector = all(a.data.ptr % 16 == 0 for a in arrays)
    per = (4 if t == "float32" else 8) if vector else 1
    _kernel(f"gelu_{which}<{_targs(t, vector)}>")((grid_blocks(n // per),), (GRID_THREADS,), arrays + (np.int64(n),))


def gelu_forward(x: Any) -> Any:
    """y = gelu(x): x contiguous float16/bfloat16/float32 -> y, same shape and dtype."""
    y = empty(x.shape, x.dtype)
    if x.size:
        _launch("fwd", (x, y), x.size)
    return y


def gelu_backward(x: Any, g: Any) -> Any:
    """dx = g * gelu'(x): x, g contiguous, one dtype, one shape -> dx like x."""
    dx = empty(x.shape, x.dtype)
    if x.size:
        _launch("bwd", (x, g, dx), x.size)
    return dx


class GeluCUDA(Gelu):
    """GELU as one kernel each way; saves only the input."""

    @staticmethod
    def supports(a: Any) -> bool:
        """A contiguous CuPy float16/bfloat16/float32 array (tensor/cuda/common.py: usable)."""
        return usable(a)

    def forward(self, a):
        self.save_for_backward(a)
        return gelu_forward(a)

    def backward(self, g):
        x = self.saved[0]
        if g.dtype != x.dtype or not g.flags.c_contiguous:  # the kernel takes g like x (0-d stays 0-d)
            g = g.astype(x.dtype, order="C")
        return (gelu_backward(x, g),)
