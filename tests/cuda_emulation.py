"""Run CUDA kernel source on the CPU, to check a kernel's logic on a machine without a GPU.

The kernel text (the same string the CuPy module compiles) is compiled as C++ by the host compiler
with a small header that stands in for CUDA: every thread of a block is a host thread (blocks run
one after another), `__syncthreads` is a barrier of the block, `__shfl_xor_sync` goes through a
per-warp buffer and barrier, `__shared__` variables are function statics (one copy per kernel, as
one block at a time runs). No cuda_fp16.h / cuda_bf16.h; the exp/log functions are the host's.
`build(source, launchers)` returns a ctypes library, or None when no C++ compiler is found.

FRAGMENT_HOST stands in for the device-only primitives of tensor/cuda/flash_attention.py
(`_PRIMITIVES`): float16/bfloat16 kept as uint16 bit patterns with round-to-nearest-even
conversions, and the warp-wide `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}` product computed
lane by lane from the documented fragment layouts (PTX ISA; groupID g = lane >> 2, t = lane % 4):
every lane posts its A (a0..a3) and B (b0, b1) registers to a per-warp buffer, then computes its own
c0..c3 (rows g, g+8, columns 2t, 2t+1) from the whole warp's registers.
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

HEADER = r"""
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#include <pthread.h>
using std::fmax; using std::max; using std::min;
struct Dim { unsigned x, y, z; };
thread_local Dim threadIdx{0, 0, 0};
static Dim blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};
static pthread_barrier_t block_bar, warp_bar[32];
static float shfl_buf[32][32];
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
struct float2 { float x, y; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
#define __syncthreads() pthread_barrier_wait(&block_bar)
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
static inline double __longlong_as_double(unsigned long long x) { double d; std::memcpy(&d, &x, 8); return d; }
static float __shfl_xor_sync(unsigned, float v, int o) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    shfl_buf[w][l] = v;
    pthread_barrier_wait(&warp_bar[w]);
    float r = shfl_buf[w][l ^ o];
    pthread_barrier_wait(&warp_bar[w]);
    return r;
}
static float __shfl_sync(unsigned, float v, int src) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    shfl_buf[w][l] = v;
    pthread_barrier_wait(&warp_bar[w]);
    float r = shfl_buf[w][src & 31];
    pthread_barrier_wait(&warp_bar[w]);
    return r;
}
static void launch(Dim grid, Dim block, const std::function<void()>& body) {
    gridDim = grid; blockDim = block;
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = Dim{bx, by, 0};
            pthread_barrier_init(&block_bar, nullptr, block.x);
            for (unsigned w = 0; w < (block.x + 31) / 32; ++w) pthread_barrier_init(&warp_bar[w], nullptr, 32);
            if (block.x == 1) {  // one thread: run it here
                threadIdx = Dim{0, 0, 0};
                body();
            } else {
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < block.x; ++t) ts.emplace_back([t, &body] { threadIdx = Dim{t, 0, 0}; body(); });
                for (auto& th : ts) th.join();
            }
            pthread_barrier_destroy(&block_bar);
            for (unsigned w = 0; w < (block.x + 31) / 32; ++w) pthread_barrier_destroy(&warp_bar[w]);
        }
}
"""


FRAGMENT_HOST = r"""
static inline float bf16_to_f32(unsigned short x) { return __uint_as_float((unsigned)x << 16); }
static inline unsigned short f32_to_bf16(float f) {           // round to nearest even; NaN stays NaN
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float f16_to_f32(unsigned short h) {
    unsigned sign = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) { float f = std::ldexp((float)m, -24); return sign ? -f : f; }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}
static inline unsigned short f32_to_f16(float f) {            // round to nearest even
    unsigned u = __float_as_uint(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);          // >= 65520: infinity
    if (a < 0x38800000u) return (unsigned short)(sign | (unsigned)std::nearbyint(__uint_as_float(a) * 16777216.0f));
    return (unsigned short)(sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
}
static unsigned mma_a_buf[32][32][4], mma_b_buf[32][32][2];
template <bool BF16>
static void mma_host(float c[4], const unsigned a[4], const unsigned b[2]) {
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31, g = l >> 2, t = l & 3;
    std::memcpy(mma_a_buf[w][l], a, sizeof(unsigned) * 4);
    std::memcpy(mma_b_buf[w][l], b, sizeof(unsigned) * 2);
    pthread_barrier_wait(&warp_bar[w]);
    auto half = [](unsigned reg, int hi) {
        unsigned short x = (unsigned short)(hi ? reg >> 16 : reg & 0xffffu);
        return (double)(BF16 ? bf16_to_f32(x) : f16_to_f32(x));
    };
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        double s = c[e];
        for (int k = 0; k < 16; ++k) {
            // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2
            double av = half(mma_a_buf[w][(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k & 1);
            // B[k][col]: lane col * 4 + (k % 8) / 2, register (k >= 8), half k % 2
            double bv = half(mma_b_buf[w][col * 4 + (k % 8) / 2][k >= 8], k & 1);
            s += av * bv;
        }
        c[e] = (float)s;
    }
    pthread_barrier_wait(&warp_bar[w]);
}
static inline void mma_bf16(float c[4], const unsigned a[4], const unsigned b[2]) { mma_host<true>(c, a, b); }
static inline void mma_f16(float c[4], const unsigned a[4], const unsigned b[2]) { mma_host<false>(c, a, b); }
static inline void copy16(void* dst, const void* src) { std::memcpy(dst, src, 16); }
static inline void zero16(void* dst) { std::memset(dst, 0, 16); }
"""


def _plain(source: str) -> str:
    return source.replace("#include <cuda_fp16.h>", "").replace("#include <cuda_bf16.h>", "") \
        .replace('extern "C" __global__', "__global__")


def build(source: str, launchers: str) -> ctypes.CDLL | None:
    """HEADER + the kernels + `launchers` (extern "C" host functions calling `launch`) as a shared
    library (cached in the temporary directory by a hash of the text); None without g++/c++."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    text = HEADER + _plain(source) + launchers
    tag = hashlib.sha256(text.encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"tglm_cuda_emulation_{tag}.so"
    if not out.exists():
        src = out.with_suffix(".cpp")
        src.write_text(text)
        tmp = out.with_suffix(f".{tag}.tmp")
        subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-pthread", "-o", str(tmp), str(src)],
                       check=True, capture_output=True)
        tmp.replace(out)
    return ctypes.CDLL(str(out))
