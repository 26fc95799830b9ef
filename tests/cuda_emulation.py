"""Run CUDA kernel source on the CPU, to check a kernel's logic on a machine without a GPU.

The kernel text (the same string the CuPy module compiles) is compiled as C++ by the host compiler
with a small header that stands in for CUDA: every thread of a block is a host thread (blocks run
one after another), `__syncthreads` is a barrier of the block, `__shfl_xor_sync` goes through a
per-warp buffer and barrier, `__shared__` variables are function statics (one copy per kernel, as
one block at a time runs). float only (no cuda_fp16.h / cuda_bf16.h); the exp/log functions are the
host's. `build(source, launchers)` returns a ctypes library, or None when no C++ compiler is found.
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
