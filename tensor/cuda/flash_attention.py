"""Fused attention on the GPU in the manner of FlashAttention-2: softmax(Q K^T / sqrt(D) + mask) V and
its backward without ever forming the (Tq, Tk) scores in memory.

Shapes: q (B, H, Tq, D), k and v (B, H, Tk, D), one dtype (float16, bfloat16 or float32), D in {32, 64, 128}:
views of any batch, head and row strides with D contiguous and every row 16-byte aligned (`views_fit`), so
the heads inside a fused (B, T, 3C) qkv buffer are read where they lie and O (and dQ, dK, dV) written into
token-major buffers, with no head permute (tensor/cuda/attention.py's fused op); causal (query i sits at i + Tk - Tq, tensor/attention.py's
allowed_keys) or not; an optional key-padding mask (B, Tk) bool, True = attend. No dropout: with
dropout_p > 0 tensor/cuda/attention.py keeps its cuBLAS path (which draws the reference's keep-mask).

    forward  (flash_fwd, block = 64 query rows, 4 warps of 16 rows): K/V tiles of N keys streamed
             through shared memory (cp.async, double-buffered where two stages fit the 48 KiB of
             static shared memory); S = Q K^T on the tensor cores, online softmax (running max m and
             sum l per row, float32, base-2 exponentials), O += P V; fully masked causal tiles skipped.
             Out: O in the input dtype and L = m + log(l), the row log-sum-exp of the scaled scores
             (float32, (B, H, Tq)); a row with every key masked gives O = 0 and L = +inf (then P = 0
             in backward), the reference's P = 0 row.
    backward (FA-2): Delta = rowsum(dO * O) (flash_bwd_delta); per block of 64 (or 128) keys, a loop over
             query tiles recomputing P = exp(S / sqrt(D) - L): dV += P^T dO, dP = dO V^T,
             dS = P (dP - Delta), dK += dS^T Q / sqrt(D) (flash_bwd_dkdv). dQ = dS K / sqrt(D):
             16-bit types in the same loop (dS^T through shared memory, the tile's (N, D) product
             added by float32 atomics into a buffer that flash_bwd_delta zeroes, then cast by
             flash_bwd_dq_convert: summation order not deterministic); float32 by its own kernel per
             block of 64 queries recomputing S and dP over key tiles (flash_bwd_dq, deterministic).
             The dK/dV kernel's tiles live in dynamic shared memory (dkdv_smem_bytes). Its builds
             (BWD_VARIANTS: warps per block, dQ atomic width, grid order, stages, register bound, exp2,
             and the Delta kernel's loads) are template parameters (BwdV, each trade stated there);
             BWD_DEFAULT picks one per dtype and head size (benchmarks/tune_flash.py times them all).
             Above D = 64 the block's V sits in shared memory beside K (DkdvSmem::VS).

The kernels are CUDA C++ text: flash_tiles.py (the PTX primitives, the dtype traits, the fragment and
tile loads, and the fragment layout of the tensor-core products), flash_forward_kernel.py and
flash_backward_kernels.py, compiled together as one module (`_PRIMITIVES + _SOURCE`). No host sync, no
data-dependent allocation, kernels on CuPy's current stream: capturable in a CUDA graph.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from tensor import backend
from tensor.cuda.common import cupy, element_strides, empty, usable, views_fit
from tensor.cuda.flash_backward_kernels import BACKWARD
from tensor.cuda.flash_forward_kernel import FORWARD
from tensor.cuda.flash_tiles import PRIMITIVES, TILES

HEADS = (32, 64, 128)   # head sizes compiled
BLOCK = 64              # rows (queries in fwd/dq, keys in dkdv) per block: 4 warps x 16
# the forward's query tiles of 16 rows per warp (flash_fwd's MT; 1 where absent): with 2 a block takes 128
# rows and each K/V fragment read from shared memory feeds two products (registers: 16-bit types, D <= 64)
FWD_ROW_TILES = {("bfloat16", 32): 2, ("bfloat16", 64): 2, ("float16", 32): 2, ("float16", 64): 2}
# the forward's key tile N per (dtype, D) where it differs from tile()'s; empty: 64-key tiles at 16-bit D = 128
# (one stage of K/V in the 48 KiB, no prefetch) measured slower than 32 (RESULTS.md); tests keep that build
# correct, benchmarks/tune_flash.py --fwd-key-tiles times it
FWD_KEY_TILES: dict = {}
TRAITS = {"float32": "Fp32", "float16": "Fp16", "bfloat16": "Bf16"}
# the module's text: the PTX primitives (device only), then what tests/test_flash_on_cpu.py also runs on the CPU
_PRIMITIVES = PRIMITIVES
_SOURCE = TILES + FORWARD + BACKWARD


def tile(dtype_name: str, D: int, backward: bool) -> int:
    """N, the streamed tile (keys in fwd/dq, queries in dkdv): 64, or 32 where registers or the 48 KiB of
    static shared memory would not hold 64 (forward: D*itemsize = 256, where 32 lets two stages of K/V
    fit, and beyond; backward: D*itemsize > 128), 16 for float32 D=128 backward (registers: the dK/dV
    kernel spilled at 32)."""
    size = D * (4 if dtype_name == "float32" else 2)
    if backward and size >= 512:
        return 16
    return 64 if size < (256 if not backward else 129) else 32


class BwdVariant(NamedTuple):
    """One build of the backward (BwdV and flash_bwd_delta in flash_backward_kernels.py, where each field's trade is stated):
    warps per dK/dV block (4: 64 keys, 8: 128 keys), the fused dQ's atomic width (1, 2, 4 floats; 16-bit
    types only), heavy_first (grid (B * H, key blocks)), query-tile stages (0: 2 where 48 KiB hold them,
    else 1), min_blocks per SM for the register bound (0: none), fast_exp (ex2.approx.ftz), and
    delta_vec (the Delta kernel's 16-byte loads)."""
    warps: int = 4
    atom: int = 1
    heavy_first: bool = False
    stages: int = 0
    min_blocks: int = 0
    fast_exp: bool = False
    delta_vec: bool = False


# the backward's builds, by name; BWD_DEFAULT picks one per dtype, or per (dtype, head size) where such a key
# is present (benchmarks/tune_flash.py times them all)
BWD_VARIANTS = {
    "base": BwdVariant(),                             # 64 keys per block, scalar atomics (the first build)
    "vec2": BwdVariant(atom=2),
    "vec4": BwdVariant(atom=4),
    "heavy": BwdVariant(heavy_first=True),
    "vec2_heavy_st2": BwdVariant(atom=2, heavy_first=True, stages=2),
    "w8": BwdVariant(warps=8, stages=2),              # 128 keys per block
    "w8_vec2": BwdVariant(warps=8, atom=2, stages=2),
    "w8_vec2_heavy": BwdVariant(warps=8, atom=2, heavy_first=True, stages=2),
    "w8_vec4_heavy": BwdVariant(warps=8, atom=4, heavy_first=True, stages=2),
    "occ3_vec2": BwdVariant(atom=2, min_blocks=3),   # 4 warps, registers capped for 3 blocks per SM
    "vec2_heavy_fast": BwdVariant(atom=2, heavy_first=True, fast_exp=True, delta_vec=True),
    "w8_vec4_heavy_fast": BwdVariant(warps=8, atom=4, heavy_first=True, stages=2, fast_exp=True, delta_vec=True),
    "occ3_vec4_dvec": BwdVariant(atom=4, min_blocks=3, delta_vec=True),
    "occ3_vec4_heavy_st2_dvec": BwdVariant(atom=4, heavy_first=True, stages=2, min_blocks=3, delta_vec=True),
    "vec2_heavy_st2_dvec": BwdVariant(atom=2, heavy_first=True, stages=2, delta_vec=True),
    "vec4_heavy_st2_dvec": BwdVariant(atom=4, heavy_first=True, stages=2, delta_vec=True),
    "w8_vec4_heavy_dvec": BwdVariant(warps=8, atom=4, heavy_first=True, stages=2, delta_vec=True),
}
# chosen by benchmarks/tune_flash.py on the H200 (RESULTS.md): the fastest backward per head size
BWD_DEFAULT = {"float32": "base", "float16": "occ3_vec2", "bfloat16": "occ3_vec2",
               **{(dt, D): "vec2_heavy_st2_dvec" for dt in ("float16", "bfloat16") for D in (64, 128)}}


def default_variant(dtype_name: str, D: int) -> str:
    """BWD_DEFAULT's backward build for this dtype and head size."""
    return BWD_DEFAULT.get((dtype_name, D), BWD_DEFAULT[dtype_name])


def _variant(dtype_name: str, D: int, variant: str | None) -> BwdVariant:
    name = default_variant(dtype_name, D) if variant is None else variant
    if name not in BWD_VARIANTS:
        raise ValueError(f"flash backward: variant {name!r}, expected one of {sorted(BWD_VARIANTS)}")
    return BWD_VARIANTS[name]


def dkdv_smem_bytes(dtype_name: str, D: int, variant: str | None = None) -> int:
    """Dynamic shared memory of the dK/dV kernel (the count of DkdvSmem in _SOURCE: ST stages of the (N, D)
    Q and dO tiles, K and dS^T of the block's keys with the fused dQ (and V above D = 64), rows padded by 8; then ST * N
    float32 L and Delta); the kernel traps when launched with less."""
    V, N, pad = _variant(dtype_name, D, variant), tile(dtype_name, D, True), 8
    item = 4 if dtype_name == "float32" else 2
    fk, fn = (16 * V.warps, N) if fused_dq(dtype_name) else (1, 1)
    fv = 16 * V.warps if fused_dq(dtype_name) and D > 64 else 0   # V of the block's keys (DkdvSmem::VS)

    def nbytes(st: int) -> int:
        return -(-(2 * st * N * (D + pad) + fk * (D + pad) + fk * (fn + pad) + fv * (D + pad)) * item // 16) * 16 + 8 * st * N
    return nbytes(V.stages or (2 if nbytes(2) <= 48 * 1024 else 1))


def kernel_names(dtype_name: str, D: int, variant: str | None = None) -> dict:
    """The four kernels of one dtype, head size and backward variant (None: BWD_DEFAULT's):
    {"fwd", "delta", "dkdv", "dq" or "dq_convert"} -> name expression."""
    tr, nf, nb = TRAITS[dtype_name], FWD_KEY_TILES.get((dtype_name, D), tile(dtype_name, D, False)), tile(dtype_name, D, True)
    V = _variant(dtype_name, D, variant)
    b = {True: "true", False: "false"}
    bv = f"BwdV<{V.warps},{V.atom},{b[V.heavy_first]},{V.stages},{V.min_blocks},{b[V.fast_exp]}>"
    names = {"fwd": f"flash_fwd<{tr},{D},{nf},{fwd_row_tiles(dtype_name, D)}>", "delta": f"flash_bwd_delta<{tr},{D},{b[V.delta_vec]}>",
             "dkdv": f"flash_bwd_dkdv<{tr},{D},{nb},{bv}>"}
    if fused_dq(dtype_name):
        names["dq_convert"] = f"flash_bwd_dq_convert<{tr},{D}>"
    else:
        names["dq"] = f"flash_bwd_dq<{tr},{D},{nb}>"
    return names


def fwd_row_tiles(dtype_name: str, D: int) -> int:
    """MT, the forward's 16-row query tiles per warp (64 MT rows a block): FWD_ROW_TILES's entry for
    (dtype, D), else 1."""
    return FWD_ROW_TILES.get((dtype_name, D), 1)


def fused_dq(dtype_name: str) -> bool:
    """16-bit types add dQ into a float32 buffer by atomics in the dK/dV kernel (the traits' FUSED_DQ);
    float32 (no ldmatrix, and its buffers would pass 48 KiB of shared memory at D=128) has its own dQ kernel."""
    return dtype_name != "float32"


@functools.lru_cache(maxsize=None)
def _module(names: tuple) -> dict:
    """Kernels compiled together: {key: function} for the (key, name expression) pairs (NVRTC takes seconds
    per module)."""
    mod = cupy().RawModule(code=_PRIMITIVES + _SOURCE, options=("--std=c++17",), name_expressions=[n for _, n in names])
    return {key: mod.get_function(n) for key, n in names}


@functools.lru_cache(maxsize=None)
def _allow_smem(kernel: Any, nbytes: int) -> Any:
    """kernel, allowed nbytes of dynamic shared memory (CUDA's default limit is 48 KiB); once per kernel."""
    kernel.max_dynamic_shared_size_bytes = nbytes
    return kernel


def _kernels(dtype_name: str, D: int, variant: str | None = None) -> dict:
    """The kernels of kernel_names, compiled at their first use: one module per dtype and head size, and one
    per backward variant for its dK/dV kernel."""
    names = kernel_names(dtype_name, D, variant)
    own = ("dkdv", "delta")   # the variant's own module
    out = dict(_module(tuple((key, n) for key, n in names.items() if key not in own)))
    out.update(_module(tuple((key, names[key]) for key in own)))
    out["dkdv"] = _allow_smem(out["dkdv"], dkdv_smem_bytes(dtype_name, D, variant))
    return out


def _strides(*arrays: Any) -> tuple:
    """The kernels' stride arguments of (B, H, T, D) arrays, in elements: batch and head as int64, row as int32."""
    out: tuple = ()
    for a in arrays:
        sb, sh, st, _ = element_strides(a)
        out += (np.int64(sb), np.int64(sh), np.int32(st))
    return out


def fits(q: Any, k: Any, v: Any, mask: Any = None, causal: bool = True, dropout_p: float = 0.0) -> bool:
    """Whether forward/backward take these arrays: CuPy q (B, H, Tq, D), k, v (B, H, Tk, D), one float16/
    bfloat16/float32 dtype, views the kernels address in place (views_fit; k and v of one layout), D in HEADS,
    Tq <= Tk when causal, B * H <= 65535; mask None or a CuPy bool (B, Tk); no dropout."""
    if k is None or v is None or dropout_p != 0.0 or not usable(q, k, v, contiguous=False):
        return False
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return False
    if q.shape[3] not in HEADS or not q.dtype == k.dtype == v.dtype or min(q.shape[2], k.shape[2]) == 0:
        return False
    if (causal and q.shape[2] > k.shape[2]) or not views_fit(q, k, v) or k.strides != v.strides:
        return False
    if q.shape[0] * q.shape[1] > 65535:   # grid.y
        return False
    if mask is not None:
        if backend.array_module(mask) is np or mask.dtype != bool or mask.shape != (k.shape[0], k.shape[2]):
            return False
    return True


def _args(q: Any, k: Any, mask: Any, causal: bool) -> tuple:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    m = q if mask is None else (mask if mask.flags.c_contiguous else mask.copy())
    i32 = np.int32
    return m, (i32(H), i32(Tq), i32(Tk), i32(bool(causal)), i32(mask is not None)), \
        np.float32(math.log2(math.e) / math.sqrt(D))


def _out_view(name: str, a: Any, like: Any) -> Any:
    """`a` (a given output), checked: like's shape and dtype, a view the kernels address (views_fit)."""
    if a.shape != like.shape or a.dtype != like.dtype or not views_fit(a):
        raise ValueError(f"flash attention: {name} must be a {like.shape} {like.dtype} view with D contiguous and "
                         f"16-byte aligned rows, got {a.shape} {a.dtype} strides {a.strides}")
    return a


def forward(q: Any, k: Any, v: Any, mask: Any = None, causal: bool = True, out: Any = None) -> tuple:
    """(O (B, H, Tq, D) in q's dtype, L (B, H, Tq) float32 row log-sum-exp) of softmax(Q K^T / sqrt(D) + mask) V.
    Check `fits` first. out: where to write O (a view of q's shape, e.g. the heads of a (B, Tq, H, D) buffer);
    default a new C-contiguous array."""
    B, H, Tq, D = q.shape
    o = empty(q.shape, q.dtype) if out is None else _out_view("out", out, q)
    lse = empty((B, H, Tq), np.float32)
    m, ints, scale_log2 = _args(q, k, mask, causal)
    name = backend.dtype_name(q.dtype)
    _kernels(name, D)["fwd"](
        (-(-Tq // (BLOCK * fwd_row_tiles(name, D))), B * H), (128,),
        (q, k, v, m, o, lse) + ints + (scale_log2,) + _strides(q, k, o))
    return o, lse


def backward(g: Any, q: Any, k: Any, v: Any, o: Any, lse: Any, mask: Any = None, causal: bool = True,
             out: tuple = (None, None, None), variant: str | None = None) -> tuple:
    """(dQ, dK, dV) in q's dtype for dL/dO = g (q's dtype and shape, laid out as O: the same strides), from
    forward's O and L; each written into `out` where given (views of q's / k's shape the kernels address; dK
    and dV of one layout), else into new C-contiguous arrays. variant: a name in BWD_VARIANTS (None:
    default_variant's)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dtype_name = backend.dtype_name(q.dtype)
    V = _variant(dtype_name, D, variant)
    if g.shape != o.shape or g.dtype != o.dtype or g.strides != o.strides:
        raise ValueError(f"flash attention backward: dO must be laid out as O ({o.shape} {o.dtype} strides "
                         f"{o.strides}), got {g.shape} {g.dtype} strides {g.strides}")
    dq, dk, dv = (empty(a.shape, a.dtype) if d is None else _out_view(name, d, a)
                  for d, a, name in zip(out, (q, k, v), ("dq", "dk", "dv")))
    if dk.strides != dv.strides:
        raise ValueError(f"flash attention backward: dk and dv must share strides, got {dk.strides} and {dv.strides}")
    delta = empty((B, H, Tq), np.float32)
    m, ints, scale_log2 = _args(q, k, mask, causal)
    scale = np.float32(1.0 / math.sqrt(D))
    kern = _kernels(dtype_name, D, variant)
    fused = fused_dq(dtype_name)
    dq_acc = empty(q.shape if fused else (0,), np.float32)   # float32 dQ sums (zeroed by the delta kernel)
    rows_per_block = 128 // (D * q.dtype.itemsize // 16) if V.delta_vec else 4
    kern["delta"]((-(-(B * H * Tq) // rows_per_block),), (128,),
                  (g, o, delta, dq_acc, np.int32(B * H * Tq), np.int32(H), np.int32(Tq)) + _strides(o))
    strides = _strides(q, k, o)
    kblocks = -(-Tk // (16 * V.warps))
    kern["dkdv"]((B * H, kblocks) if V.heavy_first else (kblocks, B * H), (32 * V.warps,),
                 (q, k, v, m, g, lse, delta, dk, dv, dq_acc) + ints + (scale_log2, scale) + strides + _strides(dk),
                 shared_mem=dkdv_smem_bytes(dtype_name, D, variant))
    if fused:
        kern["dq_convert"]((-(-(dq.size // 8) // 256),), (256,),   # 8 elements a thread
                           (dq_acc, dq, np.int64(dq.size // 8), scale, np.int32(H), np.int32(Tq)) + _strides(dq))
    else:
        kern["dq"](
            (-(-Tq // BLOCK), B * H), (128,),
            (q, k, v, m, g, lse, delta, dq) + ints + (scale_log2, scale) + strides + _strides(dq))
    return dq, dk, dv
