"""Cross-entropy on the GPU: the reference formulas (tensor/functional.py: CrossEntropy) as one
kernel per pass, a thread block per row: log-sum-exp and the NLL forward, softmax - onehot
backward, accumulated in float32 (double for float64 data).

Bandwidth-bound at a GPT-2 vocabulary (rows of 50304): the forward reads each row once, a running
max m and sum z = sum exp(x - m) per thread (rescaled when the max grows: an online log-sum-exp),
merged over the block (rows.py: block_merge_max_sum); both kernels move 16 bytes per load (8
bfloat16/float16, 4 float32, 2 float64 through an aligned Pack) when the rows allow it (C * itemsize
a multiple of 16, the arrays 16-byte aligned; VEC > 1), else one element per load (VEC = 1: e.g. the
unpadded vocabulary 50257). Each thread takes two loads per iteration, so both are in flight at once.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.backend import array_module
from tensor.cuda.common import ACC, CTYPE, FLOATS, empty, usable
from tensor.cuda.rows import row_module
from tensor.functional import CrossEntropy

CE_KERNELS = r"""
// VEC elements of T as one aligned load / store (16 bytes for VEC = 16 / sizeof(T))
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack { T e[VEC]; };

// the running (m, z) after the N values v (padding: -inf): one rescale of z per chunk
template <typename A, int N>
__device__ __forceinline__ void online_chunk(A& m, A& z, const A (&v)[N]) {
    A M = m;
#pragma unroll
    for (int k = 0; k < N; ++k) M = v[k] > M ? v[k] : M;
    if (M == -(A)__int_as_float(0x7f800000)) return;  // only -inf so far: nothing to add
    z *= acc_exp(m - M);                               // m = -inf (z = 0): 0
#pragma unroll
    for (int k = 0; k < N; ++k) z += acc_exp(v[k] - M);
    m = M;
}

// cross-entropy forward per row: lse = log sum exp(x); nll = lse - x[t] (0 where t == ignore), in A;
// VEC > 1: C % VEC == 0 and x 16-byte aligned (the caller checks)
template <typename T, typename A, int VEC>
__global__ void ce_fwd(const T* __restrict__ x, const long long* __restrict__ t, A* lse_out, A* nll_out, int C,
                       long long ignore) {
    __shared__ A shm[32], shz[32];
    const A NEG_INF = -(A)__int_as_float(0x7f800000);
    const T* xr = x + (long long)blockIdx.x * C;
    const int bd = blockDim.x;
    A m = NEG_INF, z = 0;
    if (VEC > 1) {
        const Pack<T, VEC>* xv = reinterpret_cast<const Pack<T, VEC>*>(xr);
        int nv = C / VEC;
        for (int i = threadIdx.x; i < nv; i += 2 * bd) {
            bool two = i + bd < nv;
            Pack<T, VEC> a = xv[i], b;
            if (two) b = xv[i + bd];
            A v[2 * VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                v[k] = (A)a.e[k];
                v[VEC + k] = two ? (A)b.e[k] : NEG_INF;
            }
            online_chunk(m, z, v);
        }
    } else {
        for (int j = threadIdx.x; j < C; j += 4 * bd) {
            A v[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) v[k] = j + k * bd < C ? (A)xr[j + k * bd] : NEG_INF;
            online_chunk(m, z, v);
        }
    }
    block_merge_max_sum(m, z, shm, shz);
    if (threadIdx.x == 0) {
        A lse = m + acc_log(z);
        long long ti = t[blockIdx.x];
        lse_out[blockIdx.x] = lse;
        nll_out[blockIdx.x] = (ti == ignore) ? (A)0 : lse - (A)xr[ti];
    }
}

