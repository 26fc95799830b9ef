"""Fused CUDA kernels (through CuPy) for the hottest ops on the GPU.

The array-API code inside each op is the readable reference and the CPU path. On the
GPU, a chain of array calls launches one kernel per call and writes a temporary each
time; these kernels do the whole formula in one pass over memory:

    gelu_forward / gelu_backward     GELU (tanh approximation) and its derivative
    bias_add                         y += b across dtypes (a float32 bias into a 16-bit product)
    split_heads / merge_heads        attention's (B, T, 3, H, D) <-> (3, B, H, T, D) layouts, one pass
    layer_norm_forward / _backward   per-row mean, 1/std, normalise, scale+shift (and dx)
    causal_softmax / softmax_backward  attention's masked softmax and its backward
    cross_entropy_forward / _backward  per-row log-sum-exp, NLL, and softmax - onehot
    adam_step / adam_multi           the whole (decoupled) Adam update of one / many parameters
    sum_of_squares_multi / clip_multi  global-norm gradient clipping over many tensors, 3 launches
    unscale_multi                    the fp16 loss scaler's unscale + overflow check, 1 launch
    column_sums                      (rows, C) -> (C,): bias and LayerNorm-weight gradients

Each formula is the same as the reference op's (see the op's comment). `usable(x)` says
whether a kernel applies (a CuPy float16/bfloat16/float32 array and TINYGRAD_LM_FAST
not set to 0; float64, used by gradcheck, always takes the exact reference path); callers fall back to the reference otherwise. Row kernels use one thread
block per row and block-wide reductions; statistics are accumulated in float32 (double
for float64 data).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import ACC as _ACC, CTYPE as _CTYPE, FLOATS, FLOATS as _FLOATS, cupy as _cp, empty as _empty, threads as _threads, usable  # noqa: F401


# ----------------------------------------------------------------------------- elementwise
@functools.lru_cache(maxsize=None)
def _elementwise(name: str) -> Any:
    cp = _cp()
    k = 0.7978845608028654  # sqrt(2/pi)
    if name == "gelu_fwd":
        # y = 0.5 x (1 + tanh(u)), u = k (x + 0.044715 x^3); computed as x * sigmoid(2u), since
        # 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)): one fast exponential instead of tanhf
        return cp.ElementwiseKernel("T x", "T y", f"""
            float xf = (float)x; float u = {k}f * (xf + 0.044715f * xf * xf * xf);
            y = (T)(xf / (1.0f + __expf(-2.0f * u)));""", "tglm_gelu_fwd")
    if name == "gelu_bwd":
        # dx = g (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3*0.044715 x^2)), t = tanh(u); with
        # s = sigmoid(2u) = 0.5 (1 + t) and 1 - t^2 = 4 s (1 - s): dx = g (s + 2 x s (1 - s) k (1 + 3*0.044715 x^2))
        return cp.ElementwiseKernel("T x, T g", "T dx", f"""
            float xf = (float)x; float u = {k}f * (xf + 0.044715f * xf * xf * xf);
            float s = 1.0f / (1.0f + __expf(-2.0f * u));
            float d = s + 2.0f * xf * s * (1.0f - s) * {k}f * (1.0f + 3.0f * 0.044715f * xf * xf);
            dx = (T)((float)g * d);""", "tglm_gelu_bwd")
    if name == "adam":
        # m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p = p*decay - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
        return cp.ElementwiseKernel(
            "T g, float64 lr, float64 b1, float64 b2, float64 eps, float64 bc1, float64 sqrt_bc2, float64 decay",
            "T p, T m, T v", """
            double gd = (double)g;
            double md = b1 * (double)m + (1.0 - b1) * gd;
            double vd = b2 * (double)v + (1.0 - b2) * gd * gd;
            m = (T)md; v = (T)vd;
            p = (T)((double)p * decay - (lr / bc1) * md / (sqrt(vd) / sqrt_bc2 + eps));""", "tglm_adam")
    raise KeyError(name)


def bias_add(y: Any, b: Any) -> None:
    """In place: y (..., C) contiguous += b (C,), computed in float, any float dtypes."""
    t = f"{_CTYPE[backend.dtype_name(y.dtype)]},{_CTYPE[backend.dtype_name(b.dtype)]}"
    C = b.size
    _layout_kernel(f"bias_add_rows<{t}>")((y.size // C,), (_threads(min(C, 256)),), (y, b, np.int32(C)))


def gelu_forward(x: Any) -> Any:
    return _elementwise("gelu_fwd")(x)


def gelu_backward(x: Any, g: Any) -> Any:
    return _elementwise("gelu_bwd")(x, g)


def adam_step(p: Any, g: Any, m: Any, v: Any, lr: float, beta1: float, beta2: float, eps: float,
              step: int, decay: float = 1.0) -> None:
    """In place: the Adam moments and p <- p * decay - lr * m_hat / (sqrt(v_hat) + eps)."""
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    _elementwise("adam")(g, lr, beta1, beta2, eps, bc1, bc2 ** 0.5, decay, p, m, v)


_ADAM_MULTI = r"""
// One launch updates many float32 parameters (a "multi-tensor apply"): block b handles chunk b,
// which belongs to tensor chunk_tensor[b] and starts at chunk_offset[b]. Per tensor: pointers to
// p, g, m, v and 7 numbers: lr, decay, beta1, beta2, eps, 1 - beta1^t, sqrt(1 - beta2^t).
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p = p*decay - lr/bc1 * m / (sqrt(v)/sqrt_bc2 + eps)
extern "C" __global__ void adam_multi(const unsigned long long* ptrs, const long long* sizes, const double* hp,
                                      const int* chunk_tensor, const long long* chunk_offset, int chunk) {
    int t = chunk_tensor[blockIdx.x];
    long long start = chunk_offset[blockIdx.x];
    long long end = min(start + (long long)chunk, sizes[t]);
    float* p = (float*)ptrs[4 * t];
    const float* g = (const float*)ptrs[4 * t + 1];
    float* m = (float*)ptrs[4 * t + 2];
    float* v = (float*)ptrs[4 * t + 3];
    const double* h = hp + 7 * t;
    double lr = h[0], decay = h[1], b1 = h[2], b2 = h[3], eps = h[4], bc1 = h[5], sbc2 = h[6];
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        double gd = (double)g[i];
        double md = b1 * (double)m[i] + (1.0 - b1) * gd;
        double vd = b2 * (double)v[i] + (1.0 - b2) * gd * gd;
        m[i] = (float)md;
        v[i] = (float)vd;
        p[i] = (float)((double)p[i] * decay - (lr / bc1) * md / (sqrt(vd) / sbc2 + eps));
    }
}
"""
_CHUNK = 1 << 16


@functools.lru_cache(maxsize=None)
def _adam_multi_kernel() -> Any:
    return _cp().RawKernel(_ADAM_MULTI, "adam_multi")


def _chunk_tables(sizes: list) -> tuple[list, list]:
    """Split tensors of the given sizes into _CHUNK-element chunks: (tensor index, start) per chunk."""
    chunk_t, chunk_o = [], []
    for t, n in enumerate(sizes):
        starts = range(0, n, _CHUNK)
        chunk_t += [t] * len(starts)
        chunk_o += list(starts)
    return chunk_t, chunk_o


def adam_multi(updates: list, upload: Any = None) -> None:
    """Apply the Adam update to many float32 CuPy parameters in one kernel launch.

    updates: (p, g, m, v, lr, decay, beta1, beta2, eps, step) per parameter, arrays contiguous.
    Same formulas as `adam_step`. upload: how the small tables reach the device (a
    backend.HostToDevice, so that they do not wait for the GPU; cupy.asarray by default)."""
    cp = _cp()
    upload = upload or cp.asarray
    ptrs, sizes, hp = [], [], []
    for p, g, m, v, lr, decay, b1, b2, eps, step in updates:
        ptrs += [p.data.ptr, g.data.ptr, m.data.ptr, v.data.ptr]
        sizes.append(p.size)
        hp += [lr, decay, b1, b2, eps, 1.0 - b1 ** step, (1.0 - b2 ** step) ** 0.5]
    chunk_t, chunk_o = _chunk_tables(sizes)
    args = (upload(np.array(ptrs, dtype=np.uint64)), upload(np.array(sizes, dtype=np.int64)),
            upload(np.array(hp, dtype=np.float64)), upload(np.array(chunk_t, dtype=np.int32)),
            upload(np.array(chunk_o, dtype=np.int64)), np.int32(_CHUNK))
    _adam_multi_kernel()((len(chunk_t),), (256,), args)


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
    return _cp().RawModule(code=_NORM_MULTI)


def _tables(arrays: list, upload: Any) -> tuple:
    sizes = [a.size for a in arrays]
    chunk_t, chunk_o = _chunk_tables(sizes)
    return (upload(np.array([a.data.ptr for a in arrays], dtype=np.uint64)), upload(np.array(sizes, dtype=np.int64)),
            upload(np.array(chunk_t, dtype=np.int32)), upload(np.array(chunk_o, dtype=np.int64)),
            np.int32(_CHUNK)), len(chunk_t)


def sum_of_squares_multi(arrays: list, upload: Any = None) -> tuple[Any, tuple]:
    """Sum of squares of many contiguous float32 CuPy arrays -> (0-d float32 array, tables for
    `clip_multi`). Two launches: per-chunk partial sums, then one reduction of the partials."""
    cp = _cp()
    tables, n = _tables(arrays, upload or cp.asarray)
    partial = _empty(n, np.float32)
    _norm_module().get_function("sumsq_multi")((n,), (256,), tables + (partial,))
    return partial.sum(), (tables, n)


def unscale_multi(arrays: list, inv: float, upload: Any = None) -> Any:
    """In place: every contiguous float32 CuPy array *= inv; returns a 1-element int32 device
    flag, 1 when some result is not finite (the loss scaler's overflow check), in one launch."""
    cp = _cp()
    args, n = _tables(arrays, upload or cp.asarray)
    found = cp.zeros(1, dtype=np.int32)
    _norm_module().get_function("unscale_multi")((n,), (256,), args + (np.float32(inv), found))
    return found


def clip_multi(tables: tuple, sumsq: Any, max_norm: float) -> None:
    """In place, on the device: every array *= min(1, max_norm / (sqrt(sumsq) + 1e-6)), unless the
    norm is not finite. tables: from `sum_of_squares_multi` over the same arrays."""
    args, n = tables
    _norm_module().get_function("clip_multi")((n,), (256,), args + (sumsq, np.float32(max_norm)))


# ----------------------------------------------------------------------------- row kernels
_ROW_COMMON = r"""
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

_ROW_KERNELS = r"""
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

// causal softmax of scores s (rows of Tk; row r is query r % Tq at position r % Tq + Tk - Tq):
// p_j = exp(scale*s_j - max) / sum over allowed keys; masked keys get 0
template <typename S, typename P>
__global__ void causal_softmax(const S* s, P* p, int Tq, int Tk, float scale) {
    __shared__ float sh[32];
    long long off = (long long)blockIdx.x * Tk;
    int last = (int)(blockIdx.x % Tq) + Tk - Tq;  // the last key this query may see
    float m = -__int_as_float(0x7f800000);  // -inf
    for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, scale * (float)s[off + j]);
    m = block_max(m, sh);
    float z = 0;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) z += __expf(scale * (float)s[off + j] - m);
    z = block_sum(z, sh);
    float inv = 1.0f / z;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        p[off + j] = (P)(j <= last ? __expf(scale * (float)s[off + j] - m) * inv : 0.0f);
}

