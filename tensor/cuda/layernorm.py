"""LayerNorm on the GPU: the reference formulas (tensor/functional.py: LayerNorm) as one kernel
each way (statistics in float32, double for float64 data), in two builds:

* rows of C = 128 NV columns, NV <= 8 (GPT widths 384 .. 1024), 16/32-bit data: one warp per row,
  the row in registers (each lane 4 adjacent columns of every 128, vector loads), read once from
  global memory. The backward also sums the weight and bias gradients (g * xhat and g) over the
  rows each block visits, in registers, into per-block partial rows (2, blocks, C) that one small
  column sum finishes (no (rows, C) g * xhat array), and it may add the gradient already waiting for
  x (`acc`, the Function protocol of tensor/tensor.py: the residual stream's other gradient) into
  dx in the same pass, instead of the engine's separate add;
* anything else (float64, other widths): a thread block per row, the weight and bias gradients
  by column sums (tensor/cuda/colsum.py, through functional.sum_rows).

Mixed precision: the output may be in another dtype than x (out_dtype: a float32 residual stream
normalized straight into the 16-bit input of the next product, no separate cast pass), and the
incoming gradient then comes in that dtype too (the product's dx): the kernels take the
dtypes as template arguments, x's T, y's / g's O (and the block build's statistics' A)."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.backend import array_module
from tensor.cuda.common import ACC, CTYPE, FLOATS, cupy, empty, threads, usable
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

# one warp per row of C = 128 NV: lane l holds columns 4 (l + 32 v) .. 4 (l + 32 v) + 3 for v < NV, so each
# load of the warp is one contiguous run of 128 elements; statistics in float32
LN_WARP_KERNELS = r"""
template <typename T> struct alignas(4 * sizeof(T)) vec4 { T v[4]; };
__device__ __forceinline__ float warp_sum(float s) {
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}
// this lane's 4 NV values of row r as floats
template <typename T, int NV>
__device__ __forceinline__ void load_row(float (&v)[NV][4], const T* row) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        const vec4<T> a = *reinterpret_cast<const vec4<T>*>(row + 4 * (lane + 32 * i));
#pragma unroll
        for (int e = 0; e < 4; ++e) v[i][e] = (float)a.v[e];
    }
}
template <typename T, int NV>
__device__ __forceinline__ void store_row(T* row, const float (&v)[NV][4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        vec4<T> a;
#pragma unroll
        for (int e = 0; e < 4; ++e) a.v[e] = (T)v[i][e];
        *reinterpret_cast<vec4<T>*>(row + 4 * (lane + 32 * i)) = a;
    }
}
// forward: 4 rows per block of 128 threads
template <typename T, typename O, int NV>
__global__ void __launch_bounds__(128) ln_fwd_warp(const T* __restrict__ x, const T* __restrict__ w,
        const T* __restrict__ b, O* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
        long long rows, float eps, int has_w, int has_b) {
    constexpr int C = 128 * NV;
    const long long r = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (r >= rows) return;   // (a whole warp: the shuffles stay within it)
    const int lane = threadIdx.x & 31;
    float v[NV][4];
    load_row<T, NV>(v, x + r * C);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s += v[i][e];
    const float mean = warp_sum(s) / C;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) { v[i][e] -= mean; q += v[i][e] * v[i][e]; }
    const float rstd = rsqrtf(warp_sum(q) / C + eps);
