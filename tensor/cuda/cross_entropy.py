"""Cross-entropy on the GPU: the reference formulas (tensor/functional.py: CrossEntropy) as one
kernel per pass, a thread block per row: log-sum-exp and the NLL forward, softmax - onehot
backward, in float32."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.backend import array_module
from tensor.cuda.common import CTYPE, FLOATS, empty, threads, usable
from tensor.cuda.rows import row_module
from tensor.functional import CrossEntropy

CE_KERNELS = r"""
// cross-entropy forward per row: lse = log sum exp(x); nll = lse - x[t] (0 where t == ignore)
template <typename T>
__global__ void ce_fwd(const T* x, const long long* t, float* lse_out, float* nll_out, int C, long long ignore) {
    __shared__ float sh[32];
    long long off = (long long)blockIdx.x * C;
    float m = -__int_as_float(0x7f800000);  // -inf
    for (int j = threadIdx.x; j < C; j += blockDim.x) m = fmaxf(m, (float)x[off + j]);
    m = block_max(m, sh);
    float z = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) z += __expf((float)x[off + j] - m);
    z = block_sum(z, sh);
    if (threadIdx.x == 0) {
        float lse = m + __logf(z);
        long long ti = t[blockIdx.x];
        lse_out[blockIdx.x] = lse;
        nll_out[blockIdx.x] = (ti == ignore) ? 0.0f : lse - (float)x[off + ti];
    }
}

// cross-entropy backward: dx_j = (exp(x_j - lse) - [j == t]) * scale, 0 for ignored rows
template <typename T>
__global__ void ce_bwd(const T* x, const long long* t, const float* lse, const float* scale, T* dx, int C,
                       long long ignore) {
    long long off = (long long)blockIdx.x * C;
    long long ti = t[blockIdx.x];
    float sc = (ti == ignore) ? 0.0f : scale[0];
    float l = lse[blockIdx.x];
    for (int j = threadIdx.x; j < C; j += blockDim.x)
        dx[off + j] = (T)((__expf((float)x[off + j] - l) - (j == ti ? 1.0f : 0.0f)) * sc);
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(expr: str) -> Any:
    names = tuple(f"ce_{k}<{CTYPE[t]}>" for t in FLOATS for k in ("fwd", "bwd"))
    return row_module(CE_KERNELS, names).get_function(expr)


def cross_entropy_forward(x: Any, t: Any, ignore_index: int) -> tuple[Any, Any]:
    """x (N, C) contiguous, t (N,) int -> (lse (N,) float32, nll (N,) float32 with 0 for ignored rows)."""
    N, C = x.shape
    lse, nll = empty(N, np.float32), empty(N, np.float32)
    _kernel(f"ce_fwd<{CTYPE[backend.dtype_name(x.dtype)]}>")((N,), (threads(C),),
                                            (x, t.astype(np.int64, copy=False), lse, nll, np.int32(C), np.int64(ignore_index)))
    return lse, nll


def cross_entropy_backward(x: Any, t: Any, lse: Any, scale: Any, ignore_index: int) -> Any:
    """dx (N, C) like x = (softmax(x) - onehot(t)) * scale per row (0 for ignored rows); scale a
    1-element float32 array."""
    N, C = x.shape
    dx = empty(x.shape, x.dtype)
    _kernel(f"ce_bwd<{CTYPE[backend.dtype_name(x.dtype)]}>")((N,), (threads(C),),
                                            (x, t.astype(np.int64, copy=False), lse, scale.astype(np.float32).reshape(1),
                                             dx, np.int32(C), np.int64(ignore_index)))
    return dx


class CrossEntropyCUDA(CrossEntropy):
    """Cross-entropy as one kernel per pass; saves the logits (N, C), targets and log-sum-exps."""

    @staticmethod
    def supports(logits: Any, targets: Any = None, **kwargs: Any) -> bool:
        """Contiguous CuPy float16/bfloat16/float32 logits."""
        return usable(logits)

    def forward(self, logits, targets, ignore_index=-100):
        t, _ = self.prepare(logits, targets, ignore_index)
        x = logits.reshape(-1, logits.shape[-1])
        lse, nll = cross_entropy_forward(x, t, ignore_index)
        self.save_for_backward(x, t, lse)
        return (nll.sum() / array_module(x).maximum(self.n_valid, 1)).astype(self.out_dtype)

    def backward(self, g):
        x, t, lse = self.saved
        scale = g.astype(np.float32) / array_module(x).maximum(self.n_valid, 1)
        dx = cross_entropy_backward(x, t, lse, scale, self.ignore_index)
        # dx itself when the logits were (N, C): a reshaped view would make the engine copy a leaf's .grad
        return (dx if dx.shape == self.in_shape else dx.reshape(self.in_shape)), None