// softmax backward: ds_j = scale * p_j * (dp_j - sum_k dp_k p_k)   (ds in p's type; dp may be wider)
template <typename P, typename G>
__global__ void softmax_bwd(const P* p, const G* dp, P* ds, int Tk, float scale) {
    __shared__ float sh[32];
    long long off = (long long)blockIdx.x * Tk;
    float s = 0;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) s += (float)p[off + j] * (float)dp[off + j];
    s = block_sum(s, sh);
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        ds[off + j] = (P)(scale * (float)p[off + j] * ((float)dp[off + j] - s));
}

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


_COLSUM = r"""
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
    names = [f"colsum<{_CTYPE[t]},{_CTYPE[o]}>" for t in _FLOATS for o in _FLOATS]
    return _cp().RawModule(code=_COLSUM, options=("--std=c++14",), name_expressions=names)


@functools.lru_cache(maxsize=None)
def _colsum_kernel(t: str, o: str) -> Any:
    return _colsum_module().get_function(f"colsum<{_CTYPE[t]},{_CTYPE[o]}>")


@functools.lru_cache(maxsize=8)
def _colsum_counters(tiles: int, device: int) -> Any:
    """Zeroed per-tile counters (each launch leaves them zero again); one buffer per width,
    reused by the launches of one stream in turn."""
    return _cp().zeros(tiles, dtype=np.uint32)


def column_sums(x: Any, out_dtype: Any) -> Any:
    """x (rows, C) contiguous -> (C,) column sums in out_dtype, float32 accumulation, one launch,
    the same bits every run."""
    cp = _cp()
    rows, C = x.shape
    tiles = (C + 31) // 32
    out = _empty(C, out_dtype)
    slices = max(1, min(_COLSUM_SLICES, rows // 128))
    partial = _empty((slices, C), np.float32)
    counters = _colsum_counters(tiles, cp.cuda.runtime.getDevice())
    _colsum_kernel(backend.dtype_name(x.dtype), backend.dtype_name(out.dtype))(
        (tiles, slices), (32, 8), (x, out, partial, counters, np.int64(rows), np.int32(C)))
    return out




@functools.lru_cache(maxsize=None)
def _module() -> Any:
    cp = _cp()
    names = []
    for t in _FLOATS:
        c, a = _CTYPE[t], _ACC[t]
        names += [f"ln_fwd<{c},{a}>", f"ln_bwd<{c},{a}>", f"ce_fwd<{c}>", f"ce_bwd<{c}>"]
        for p in _FLOATS:
            names += [f"causal_softmax<{c},{_CTYPE[p]}>", f"softmax_bwd<{c},{_CTYPE[p]}>"]
    return cp.RawModule(code=_ROW_COMMON + _ROW_KERNELS, options=("--std=c++14",), name_expressions=names)


@functools.lru_cache(maxsize=None)
def _kernel(expr: str) -> Any:
    return _module().get_function(expr)


def layer_norm_forward(x: Any, w: Any, b: Any, eps: float) -> tuple[Any, Any, Any]:
    """x (..., C) -> (y like x, mean (rows,), rstd (rows,)) with statistics in float32 (double for float64)."""
    C = x.shape[-1]
    rows = x.size // C
    acc = np.float64 if x.dtype == np.float64 else np.float32
    y = _empty(x.shape, x.dtype)
    mean, rstd = _empty(rows, acc), _empty(rows, acc)
    t = backend.dtype_name(x.dtype)
    _kernel(f"ln_fwd<{_CTYPE[t]},{_ACC[t]}>")(
        (rows,), (_threads(C),),
        (x, w if w is not None else x, b if b is not None else x, y, mean, rstd, np.int32(C),
         acc(eps), np.int32(w is not None), np.int32(b is not None)))
    return y, mean, rstd


def layer_norm_backward(x: Any, w: Any, g: Any, mean: Any, rstd: Any, want_gxhat: bool = False) -> tuple[Any, Any]:
    """-> (dx like x, g * xhat like x or None): the second's column sums are dweight."""
    C = x.shape[-1]
    rows = x.size // C
    dx = _empty(x.shape, x.dtype)
    gxh = _empty(x.shape, x.dtype) if want_gxhat else None
    t = backend.dtype_name(x.dtype)
    _kernel(f"ln_bwd<{_CTYPE[t]},{_ACC[t]}>")(
        (rows,), (_threads(C),), (x, w if w is not None else x, g, mean, rstd, dx, np.int32(C), np.int32(w is not None),
                                  gxh if want_gxhat else dx, np.int32(want_gxhat)))
    return dx, gxh


