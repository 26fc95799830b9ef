"""Run CUDA kernel source on the CPU, to check a kernel's logic on a machine without a GPU.

The kernel text (the same string the CuPy module compiles) is compiled as C++ by the host compiler
with a small header that stands in for CUDA: every thread of a block is a host thread (blocks run
one after another), `__syncthreads` is a barrier of the block, `__shfl_xor_sync` goes through a
per-warp buffer and barrier, `__shared__` variables are function statics (one copy per kernel, as
one block at a time runs) poisoned with 0xff bytes (NaN) before every block, so a kernel that reads
shared memory it did not write this block fails its test. No cuda_fp16.h / cuda_bf16.h; the exp/log functions are the host's.
`build(source, launchers)` returns a ctypes library, or None when no C++ compiler is found.

FRAGMENT_HOST stands in for the device-only primitives of tensor/cuda/flash_tiles.py
(`PRIMITIVES`): float16/bfloat16 kept as uint16 bit patterns with round-to-nearest-even
conversions, and the warp-wide `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}` product computed
lane by lane from the documented fragment layouts (PTX ISA; groupID g = lane >> 2, t = lane % 4):
every lane posts its A (a0..a3) and B (b0, b1) registers to a per-warp buffer, then computes its own
c0..c3 (rows g, g+8, columns 2t, 2t+1) from the whole warp's registers; `ldmatrix` (.x4, .trans)
likewise from the row addresses the warp's lanes post; cp.async copies queued per thread and performed
at cp.async.wait_group (so a read before the wait sees poison); float atomicAdd and the vector reductions
(red.global.add.v2/.v4.f32) under a mutex; dynamic shared memory one poisoned buffer of the launch's size.
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HEADER = r"""
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
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
// __shared__ variables: function statics (one copy per kernel instantiation). _plain() follows each
// declaration with a registration that poisons the variable (every byte 0xff: NaN in float32, float16
// and bfloat16) when first reached, and launch() poisons every registered one before each block, as a
// GPU's shared memory holds whatever was there before
#define __shared__ static
static std::mutex shared_mutex;
static std::vector<std::pair<void*, size_t>> shared_regions;
static bool register_shared(void* p, size_t n) {
    std::lock_guard<std::mutex> lock(shared_mutex);
    std::memset(p, 0xff, n);
    shared_regions.emplace_back(p, n);
    return true;
}
// dynamic shared memory (extern __shared__): one buffer of the launch's byte count, poisoned likewise
alignas(128) static unsigned char dynamic_smem[227 * 1024];
static unsigned dynamic_smem_bytes = 0;
static void poison_shared() {
    for (auto& r : shared_regions) std::memset(r.first, 0xff, r.second);
    std::memset(dynamic_smem, 0xff, dynamic_smem_bytes);
}
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
struct float2 { float x, y; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
#define __syncthreads() pthread_barrier_wait(&block_bar)
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
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
static void launch(Dim grid, Dim block, const std::function<void()>& body, unsigned smem = 0) {
    if (smem > sizeof(dynamic_smem)) std::abort();   // beyond an sm_90 block's 227 KiB
    gridDim = grid; blockDim = block; dynamic_smem_bytes = smem;
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = Dim{bx, by, 0};
            poison_shared();
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
// CuPy's way of launching: each argument a pointer to its value (cuLaunchKernel's kernelParams),
// checked against the kernel's parameter types first (the size and kind of what the caller packed:
// CuPy packs a Python int as 8 bytes and a float as a double, which a kernel's int or float misreads)
template <class A> constexpr int arg_kind() {
    return std::is_pointer<A>::value ? 1 : std::is_floating_point<A>::value ? 2 : 3;   // pointer, float, int
}
template <class... A, size_t... I>
static void call_packed(void (*f)(A...), void* const* p, std::index_sequence<I...>) { f(*(const A*)p[I]...); }
template <class... A, size_t... I>
static int check_packed(const int* sizes, const int* kinds, std::index_sequence<I...>) {
    int bad = 0;
    ((bad = bad ? bad : (sizes[I] != (int)sizeof(A) || kinds[I] != arg_kind<A>()) ? (int)I + 1 : 0), ...);
    return bad;
}
// 0 when launched; -1: wrong argument count; i > 0: argument i - 1 of the wrong size or kind
template <class... A>
static int launch_packed(void (*f)(A...), Dim grid, Dim block, unsigned smem, int n, void* const* p,
                         const int* sizes, const int* kinds) {
    if (n != (int)sizeof...(A)) return -1;
    const int bad = check_packed<A...>(sizes, kinds, std::index_sequence_for<A...>{});
    if (bad) return bad;
    launch(grid, block, [=] { call_packed(f, p, std::index_sequence_for<A...>{}); }, smem);
    return 0;
}
"""


def packed_launcher(name: str, kernel: str) -> str:
    """extern "C" int name(gx, gy, gz, bx, by, bz, smem, n, args, sizes, kinds): `kernel` (a name expression)
    launched the way CuPy launches it (smem: bytes of dynamic shared memory); see EmulatedKernel."""
    return (f'extern "C" int {name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, '
            f'unsigned smem, int n, void* const* p, const int* sizes, const int* kinds) {{\n'
            f'    return launch_packed(&{kernel}, Dim{{gx, gy, gz}}, Dim{{bx, by, bz}}, smem, n, p, sizes, kinds);\n}}\n')


class EmulatedKernel:
    """Stands in for a cupy.RawKernel: `kernel(grid, block, args)` packs each argument as CuPy would
    (a NumPy array: its data pointer; np.int32 / np.float32: 4 bytes; a Python int: 8-byte integer;
    a Python float: double) and runs it on the CPU, after checking the packed sizes and kinds against
    the kernel's parameters and the grid against CUDA's limits (grid.y, grid.z <= 65535, 1024 threads,
    dynamic shared memory up to max_dynamic_shared_size_bytes, which the caller sets above 48 KiB as on a GPU)."""

    def __init__(self, lib: ctypes.CDLL, symbol: str, name: str):
        self.fn, self.name = getattr(lib, symbol), name
        self.fn.restype = ctypes.c_int
        self.launches = 0
        self.max_dynamic_shared_size_bytes = 48 * 1024   # as a CUDA function's default; set above to allow more

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        import numpy as np
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        if not (grid[0] < 2**31 and grid[1] <= 65535 and grid[2] <= 65535 and 0 < block[0] * block[1] * block[2] <= 1024):
            raise ValueError(f"{self.name}: launch grid {grid} block {block} beyond CUDA's limits")
        if min(grid) < 1:
            raise ValueError(f"{self.name}: empty grid {grid}")
        vals, sizes, kinds = [], [], []
        for a in args:
            if isinstance(a, np.ndarray):
                v, kind = ctypes.c_void_p(a.ctypes.data), 1
            elif isinstance(a, (np.floating, float)):
                v, kind = (ctypes.c_float(a) if isinstance(a, np.float32) else ctypes.c_double(a)), 2
            elif isinstance(a, (np.integer, int)):
                v, kind = (ctypes.c_int32(a) if isinstance(a, np.int32) else ctypes.c_int64(a)), 3
            else:
                raise TypeError(f"{self.name}: argument of type {type(a).__name__}")
            vals.append(v), sizes.append(ctypes.sizeof(v)), kinds.append(kind)
        n = len(vals)
        ptrs = (ctypes.c_void_p * n)(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        if not 0 <= shared_mem <= self.max_dynamic_shared_size_bytes:
            raise ValueError(f"{self.name}: {shared_mem} bytes of dynamic shared memory, the function allows "
                             f"{self.max_dynamic_shared_size_bytes}")
        r = self.fn(*(ctypes.c_uint(x) for x in grid + block), ctypes.c_uint(shared_mem), ctypes.c_int(n), ptrs, (ctypes.c_int * n)(*sizes),
                    (ctypes.c_int * n)(*kinds))
        if r == -1:
            raise TypeError(f"{self.name}: {n} arguments, not the kernel's count")
        if r > 0:
            raise TypeError(f"{self.name}: argument {r - 1} ({args[r - 1]!r:.40}) packed as {sizes[r - 1]} bytes "
                            f"of kind {kinds[r - 1]}, not the kernel's parameter type")
        self.launches += 1


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
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: every lane posts its row address, then takes its
// words: r[i] = matrix i (rows at the addresses of lanes 8i .. 8i+7), row l/4, columns 2(l%4) and
// 2(l%4)+1, or with .trans rows 2(l%4), 2(l%4)+1 of column l/4; the first element in the low half
static const void* ldsm_buf[32][32];
static void ldsm_host(unsigned r[4], const void* row, bool trans) {
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (((size_t)row) % 16) std::abort();   // ldmatrix rows must be 16-byte aligned
    ldsm_buf[w][l] = row;
    pthread_barrier_wait(&warp_bar[w]);
    for (int i = 0; i < 4; ++i) {
        unsigned short lo, hi;
        if (!trans) {
            const unsigned short* p = (const unsigned short*)ldsm_buf[w][8 * i + l / 4];
            lo = p[2 * (l % 4)]; hi = p[2 * (l % 4) + 1];
        } else {
            lo = ((const unsigned short*)ldsm_buf[w][8 * i + 2 * (l % 4)])[l / 4];
            hi = ((const unsigned short*)ldsm_buf[w][8 * i + 2 * (l % 4) + 1])[l / 4];
        }
        r[i] = (unsigned)lo | ((unsigned)hi << 16);
    }
    pthread_barrier_wait(&warp_bar[w]);
}
static inline void ldsm_x4(unsigned r[4], const void* row) { ldsm_host(r, row, false); }
static inline void ldsm_x4_trans(unsigned r[4], const void* row) { ldsm_host(r, row, true); }
// cp.async: a copy is only queued; commit_group closes the thread's open group, and wait_group<n>
// performs every group but the newest n (in order). Data land in shared memory at the wait, not
// before, so a kernel that reads a tile before waiting for it reads the poison (or a stale tile).
struct PendingCopy { void* dst; const void* src; bool valid; };
thread_local std::vector<PendingCopy> cp_open;
thread_local std::vector<std::vector<PendingCopy>> cp_groups;
static inline void cp_async16(void* dst, const void* src, bool valid) {
    if (((size_t)dst) % 16 || ((size_t)src) % 16) std::abort();   // cp.async 16 needs aligned addresses
    cp_open.push_back(PendingCopy{dst, src, valid});
}
static inline void cp_async_commit() { cp_groups.push_back(cp_open); cp_open.clear(); }
template <int n>
static inline void cp_async_wait() {
    while ((int)cp_groups.size() > n) {
        for (const PendingCopy& c : cp_groups.front()) {
            if (c.valid) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        }
        cp_groups.erase(cp_groups.begin());
    }
}
static std::mutex atomic_mutex;
static inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> lock(atomic_mutex);
    const float old = *p;
    *p = old + v;
    return old;
}
// red.global.add.v2/.v4.f32: each element added atomically (one lock for the vector; the operand
// alignment the PTX demands checked)
static inline void red_add_v2(float* p, float a, float b) {
    if (((size_t)p) % 8) std::abort();
    std::lock_guard<std::mutex> lock(atomic_mutex);
    p[0] += a; p[1] += b;
}
static inline void red_add_v4(float* p, float a, float b, float c, float d) {
    if (((size_t)p) % 16) std::abort();
    std::lock_guard<std::mutex> lock(atomic_mutex);
    p[0] += a; p[1] += b; p[2] += c; p[3] += d;
}
// ex2.approx.ftz.f32: the host's exp2f (the GPU's is within 2 ulp of it; neither's result is a test's)
static inline float fast_exp2(float x) { return std::exp2(x); }
// extern __shared__: the launch's buffer (HEADER's dynamic_smem) and its byte count
#define FA_DYNAMIC_SMEM(name) unsigned char* name = dynamic_smem
static inline unsigned dynamic_smem_size() { return dynamic_smem_bytes; }
[[noreturn]] static inline void __trap() { std::abort(); }
static inline void copy16(void* dst, const void* src) { std::memcpy(dst, src, 16); }
static inline void zero16(void* dst) { std::memset(dst, 0, 16); }
"""


def _register_shared(source: str) -> str:
    """Each `__shared__ T a[..], b[..];` followed by `static const bool` registrations of a and b (see
    HEADER's register_shared: poisoned shared memory)."""
    out, pos, n = [], 0, 0
    for m in re.finditer(r"__shared__([^;]*);", source):
        decl = re.sub(r"__align__\([^)]*\)", "", m.group(1))
        names = []
        for i, part in enumerate(decl.split(",")):
            head = part.split("[")[0].strip()
            names.append(re.findall(r"\w+", head)[-1] if i == 0 else head)
        regs = "".join(f" static const bool tglm_shared_{n + j} = register_shared(&{x}, sizeof({x}));"
                       for j, x in enumerate(names))
        n += len(names)
        out.append(source[pos:m.end()] + regs)
        pos = m.end()
    return "".join(out) + source[pos:]


def _plain(source: str) -> str:
    source = source.replace("#include <cuda_fp16.h>", "").replace("#include <cuda_bf16.h>", "") \
        .replace('extern "C" __global__', "__global__")
    return _register_shared(source)


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
