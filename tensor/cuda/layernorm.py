"""LayerNorm on the GPU: the reference formulas (tensor/functional.py: LayerNorm) as one kernel
each way, a thread block per row (statistics in float32, double for float64 data); the weight
and bias gradients are column sums (tensor/cuda/colsum.py, through functional.sum_rows)."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.backend import array_module
from tensor.cuda.common import ACC, CTYPE, FLOATS, empty, threads, usable
from tensor.cuda.rows import row_module
from tensor.functional import LayerNorm, sum_rows

LN_KERNELS = r"""
// LayerNorm forward over rows of length C: xhat = (x - mean) * rstd; y = xhat * w + b
template <typename T, typename A>
__global__ void ln_fwd(const T* x, const T* w, const T* b, T* y, A* mean_out, A* rstd_out, int C, A eps,
                       int has_w, int has_b) {
    __shared__ A sh[32];
    const T* xr = x + (long long)blockIdx.x * C;
    T* yr = y + (long long)blockIdx.x * C;
    A s = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) s += (A)xr[j];
    A mean = block_sum(s, sh) / C;
    A q = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) { A d = (A)xr[j] - mean; q += d * d; }
    A rstd = rsqrt(block_sum(q, sh) / C + eps);
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        A v = ((A)xr[j] - mean) * rstd;
        if (has_w) v *= (A)w[j];
        if (has_b) v += (A)b[j];
        yr[j] = (T)v;
    }
    if (threadIdx.x == 0) { mean_out[blockIdx.x] = mean; rstd_out[blockIdx.x] = rstd; }
}

// LayerNorm backward: dxhat = g*w; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat*xhat))
// (and, when gxh is wanted, gxh = g * xhat: its column sums are the weight's gradient)
template <typename T, typename A>
__global__ void ln_bwd(const T* x, const T* w, const T* g, const A* mean_in, const A* rstd_in, T* dx, int C,
                       int has_w, T* gxh, int want_gxh) {
    __shared__ A sh[32];
    long long off = (long long)blockIdx.x * C;
    A mean = mean_in[blockIdx.x], rstd = rstd_in[blockIdx.x];
    A s1 = 0, s2 = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        A xh = ((A)x[off + j] - mean) * rstd;
        A dxh = (A)g[off + j] * (has_w ? (A)w[j] : (A)1);
        s1 += dxh; s2 += dxh * xh;
    }
    A m1 = block_sum(s1, sh) / C;
    A m2 = block_sum(s2, sh) / C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        A xh = ((A)x[off + j] - mean) * rstd;
        A dxh = (A)g[off + j] * (has_w ? (A)w[j] : (A)1);
        dx[off + j] = (T)(rstd * (dxh - m1 - xh * m2));
        if (want_gxh) gxh[off + j] = (T)((A)g[off + j] * xh);
    }
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(expr: str) -> Any:
    names = tuple(f"ln_{k}<{CTYPE[t]},{ACC[t]}>" for t in FLOATS for k in ("fwd", "bwd"))
    return row_module(LN_KERNELS, names).get_function(expr)


def layer_norm_forward(x: Any, w: Any, b: Any, eps: float) -> tuple[Any, Any, Any]:
    """x (..., C) contiguous -> (y like x, mean (rows,), rstd (rows,)) with statistics in float32
    (double for float64); w, b (C,) in x's dtype or None."""
    C = x.shape[-1]
    rows = x.size // C
    acc = np.float64 if x.dtype == np.float64 else np.float32
    y = empty(x.shape, x.dtype)
    mean, rstd = empty(rows, acc), empty(rows, acc)
    t = backend.dtype_name(x.dtype)
    _kernel(f"ln_fwd<{CTYPE[t]},{ACC[t]}>")(
        (rows,), (threads(C),),
        (x, w if w is not None else x, b if b is not None else x, y, mean, rstd, np.int32(C),
         acc(eps), np.int32(w is not None), np.int32(b is not None)))
    return y, mean, rstd


def layer_norm_backward(x: Any, w: Any, g: Any, mean: Any, rstd: Any, want_gxhat: bool = False) -> tuple[Any, Any]:
    """-> (dx like x, g * xhat like x or None): the second's column sums are dweight."""
    C = x.shape[-1]
    rows = x.size // C
    dx = empty(x.shape, x.dtype)
    gxh = empty(x.shape, x.dtype) if want_gxhat else None
    t = backend.dtype_name(x.dtype)
    _kernel(f"ln_bwd<{CTYPE[t]},{ACC[t]}>")(
        (rows,), (threads(C),), (x, w if w is not None else x, g, mean, rstd, dx, np.int32(C), np.int32(w is not None),
                                 gxh if want_gxhat else dx, np.int32(want_gxhat)))
    return dx, gxh


class LayerNormCUDA(LayerNorm):
    """LayerNorm as one kernel each way; saves x, mean, rstd and the weight."""

    @staticmethod
    def supports(x: Any, weight: Any = None, bias: Any = None, **kwargs: Any) -> bool:
        """Contiguous CuPy float16/bfloat16/float32 arrays, the parameters in x's dtype."""
        return all(p is None or p.dtype == x.dtype for p in (weight, bias)) and usable(x, weight, bias)

    def forward(self, x, weight=None, bias=None, eps=1e-5):
        self.prepare(x, weight, bias)
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps)
        self.save_for_backward(x, mean, rstd, weight)
        return y

    def backward(self, g):
        x, mean, rstd, weight = self.saved
        g = array_module(x).ascontiguousarray(g)
        need_w = self.need_w
        dx, gxhat = layer_norm_backward(x, weight, g, mean, rstd, want_gxhat=need_w)
        dw = sum_rows(gxhat, weight.dtype) if need_w else None
        db = sum_rows(g) if self.need_b else None
        return dx, dw, db