_WARP_ROWS = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// Row kernels with one warp per row, for rows of at most 32*N elements: lane l holds elements
// l, l+32, ..., l+32(N-1) in registers, so each row is read once and reduced with warp shuffles
// (the block-per-row kernels above re-read the row and synchronise the block).
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}
// causal softmax, as causal_softmax above (row r is query r % Tq at position r % Tq + Tk - Tq)
template <typename S, typename P, int N>
__global__ void causal_softmax_warp(const S* s, P* p, long long rows, int Tq, int Tk, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const S* sr = s + row * Tk;
    P* pr = p + row * Tk;
    int last = (int)(row % Tq) + Tk - Tq;
    float v[N];
    float m = -__int_as_float(0x7f800000);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        v[i] = (j <= last && j < Tk) ? scale * (float)sr[j] : -__int_as_float(0x7f800000);
        m = fmaxf(m, v[i]);
    }
    m = warp_max(m);
    float z = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        v[i] = (j <= last && j < Tk) ? __expf(v[i] - m) : 0.0f;
        z += v[i];
    }
    float inv = 1.0f / warp_sum(z);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        if (j < Tk) pr[j] = (P)(v[i] * inv);
    }
}
// softmax backward, as softmax_bwd above: ds_j = scale * p_j * (dp_j - sum_k dp_k p_k)
template <typename P, typename G, int N>
__global__ void softmax_bwd_warp(const P* p, const G* dp, P* ds, long long rows, int Tk, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    long long off = row * Tk;
    float pv[N], gv[N];
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        pv[i] = j < Tk ? (float)p[off + j] : 0.0f;
        gv[i] = j < Tk ? (float)dp[off + j] : 0.0f;
        acc += pv[i] * gv[i];
    }
    acc = warp_sum(acc);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        int j = lane + 32 * i;
        if (j < Tk) ds[off + j] = (P)(scale * pv[i] * (gv[i] - acc));
    }
}
"""


@functools.lru_cache(maxsize=None)
def _warp_kernel(name: str) -> Any:
    """One instantiation of a _WARP_ROWS template, compiled on first use (NVRTC caches it on disk)."""
    mod = _cp().RawModule(code=_WARP_ROWS, options=("--std=c++14",), name_expressions=[name])
    return mod.get_function(name)


def _warp_n(Tk: int) -> int | None:
    """Elements per lane for a row of Tk (a power of two up to 32), None past 1024."""
    n = 1
    while 32 * n < Tk:
        n *= 2
    return n if n <= 32 else None


_ROWS_PER_BLOCK = 4


def causal_softmax(s: Any, scale: float, out_dtype: Any) -> Any:
    """s (..., Tq, Tk) raw scores -> causal softmax(scale * s) in out_dtype."""
    Tq, Tk = s.shape[-2], s.shape[-1]
    p = _empty(s.shape, out_dtype)
    types = f"{_CTYPE[backend.dtype_name(s.dtype)]},{_CTYPE[backend.dtype_name(out_dtype)]}"
    rows, n = s.size // Tk, _warp_n(Tk)
    if n is not None:  # a warp per row
        _warp_kernel(f"causal_softmax_warp<{types},{n}>")(
            ((rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,), (32 * _ROWS_PER_BLOCK,),
            (s, p, np.int64(rows), np.int32(Tq), np.int32(Tk), np.float32(scale)))
    else:
        _kernel(f"causal_softmax<{types}>")((rows,), (_threads(Tk),), (s, p, np.int32(Tq), np.int32(Tk), np.float32(scale)))
    return p


def softmax_backward(p: Any, dp: Any, scale: float) -> Any:
    """ds = scale * p * (dp - rowsum(dp * p)), rows along the last axis; ds in p's dtype
    (dp may be float32 for 16-bit p: the product of a half-precision GEMM kept wide)."""
    Tk = p.shape[-1]
    ds = _empty(p.shape, p.dtype)
    types = f"{_CTYPE[backend.dtype_name(p.dtype)]},{_CTYPE[backend.dtype_name(dp.dtype)]}"
    rows, n = p.size // Tk, _warp_n(Tk)
    if n is not None:  # a warp per row
        _warp_kernel(f"softmax_bwd_warp<{types},{n}>")(
            ((rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,), (32 * _ROWS_PER_BLOCK,),
            (p, dp, ds, np.int64(rows), np.int32(Tk), np.float32(scale)))
    else:
        _kernel(f"softmax_bwd<{types}>")((rows,), (_threads(Tk),), (p, dp, ds, np.int32(Tk), np.float32(scale)))
    return ds


_LAYOUT = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// Attention's head layouts. A row is one head's D contiguous values at one position, contiguous
// on both sides; threadIdx.x walks a row, threadIdx.y picks the row (index arithmetic once per row).
// Row r = ((s*B + b)*H + h)*T + t of the head-major layout (S, B, H, T, D) is row
// ((b*T + t)*S + s)*H + h of the token-major layout (B, T, S, H, D) (S = 3 for a fused qkv, 1 for a
// gradient). merge = 0: x token-major -> y head-major (split); merge = 1: the reverse.
template <typename T>
__global__ void heads_permute(const T* x, T* y, int rows, int B, int Tn, int S, int H, int D, int merge) {
    int r = blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= rows) return;
    int t = r % Tn, q = r / Tn;
    int h = q % H; q /= H;
    int b = q % B, s = q / B;
    long long tok = (((long long)b * Tn + t) * S + s) * H + h;
    const T* src = x + (merge ? (long long)r : tok) * D;
    T* dst = y + (merge ? tok : (long long)r) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
}
// y (rows, C) += b (C,), in float: the bias of a Linear, whatever the two dtypes; a block per row
template <typename Y, typename Bt>
__global__ void bias_add_rows(Y* y, const Bt* b, int C) {
    Y* yr = y + (long long)blockIdx.x * C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) yr[j] = (Y)((float)yr[j] + (float)b[j]);
}
"""


