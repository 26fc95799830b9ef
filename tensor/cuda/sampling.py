"""Sampling on the GPU: one thread block per row of logits picks the next token, with the filters of
the CPU sampler (tinygrad_lm/sample.py: filtered_probs) and a counter-based RNG read from device
memory, so that a CUDA-graph replay draws new numbers every token and a seed reproduces a run.

    greedy (temperature 0)  argmax of the logits, the first index on ties (as numpy.argmax)
    top-k                   keep logits >= the k-th largest (ties at the k-th all kept, as np.partition)
    top-p                   over the kept tokens' softmax(z / temperature), keep a token when the mass
                            ranked above it (descending, index order on ties) is < top_p
    the draw                argmax over the kept tokens of z_i / temperature + G_i, G_i ~ Gumbel(0, 1)
                            (the Gumbel-max trick: token i with probability softmax(z / T)_i over
                            the kept set, the same distribution as the CPU's inverse CDF)

Thresholds are found by bisection over the 32-bit order-preserving key of each float logit
(k-th largest: the smallest key t with #{key > t} < k; top-p: the smallest t whose mass above is
< top_p), so no sort; probabilities are summed in float64 as the CPU does.
RNG: u_i = hash(seed, counter, row, i), a SplitMix64 finaliser cascade (`uniforms` is the same
formula in NumPy), u in (0, 1) with 53 bits; G = -log(-log u).
Stop tokens: a row whose token is one of `stops` is marked done and repeats that token afterwards.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tensor import backend
from tensor.cuda.common import CTYPE, GRID_THREADS, cupy, empty, grid_blocks

# SplitMix64's finaliser: the hash both kernels of this module draw their uniforms from
_MIX64 = r"""
__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}
"""

_SOURCE = _MIX64 + r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ unsigned int order_key(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
template <typename A>
__device__ A bsum(A x, A* sh) {
    const int t = threadIdx.x;
    sh[t] = x;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (t < s) sh[t] += sh[t + s];
        __syncthreads();
    }
    A r = sh[0];
    __syncthreads();
    return r;
}
// the (value, index) pair with the largest value, the smallest index on ties
__device__ int bargmax(double x, int i, double* shv, int* shi) {
    const int t = threadIdx.x;
    shv[t] = x; shi[t] = i;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (t < s) {
            double y = shv[t + s]; int j = shi[t + s];
            if (j >= 0 && (shi[t] < 0 || y > shv[t] || (y == shv[t] && j < shi[t]))) { shv[t] = y; shi[t] = j; }
        }
        __syncthreads();
    }
    int r = shi[0];
    __syncthreads();
    return r;
}

template <typename T>
__global__ void sample_rows(const T* __restrict__ logits, long long row_stride, int V, int greedy,
        double inv_temp, int top_k, double top_p, unsigned long long seed, const long long* __restrict__ counter,
        long long* __restrict__ tokens, int* __restrict__ done, long long* __restrict__ finished,
        const long long* __restrict__ stops, int n_stops) {
    __shared__ double shd[1024];
    __shared__ int shi[1024];
    const int row = blockIdx.x, t = threadIdx.x, nt = blockDim.x;
    const T* x = logits + row * row_stride;
    int best;
    if (greedy) {
        double bv = 0.0; int bi = -1;
        for (int i = t; i < V; i += nt) {
            float f = (float)x[i];
            if (bi < 0 || f > bv) { bv = f; bi = i; }   // per thread, indices ascend: the first max stays
        }
        best = bargmax(bv, bi, shd, shi);
    } else {
        // the largest logit, for exp(z - max)
        double mx = __longlong_as_double(0xfff0000000000000ULL);  // -inf
        for (int i = t; i < V; i += nt) mx = fmax(mx, (double)(float)x[i]);
        shd[t] = mx; __syncthreads();
        for (int s = nt >> 1; s > 0; s >>= 1) { if (t < s) shd[t] = fmax(shd[t], shd[t + s]); __syncthreads(); }
        mx = shd[0]; __syncthreads();
        // top-k: low = the k-th largest key (every key when off)
        unsigned int low = 0u;
        if (top_k > 0 && top_k < V) {
            unsigned int lo = 0u, hi = 0xffffffffu;
            while (lo < hi) {
                unsigned int mid = lo + (hi - lo) / 2;
                int c = 0;
                for (int i = t; i < V; i += nt) c += order_key((float)x[i]) > mid;
                if (bsum<int>(c, shi) < top_k) hi = mid; else lo = mid + 1;
            }
            low = lo;
        }
        int cut = V;  // among the keys equal to `low`, those of index < cut are kept
        if (top_p < 1.0) {
            double z = 0.0;
            for (int i = t; i < V; i += nt) {
                float f = (float)x[i];
                if (order_key(f) >= low) z += exp(((double)f - mx) * inv_temp);
            }
            z = bsum<double>(z, shd);
            // the smallest key t (>= low) whose kept mass strictly above it is < top_p
            unsigned int lo = low, hi = 0xffffffffu;
            while (lo < hi) {
                unsigned int mid = lo + (hi - lo) / 2;
                double a = 0.0;
                for (int i = t; i < V; i += nt) {
                    float f = (float)x[i];
                    if (order_key(f) > mid) a += exp(((double)f - mx) * inv_temp);
                }
                if (bsum<double>(a, shd) / z < top_p) hi = mid; else lo = mid + 1;
            }
            // ties at that key: in index order, a token is kept while the mass above it is < top_p
            double above = 0.0, pstar = 0.0; int tied = 0;
            for (int i = t; i < V; i += nt) {
                float f = (float)x[i];
                unsigned int key = order_key(f);
                if (key > lo) above += exp(((double)f - mx) * inv_temp);
                if (key == lo) { ++tied; pstar = exp(((double)f - mx) * inv_temp); }
            }
            above = bsum<double>(above, shd) / z;
            tied = bsum<int>(tied, shi);
            shd[t] = pstar; __syncthreads();
            for (int s = nt >> 1; s > 0; s >>= 1) { if (t < s) shd[t] = fmax(shd[t], shd[t + s]); __syncthreads(); }
            pstar = shd[0] / z; __syncthreads();
            int keep = 1;
            while (keep < tied && above + keep * pstar < top_p) ++keep;
            if (keep < tied) {  // the smallest index c with #{tied, index <= c} >= keep; kept: index < c + 1
                int clo = 0, chi = V - 1;
                while (clo < chi) {
                    int mid = (clo + chi) / 2, c = 0;
                    for (int i = t; i <= mid && i < V; i += nt) c += order_key((float)x[i]) == lo;
                    if (bsum<int>(c, shi) >= keep) chi = mid; else clo = mid + 1;
                }
                cut = clo + 1;
            }
            low = lo;
        }
        // the draw: Gumbel-max over the kept tokens
        const unsigned long long base = mix64(mix64(mix64(seed) + (unsigned long long)counter[0]) + row);
        double bv = 0.0; int bi = -1;
        for (int i = t; i < V; i += nt) {
            float f = (float)x[i];
            unsigned int key = order_key(f);
            if (key < low || (key == low && i >= cut)) continue;
            double u = ((double)(mix64(base + i) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
            double s = ((double)f - mx) * inv_temp - log(-log(u));
            if (bi < 0 || s > bv) { bv = s; bi = i; }
        }
        best = bargmax(bv, bi, shd, shi);
    }
    if (t == 0) {
        long long tok = best;
        if (done[row]) tok = finished[row];
        else for (int s = 0; s < n_stops; ++s) if (stops[s] == tok) { done[row] = 1; finished[row] = tok; }
        tokens[row] = tok;
    }
}
"""

