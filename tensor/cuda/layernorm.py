"""LayerNorm on the GPU: the reference formulas (tensor/functional.py: LayerNorm) as one kernel
each way, a thread block per row (statistics in float32, double for float64 data); the weight
and bias gradients are column sums (tensor/cuda/colsum.py, through functional.sum_rows).

Mixed precision: the output may be in another dtype than x (out_dtype: a float32 residual stream
normalized straight into the 16-bit input of the next product, no separate cast pass), and the
incoming gradient then comes in that dtype too (the product's dx): the kernels take the three
dtypes as template arguments, x's T, y's / g's O, the statistics' A."""
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
template <typename T, typename O, typename A>
__global__ void ln_fwd(const T* x, const T* w, const T* b, O* y, A* mean_out, A* rstd_out, int C, A eps,
                       int has_w, int has_b) {
    __shared__ A sh[32];
    const T* xr = x + (long long)blockIdx.x * C;
    O* yr = y + (long long)blockIdx.x * C;
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
        yr[j] = (O)v;
    }
    if (threadIdx.x == 0) { mean_out[blockIdx.x] = mean; rstd_out[blockIdx.x] = rstd; }
}

// LayerNorm backward: dxhat = g*w; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat*xhat))
// (and, when gxh is wanted, gxh = g * xhat: its column sums are the weight's gradient)
template <typename T, typename O, typename A>
__global__ void ln_bwd(const T* x, const T* w, const O* g, const A* mean_in, const A* rstd_in, T* dx, int C,
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
    names = tuple(f"ln_{k}<{_targs(t, o)}>" for t in FLOATS for o in FLOATS for k in ("fwd", "bwd"))
    return row_module(LN_KERNELS, names).get_function(expr)


def _targs(t: str, o: str) -> str:
    return f"{CTYPE[t]},{CTYPE[o]},{ACC[t]}"


def layer_norm_forward(x: Any, w: Any, b: Any, eps: float, out_dtype: Any = None) -> tuple[Any, Any, Any]:
    """x (..., C) contiguous -> (y of x's shape in out_dtype (default x's; float16/bfloat16/float32),
    mean (rows,), rstd (rows,)) with statistics in float32 (double for float64); w, b (C,) in x's dtype or None."""
    C = x.shape[-1]
    rows = x.size // C
    acc = np.float64 if x.dtype == np.float64 else np.float32
    y = empty(x.shape, x.dtype if out_dtype is None else out_dtype)
    mean, rstd = empty(rows, acc), empty(rows, acc)
    _kernel(f"ln_fwd<{_targs(backend.dtype_name(x.dtype), backend.dtype_name(y.dtype))}>")(
        (rows,), (threads(C),),
        (x, w if w is not None else x, b if b is not None else x, y, mean, rstd, np.int32(C),
         acc(eps), np.int32(w is not None), np.int32(b is not None)))
    return y, mean, rstd


def layer_norm_backward(x: Any, w: Any, g: Any, mean: Any, rstd: Any, want_gxhat: bool = False) -> tuple[Any, Any]:
    """g contiguous, x's shape, any of float16/bfloat16/float32 -> (dx like x, g * xhat like x or
    None): the second's column sums are dweight."""
    C = x.shape[-1]
    rows = x.size // C
    dx = empty(x.shape, x.dtype)
    gxh = empty(x.shape, x.dtype) if want_gxhat else None
    _kernel(f"ln_bwd<{_targs(backend.dtype_name(x.dtype), backend.dtype_name(g.dtype))}>")(
        (rows,), (threads(C),), (x, w if w is not None else x, g, mean, rstd, dx, np.int32(C), np.int32(w is not None),
                                 gxh if want_gxhat else dx, np.int32(want_gxhat)))
    return dx, gxh


class LayerNormCUDA(LayerNorm):
    """LayerNorm as one kernel each way; saves x, mean, rstd and the weight."""

    @staticmethod
    def supports(x: Any, weight: Any = None, bias: Any = None, **kwargs: Any) -> bool:
        """Contiguous CuPy float16/bfloat16/float32 arrays, the parameters in x's dtype."""
        return all(p is None or p.dtype == x.dtype for p in (weight, bias)) and usable(x, weight, bias)

    def forward(self, x, weight=None, bias=None, eps=1e-5, out_dtype=None):
        self.prepare(x, weight, bias, out_dtype)
        fused = backend.dtype_name(self.out_dtype) in FLOATS  # (else one cast after, e.g. to float64)
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps, self.out_dtype if fused else None)
        self.save_for_backward(x, mean, rstd, weight)
        return y if fused else y.astype(self.out_dtype)

    def backward(self, g):
        x, mean, rstd, weight = self.saved
        if backend.dtype_name(g.dtype) not in FLOATS:
            g = g.astype(x.dtype)
        g = array_module(x).ascontiguousarray(g)
        need_w = self.need_w
        dx, gxhat = layer_norm_backward(x, weight, g, mean, rstd, want_gxhat=need_w)
        dw = sum_rows(gxhat, weight.dtype) if need_w else None
        db = sum_rows(g, self.b_dtype) if self.need_b else None
        return dx, dw, db