@functools.lru_cache(maxsize=None)
def _layout_module() -> Any:
    names = []
    for t in _FLOATS:
        names.append(f"heads_permute<{_CTYPE[t]}>")
        names += [f"bias_add_rows<{_CTYPE[t]},{_CTYPE[b]}>" for b in _FLOATS]
    return _cp().RawModule(code=_LAYOUT, options=("--std=c++14",), name_expressions=names)


@functools.lru_cache(maxsize=None)
def _layout_kernel(name: str) -> Any:
    return _layout_module().get_function(name)


def _heads_permute(x: Any, y: Any, B: int, T: int, S: int, H: int, D: int, merge: bool) -> Any:
    rows = S * B * H * T  # 32 threads along a row, 8 rows per block
    _layout_kernel(f"heads_permute<{_CTYPE[backend.dtype_name(x.dtype)]}>")(
        ((rows + 7) // 8,), (min(32, max(D, 1)), 8),
        (x, y, np.int32(rows), np.int32(B), np.int32(T), np.int32(S), np.int32(H), np.int32(D), np.int32(merge)))
    return y


def split_heads(x: Any, n_head: int, parts: int) -> Any:
    """x (B, T, parts*C) contiguous -> (parts, B, H, T, D) contiguous, D = C / n_head, one pass."""
    B, T, C3 = x.shape
    D = C3 // (parts * n_head)
    return _heads_permute(x, _empty((parts, B, n_head, T, D), x.dtype), B, T, parts, n_head, D, merge=False)


def merge_heads(x: Any) -> Any:
    """x (parts, B, H, T, D) contiguous -> (B, T, parts*H*D), one pass (the inverse of split_heads)."""
    S, B, H, T, D = x.shape
    return _heads_permute(x, _empty((B, T, S * H * D), x.dtype), B, T, S, H, D, merge=True)


def cross_entropy_forward(x: Any, t: Any, ignore_index: int) -> tuple[Any, Any]:
    """x (N, C), t (N,) int64 -> (lse (N,) float32, nll (N,) float32 with 0 for ignored rows)."""
    N, C = x.shape
    lse, nll = _empty(N, np.float32), _empty(N, np.float32)
    _kernel(f"ce_fwd<{_CTYPE[backend.dtype_name(x.dtype)]}>")((N,), (_threads(C),),
                                              (x, t.astype(np.int64, copy=False), lse, nll, np.int32(C), np.int64(ignore_index)))
    return lse, nll


def cross_entropy_backward(x: Any, t: Any, lse: Any, scale: Any, ignore_index: int) -> Any:
    """dx = (softmax(x) - onehot(t)) * scale per row (0 for ignored rows); scale a 1-element float32 array."""
    N, C = x.shape
    dx = _empty(x.shape, x.dtype)
    _kernel(f"ce_bwd<{_CTYPE[backend.dtype_name(x.dtype)]}>")((N,), (_threads(C),),
                                              (x, t.astype(np.int64, copy=False), lse, scale.astype(np.float32).reshape(1),
                                               dx, np.int32(C), np.int64(ignore_index)))
    return dx