MIX_A, MIX_B = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

# U[0, 1) float32 for dropout masks: u_i = (mix64(mix64(seed) + i) >> 40) / 2^24 (24 bits, all representable)
_UNIFORM = _MIX64 + r"""
extern "C" __global__ void uniform_f32(float* __restrict__ u, unsigned long long seed, long long n) {
    const unsigned long long base = mix64(seed);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        u[i] = (float)(mix64(base + (unsigned long long)i) >> 40) * (1.0f / 16777216.0f);
}
"""


@functools.lru_cache(maxsize=None)
def _module() -> Any:
    names = [f"sample_rows<{CTYPE[t]}>" for t in ("float32", "float16", "bfloat16")]
    return cupy().RawModule(code=_SOURCE, options=("--std=c++14",), name_expressions=names)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(MIX_A)
        x ^= x >> np.uint64(27)
        x *= np.uint64(MIX_B)
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, counter: Any, row: int, n: int) -> np.ndarray:
    """The kernel's uniforms u_0 .. u_{n-1} in (0, 1) of (seed, counter, row), in NumPy (float64):
    shape (n,), or counter.shape + (n,) for an array of counters."""
    c = np.asarray(counter, dtype=np.uint64)[..., None]
    with np.errstate(over="ignore"):
        base = _mix64(_mix64(_mix64(np.array([seed], dtype=np.uint64)) + c) + np.uint64(row))
        h = _mix64(base + np.arange(n, dtype=np.uint64))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2.0 ** 53)