// cross-entropy backward: dx_j = (exp(x_j - lse) - [j == t]) * scale, 0 for ignored rows (x not read);
// VEC > 1: C % VEC == 0 and x, dx 16-byte aligned
template <typename T, typename A, int VEC>
__device__ __forceinline__ Pack<T, VEC> ce_grad(const Pack<T, VEC>& p, int j0, long long ti, A l, A sc) {
    Pack<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.e[k] = (T)((acc_exp((A)p.e[k] - l) - (A)(j0 + k == ti)) * sc);
    return o;
}
template <typename T, typename A, int VEC>
__global__ void ce_bwd(const T* __restrict__ x, const long long* __restrict__ t, const A* __restrict__ lse,
                       const A* __restrict__ scale, T* __restrict__ dx, int C, long long ignore) {
    long long off = (long long)blockIdx.x * C;
    long long ti = t[blockIdx.x];
    const int bd = blockDim.x;
    const Pack<T, VEC>* xv = reinterpret_cast<const Pack<T, VEC>*>(x + off);
    Pack<T, VEC>* dv = reinterpret_cast<Pack<T, VEC>*>(dx + off);
    int nv = C / VEC;   // VEC = 1: every element
    if (ti == ignore) {
        Pack<T, VEC> zero;
#pragma unroll
        for (int k = 0; k < VEC; ++k) zero.e[k] = (T)(A)0;
        for (int i = threadIdx.x; i < nv; i += bd) dv[i] = zero;
        return;
    }
    A sc = scale[0], l = lse[blockIdx.x];
    for (int i = threadIdx.x; i < nv; i += 2 * bd) {
        bool two = i + bd < nv;
        Pack<T, VEC> a = xv[i], b;
        if (two) b = xv[i + bd];
        dv[i] = ce_grad(a, i * VEC, ti, l, sc);
        if (two) dv[i + bd] = ce_grad(b, (i + bd) * VEC, ti, l, sc);
    }
}
"""

DTYPES = FLOATS + ("float64",)   # float64 (gradcheck) is dispatched to the reference; the kernels take it too
# threads per row at a GPT-2 vocabulary: on an H200, (16384, 50304) bf16, the kernels alone took fwd 0.384 /
# bwd 0.829 ms at 256 and 0.439 / 0.813 at 512 (benchmarks/bench_fused_ops.py --ce-only, 2026-12-02)
MAX_THREADS = 256


def _vec(dtype_name: str) -> int:
    """Elements of a 16-byte load."""
    return 16 // {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype_name]


def _targs(dtype_name: str, vec: int) -> str:
    return f"{CTYPE[dtype_name]},{ACC[dtype_name]},{vec}"


@functools.lru_cache(maxsize=None)
def _kernel(expr: str) -> Any:
    names = tuple(f"ce_{k}<{_targs(t, v)}>" for t in DTYPES for v in (1, _vec(t)) for k in ("fwd", "bwd"))
    return row_module(CE_KERNELS, names).get_function(expr)


def _plan(*arrays: Any) -> tuple[str, int, int]:
    """(dtype name, VEC, threads per row) for rows of these (N, C) arrays: 16-byte loads when a row
    is a whole number of 16-byte vectors and every array starts 16-byte aligned."""
    name = backend.dtype_name(arrays[0].dtype)
    C, vec = arrays[0].shape[-1], _vec(name)
    if C % vec or any(a.data.ptr % 16 for a in arrays):
        vec = 1
    per_thread = 2 * vec if vec > 1 else 4       # elements a thread takes per iteration
    items = max(1, -(-C // per_thread))
    return name, vec, int(min(MAX_THREADS, max(32, 1 << (items - 1).bit_length())))


def cross_entropy_forward(x: Any, t: Any, ignore_index: int) -> tuple[Any, Any]:
    """x (N, C) contiguous, t (N,) int -> (lse (N,), nll (N,) with 0 for ignored rows), both float32
    (float64 for float64 x)."""
    N, C = x.shape
    name, vec, nt = _plan(x)
    acc = np.float64 if name == "float64" else np.float32
    lse, nll = empty(N, acc), empty(N, acc)
    if N:
        _kernel(f"ce_fwd<{_targs(name, vec)}>")((N,), (nt,), (x, t.astype(np.int64, copy=False), lse, nll, np.int32(C),
                                                              np.int64(ignore_index)))
    return lse, nll


def cross_entropy_backward(x: Any, t: Any, lse: Any, scale: Any, ignore_index: int) -> Any:
    """dx (N, C) like x = (softmax(x) - onehot(t)) * scale per row (0 for ignored rows); lse from
    cross_entropy_forward, scale a 1-element array (cast to lse's dtype)."""
    N, C = x.shape
    dx = empty(x.shape, x.dtype)
    name, vec, nt = _plan(x, dx)
    if N:
        _kernel(f"ce_bwd<{_targs(name, vec)}>")((N,), (nt,), (x, t.astype(np.int64, copy=False), lse,
                                                              scale.astype(lse.dtype).reshape(1), dx, np.int32(C),
                                                              np.int64(ignore_index)))
    return dx


class CrossEntropyCUDA(CrossEntropy):
    """Cross-entropy as one kernel per pass; saves the logits (N, C), targets and log-sum-exps."""

    @staticmethod
    def supports(logits: Any, targets: Any = None, **kwargs: Any) -> bool:
        """Contiguous CuPy float16/bfloat16/float32 logits (float64 takes the reference: gradcheck)."""
        return usable(logits)

    def forward(self, logits, targets, ignore_index=-100):
        t, _ = self.prepare(logits, targets, ignore_index)
        x = logits.reshape(-1, logits.shape[-1])
        lse, nll = cross_entropy_forward(x, t, ignore_index)
        self.save_for_backward(x, t, lse)
        return (nll.sum() / array_module(x).maximum(self.n_valid, 1)).astype(self.out_dtype)

    def backward(self, g):
        x, t, lse = self.saved
        scale = g.astype(lse.dtype) / array_module(x).maximum(self.n_valid, 1)
        dx = cross_entropy_backward(x, t, lse, scale, self.ignore_index)
        # dx itself when the logits were (N, C): a reshaped view would make the engine copy a leaf's .grad
        return (dx if dx.shape == self.in_shape else dx.reshape(self.in_shape)), None