#pragma unroll
    for (int i = 0; i < NV; ++i) {   // (the weight and bias read here, from cache: fewer registers, more warps)
        const int c = 4 * (lane + 32 * i);
        const vec4<T> wv = has_w ? *reinterpret_cast<const vec4<T>*>(w + c) : vec4<T>();
        const vec4<T> bv = has_b ? *reinterpret_cast<const vec4<T>*>(b + c) : vec4<T>();
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float t = v[i][e] * rstd;
            if (has_w) t *= (float)wv.v[e];
            if (has_b) t += (float)bv.v[e];
            v[i][e] = t;
        }
    }
    store_row<O, NV>(y + r * C, v);
    if (lane == 0) { mean_out[r] = mean; rstd_out[r] = rstd; }
}
// backward: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) (+ acc), dxhat = g w; WARPS warps a block,
// rows r = (block WARPS + warp) + k (grid WARPS); with want_sums each lane also sums g xhat and g over its rows,
// and the block writes its totals to part[0][block][:], part[1][block][:] (warp after warp: the same bits every run)
template <typename T, typename O, int NV, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) ln_bwd_warp(const T* __restrict__ x, const T* __restrict__ w,
        const O* __restrict__ g, const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
        const T* __restrict__ acc, T* __restrict__ dx, float* __restrict__ part, long long rows, int has_w,
        int has_acc, int want_sums) {
    constexpr int C = 128 * NV;
    __shared__ float sw[C], sb[C];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float pw[NV][4], pb[NV][4];
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) pw[i][e] = pb[i][e] = 0.f;
    for (long long r = (long long)blockIdx.x * WARPS + warp; r < rows; r += (long long)gridDim.x * WARPS) {
        float xh[NV][4], gv[NV][4];   // xhat, then dx; g, then dxhat = g w
        load_row<T, NV>(xh, x + r * C);
        load_row<O, NV>(gv, g + r * C);
        const float mean = mean_in[r], rstd = rstd_in[r];
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int i = 0; i < NV; ++i) {   // (the weight read here, from cache: fewer registers)
            const vec4<T> wv = has_w ? *reinterpret_cast<const vec4<T>*>(w + 4 * (lane + 32 * i)) : vec4<T>();
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                xh[i][e] = (xh[i][e] - mean) * rstd;
                pw[i][e] += gv[i][e] * xh[i][e];
                pb[i][e] += gv[i][e];
                if (has_w) gv[i][e] *= (float)wv.v[e];
                s1 += gv[i][e]; s2 += gv[i][e] * xh[i][e];
            }
        }
        const float m1 = warp_sum(s1) / C, m2 = warp_sum(s2) / C;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            const vec4<T> a = has_acc ? *reinterpret_cast<const vec4<T>*>(acc + r * C + 4 * (lane + 32 * i)) : vec4<T>();
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float d = rstd * (gv[i][e] - m1 - xh[i][e] * m2);
                xh[i][e] = has_acc ? (float)a.v[e] + d : d;
            }
        }
        store_row<T, NV>(dx + r * C, xh);
    }
    if (!want_sums) return;
    for (int k = 0; k < WARPS; ++k) {
        if (warp == k)
#pragma unroll
            for (int i = 0; i < NV; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = 4 * (lane + 32 * i) + e;
                    sw[c] = k ? sw[c] + pw[i][e] : pw[i][e];
                    sb[c] = k ? sb[c] + pb[i][e] : pb[i][e];
                }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < C; c += 32 * WARPS) {
        part[(long long)blockIdx.x * C + c] = sw[c];
        part[((long long)gridDim.x + blockIdx.x) * C + c] = sb[c];
    }
}
"""
WARP_MAX_NV = 8   # C <= 1024: the backward holds x, g and the two partial sums of 4 NV columns in registers
BWD_WARPS = 4     # warps per backward block


@functools.lru_cache(maxsize=None)
def _kernel(expr: str) -> Any:
    names = tuple(f"ln_{k}<{_targs(t, o)}>" for t in FLOATS for o in FLOATS for k in ("fwd", "bwd"))
    return row_module(LN_KERNELS, names).get_function(expr)


def _targs(t: str, o: str) -> str:
    return f"{CTYPE[t]},{CTYPE[o]},{ACC[t]}"


def warp_nv(x: Any) -> int:
    """NV of the one-warp-a-row build for x (..., C): C / 128 where C = 128 NV, NV <= WARP_MAX_NV and x is
    16- or 32-bit; 0 where the block-per-row kernels run."""
    C = x.shape[-1]
    nv = C // 128
    return nv if C % 128 == 0 and 0 < nv <= WARP_MAX_NV and x.dtype.itemsize <= 4 else 0


def _aligned(*arrays: Any) -> bool:
    """Every array (None aside) starts 16-byte aligned (NumPy arrays too: the CPU emulation's tests)."""
    return all(a is None or (a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr) % 16 == 0 for a in arrays)


@functools.lru_cache(maxsize=None)
def _warp_kernels(t: str, o: str, nv: int) -> tuple:
    names = (f"ln_fwd_warp<{CTYPE[t]},{CTYPE[o]},{nv}>", f"ln_bwd_warp<{CTYPE[t]},{CTYPE[o]},{nv},{BWD_WARPS}>")
    module = row_module(LN_WARP_KERNELS, names)
    return tuple(module.get_function(n) for n in names)


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return cupy().cuda.Device(device).attributes["MultiProcessorCount"]


def max_bwd_blocks(kernel: Any) -> int:
    """The most blocks of the one-warp-a-row backward: as many as are resident at once (its registers decide;
    more would run as a second, partial wave: each block loops over its rows), whose partial sums are the rows
    of the column sum that finishes dweight and dbias."""
    return resident_blocks(kernel.num_regs) * _sm_count(cupy().cuda.runtime.getDevice())


def resident_blocks(regs: int, warps: int = BWD_WARPS) -> int:
    """Blocks of `warps` warps an SM holds at `regs` registers a thread (65536 registers an SM, allocated 256 a
    warp at a time; at most 16 blocks)."""
    per_warp = -(-regs * 32 // 256) * 256
    return max(1, min(16, 65536 // (warps * per_warp)))


def layer_norm_forward(x: Any, w: Any, b: Any, eps: float, out_dtype: Any = None) -> tuple[Any, Any, Any]:
    """x (..., C) contiguous -> (y of x's shape in out_dtype (default x's; float16/bfloat16/float32),
    mean (rows,), rstd (rows,)) with statistics in float32 (double for float64); w, b (C,) in x's dtype or None."""
    C = x.shape[-1]
    rows = x.size // C
    acc = np.float64 if x.dtype == np.float64 else np.float32
    y = empty(x.shape, x.dtype if out_dtype is None else out_dtype)
    mean, rstd = empty(rows, acc), empty(rows, acc)
    t, o = backend.dtype_name(x.dtype), backend.dtype_name(y.dtype)
    nv = warp_nv(x)
    if nv and _aligned(x, w, b, y):
        _warp_kernels(t, o, nv)[0]((-(-rows // 4),), (128,), (x, w if w is not None else x, b if b is not None else x,
                                   y, mean, rstd, np.int64(rows), np.float32(eps), np.int32(w is not None),
                                   np.int32(b is not None)))
        return y, mean, rstd
    _kernel(f"ln_fwd<{_targs(t, o)}>")(
        (rows,), (threads(C),),
        (x, w if w is not None else x, b if b is not None else x, y, mean, rstd, np.int32(C),
         acc(eps), np.int32(w is not None), np.int32(b is not None)))
    return y, mean, rstd


def layer_norm_backward(x: Any, w: Any, g: Any, mean: Any, rstd: Any, want_gxhat: bool = False) -> tuple[Any, Any]:
    """g contiguous, x's shape, any of float16/bfloat16/float32 -> (dx like x, g * xhat like x or
    None): the second's column sums are dweight. (The block-per-row kernel.)"""
    C = x.shape[-1]
    rows = x.size // C
    dx = empty(x.shape, x.dtype)
    gxh = empty(x.shape, x.dtype) if want_gxhat else None
    _kernel(f"ln_bwd<{_targs(backend.dtype_name(x.dtype), backend.dtype_name(g.dtype))}>")(
        (rows,), (threads(C),), (x, w if w is not None else x, g, mean, rstd, dx, np.int32(C), np.int32(w is not None),
                                 gxh if want_gxhat else dx, np.int32(want_gxhat)))
    return dx, gxh


def layer_norm_backward_rows(x: Any, w: Any, g: Any, mean: Any, rstd: Any, acc: Any = None,
                             want_sums: bool = True) -> tuple[Any, Any]:
    """The one-warp-a-row backward (warp_nv(x) > 0; x, g, acc contiguous and 16-byte aligned): -> (dx (+ acc
    where given) like x, the (2, blocks, C) float32 partial sums of g * xhat and g, or None)."""
    C = x.shape[-1]
    rows = x.size // C
    kernel = _warp_kernels(backend.dtype_name(x.dtype), backend.dtype_name(g.dtype), warp_nv(x))[1]
    blocks = max(1, min(-(-rows // BWD_WARPS), max_bwd_blocks(kernel)))
    dx = empty(x.shape, x.dtype)
    part = empty((2, blocks, C), np.float32) if want_sums else None
    kernel((blocks,), (32 * BWD_WARPS,), (x, w if w is not None else x, g, mean, rstd, acc if acc is not None else x,
                                          dx, part if part is not None else mean, np.int64(rows),
                                          np.int32(w is not None), np.int32(acc is not None), np.int32(want_sums)))
    return dx, part


class LayerNormCUDA(LayerNorm):
    """LayerNorm as one kernel each way; saves x, mean, rstd and the weight. Its backward may add the gradient
    already waiting for x into dx (adds_to_first_grad: in the kernel where the one-warp-a-row build runs)."""

    adds_to_first_grad = True

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

    def backward(self, g, acc=None):
        x, mean, rstd, weight = self.saved
        if backend.dtype_name(g.dtype) not in FLOATS:
            g = g.astype(x.dtype)
        g = array_module(x).ascontiguousarray(g)
        need_w, need_b = self.need_w, self.need_b
        by_warp = bool(warp_nv(x)) and _aligned(x, weight, g)   # the one-warp-a-row build
        fold = by_warp and acc is not None and acc.shape == x.shape and acc.dtype == x.dtype and acc.flags.c_contiguous \
            and _aligned(acc)   # acc added by the kernel
        if by_warp:
            dx, part = layer_norm_backward_rows(x, weight, g, mean, rstd, acc if fold else None, need_w or need_b)
            dw = sum_rows(part[0], weight.dtype) if need_w else None
            db = sum_rows(part[1], self.b_dtype) if need_b else None
        else:
            dx, gxhat = layer_norm_backward(x, weight, g, mean, rstd, want_gxhat=need_w)
            dw = sum_rows(gxhat, weight.dtype) if need_w else None
            db = sum_rows(g, self.b_dtype) if need_b else None
        if acc is not None and not fold:
            dx += acc
        return dx, dw, db