@functools.lru_cache(maxsize=None)
def _uniform_kernel() -> Any:
    return cupy().RawKernel(_UNIFORM, "uniform_f32")


def device_uniform(seed: int, shape: tuple) -> Any:
    """U[0, 1) float32 of `shape` on the GPU, a pure function of (seed, flat index): the draws behind
    dropout on CUDA (tensor/functional.py: uniform), made where they are used instead of on the host."""
    u = empty(shape, np.float32)
    if u.size:
        _uniform_kernel()((grid_blocks(u.size),), (GRID_THREADS,), (u, np.uint64(seed), np.int64(u.size)))
    return u


def uniforms_f32(seed: int, n: int) -> np.ndarray:
    """device_uniform's first n numbers, in NumPy (the same formula, for tests)."""
    with np.errstate(over="ignore"):
        h = _mix64(_mix64(np.array([seed], dtype=np.uint64)) + np.arange(n, dtype=np.uint64))
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 2 ** 24)


class DeviceSampler:
    """Picks one token per row of logits (B, V) on the device; the state lives in device buffers:
    tokens (B,) int64 (the picks, written in place), done (B,) int32 and finished (B,) int64 (the
    stop-token bookkeeping), counter (1,) int64 (the RNG's step, advanced by the caller).

    temperature 0 = greedy; top_k None/0 = off; top_p None/1 = off; seed None = drawn from the OS.
    """

    def __init__(self, batch: int, temperature: float, top_k: int | None, top_p: float | None,
                 seed: int | None, stop_tokens: Any = ()) -> None:
        cp = cupy()
        self.greedy = temperature == 0
        self.inv_temp = 0.0 if self.greedy else 1.0 / temperature
        self.top_k = int(top_k or 0)
        self.top_p = 1.0 if top_p is None else float(top_p)
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
        self.seed = int(seed) % 2 ** 64
        self.tokens = cp.zeros((batch,), dtype=np.int64)
        self.done = cp.zeros((batch,), dtype=np.int32)
        self.finished = cp.zeros((batch,), dtype=np.int64)
        self.counter = cp.zeros((1,), dtype=np.int64)
        stops = np.asarray(list(stop_tokens), dtype=np.int64)
        self.n_stops = len(stops)
        self.stops = cp.asarray(stops if len(stops) else np.zeros(1, dtype=np.int64))

    def __call__(self, logits: Any) -> Any:
        """logits (B, V) float32/float16/bfloat16 on the device (rows of any stride, last axis contiguous)
        -> self.tokens (B,) int64 in [0, V), filled when the kernel has run. A model whose table is padded
        past its vocabulary passes the real columns, a view `logits[:, :vocab]` (no copy)."""
        B, V = logits.shape
        if B != self.tokens.shape[0] or logits.strides[1] != logits.itemsize:
            raise ValueError(f"DeviceSampler: logits {logits.shape} (strides {logits.strides}) do not fit a "
                             f"batch of {self.tokens.shape[0]} with a contiguous last axis")
        threads = int(min(1024, max(32, 1 << (V - 1).bit_length())))
        fn = _module().get_function(f"sample_rows<{CTYPE[backend.dtype_name(logits.dtype)]}>")
        fn((B,), (threads,), (logits, np.int64(logits.strides[0] // logits.itemsize), np.int32(V),
                              np.int32(self.greedy), np.float64(self.inv_temp), np.int32(self.top_k),
                              np.float64(self.top_p), np.uint64(self.seed), self.counter, self.tokens, self.done,
                              self.finished, self.stops, np.int32(self.n_stops)))
        return self.tokens
