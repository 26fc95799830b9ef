"""The fused attention kernels' CUDA source (tensor/cuda/flash_attention.py) run on the CPU through
tests/cuda_emulation.py: host threads for CUDA threads, float16/bfloat16 as uint16 bit patterns with
round-to-nearest-even, and the m16n8k16 tensor-core product computed lane by lane from the PTX
fragment layouts (cuda_emulation.FRAGMENT_HOST). Forward (O and the row log-sum-exp) and backward
(dQ, dK, dV) against tensor/attention.py's reference formulas in float64 on the same rounded inputs:
ragged tiles, one query, Tq < Tk, causal and not, a key-padding mask with fully masked rows, D = 32,
64, 128, each dtype; every backward build (FA.BWD_VARIANTS: 128-key blocks, red.v2/v4 dQ reductions,
heavy-first grid, stages, register bound, fast exp2, vector Delta) on a subset, with the dK/dV kernel's
dynamic shared memory checked against the kernel's own count. tests/test_gpu_flash.py checks the same on a
GPU. Skipped without a C++ compiler."""
from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

from cuda_emulation import FRAGMENT_HOST, EmulatedKernel, build, packed_launcher
from tensor.attention import allowed_keys, sdpa_backward, sdpa_forward
from tensor.cuda import flash_attention as FA
from test_gpu_flash import check

ml_dtypes = pytest.importorskip("ml_dtypes")
COMBOS = [("bfloat16", 32), ("bfloat16", 64), ("bfloat16", 128), ("float16", 64), ("float32", 32), ("float32", 128)]
TOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-5}   # max |error| / max(max |reference|, 1)
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
# backward variants (FA.BWD_VARIANTS) beyond BWD_DEFAULT's, on a few cases each (ALL_ON: the two builds that
# switch every option on, at 4 and 8 warps)
ALL_ON = ["vec2_heavy_fast", "w8_vec4_heavy_fast"]
EVERY_OPTION = ["w8_vec2", "vec4", "vec2_heavy_st2", "occ3_vec2"] + ALL_ON   # each option on at least once
VARIANT_CASES = [  # a case, and the builds it runs (the emulation's threads make each run seconds)
    (("bfloat16", 64, 1, 1, 130, 130, True, False), EVERY_OPTION),   # two 128-key blocks, three of 64, ragged
    (("bfloat16", 32, 2, 1, 40, 70, True, True), ALL_ON + ["w8", "heavy"]),   # Tq < Tk, padding mask
    (("bfloat16", 128, 1, 1, 40, 40, False, False), list(FA.BWD_VARIANTS)),  # D=128: query tiles of 32
    (("float16", 64, 1, 1, 33, 33, False, True), ALL_ON),   # not causal, masked
    (("float32", 32, 1, 1, 17, 17, True, False), ALL_ON),   # float32: the separate dQ kernel
]
VARIANTS = {}   # (dtype, D) -> the builds compiled
for (dt, D, *_), vs in VARIANT_CASES:
    VARIANTS.setdefault((dt, D), []).extend(vs)
_NAMES = sorted({n for dt, D in COMBOS for v in [None] + VARIANTS.get((dt, D), [])
                 for n in FA.kernel_names(dt, D, v).values()} | {"flash_fwd<Bf16,128,64,1>", "flash_fwd<Bf16,128,32,1>"})
_SYMBOLS = {n: f"run_{i}" for i, n in enumerate(_NAMES)}   # name expression -> launcher
_SMEM = {n: f"smem_{i}" for i, n in enumerate(_NAMES) if n.startswith("flash_bwd_dkdv<")}
_lib = build(FRAGMENT_HOST + FA._SOURCE,
             "".join(packed_launcher(sym, n) for n, sym in _SYMBOLS.items())
             + "".join(f'extern "C" int {sym}() {{ return {n.replace("flash_bwd_dkdv<", "DkdvSmem<", 1)}::BYTES; }}\n'
                       for n, sym in _SMEM.items()))
pytestmark = pytest.mark.skipif(_lib is None, reason="needs a C++ compiler (g++)")
GUARD = 64   # bytes of poison before and after every input


def poisoned(shape, dtype) -> np.ndarray:
    """An array of every byte 0xff (NaN in each float dtype): what the kernels must overwrite, or never
    read, as on a GPU whose uninitialised memory holds anything. Inputs are copied into the middle of
    a poisoned buffer (16-byte aligned), so an out-of-bounds read that reaches a result makes it NaN."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.full(n + 2 * GUARD + 16, 0xFF, np.uint8)
    start = GUARD + (-(buf.ctypes.data + GUARD) % 16)
    return buf[start:start + n].view(dtype).reshape(shape)


def guarded(a: np.ndarray) -> np.ndarray:
    out = poisoned(a.shape, a.dtype)
    out[...] = a
    return out


@pytest.fixture
def emulated(monkeypatch):
    """tensor/cuda/flash_attention.py's own forward/backward (grids, argument lists, buffers) with its
    kernels run by the emulation and its allocations poisoned; yields the kernels (launch counts)."""
    kernels = {}

    def fake_module(names):
        return {key: kernels.setdefault(n, EmulatedKernel(_lib, _SYMBOLS[n], n)) for key, n in names}
    monkeypatch.setattr(FA, "_module", fake_module)
    monkeypatch.setattr(FA, "empty", poisoned)
    yield kernels


def test_bf16_rounding_matches_ml_dtypes():
    x = np.random.default_rng(0).standard_normal(10000) * np.logspace(-30, 30, 10000)
    assert np.array_equal(np.ascontiguousarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16),
                          _bf16_bits(x))


def _bf16_bits(x):
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def flash(q, k, v, g, mask, causal, dtype, variant=None):
    """FA.forward then FA.backward (its `variant`) on the emulated kernels: O, L, dQ, dK, dV as float64."""
    dt = DTYPES[dtype]
    qd, kd, vd, gd = (guarded(a.astype(dt)) for a in (q, k, v, g))
    md = None if mask is None else guarded(mask)
    o, lse = FA.forward(qd, kd, vd, md, causal)
    grads = FA.backward(gd, qd, kd, vd, o, lse, md, causal, variant=variant)
    return [a.astype(np.float64) for a in (o, lse) + tuple(grads)]


def reference(q, k, v, g, mask, causal):
    """tensor/attention.py's formulas in float64: O, L (log-sum-exp of the allowed scaled scores), dQ, dK, dV."""
    allowed = allowed_keys(np, q.shape[2], k.shape[2], causal, mask)
    o, p, _ = sdpa_forward(q, k, v, allowed, 0.0, None)
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    with np.errstate(divide="ignore"):
        lse = np.log(np.exp(s - s.max(-1, keepdims=True, initial=-1e300)).sum(-1)) + s.max(-1, initial=-1e300)
    lse = np.where(np.isfinite(s).any(-1), lse, np.inf)
    return [o, lse] + list(sdpa_backward(g, q, k, v, p, None, 0.0))


CASES = [  # dtype, D, B, H, Tq, Tk, causal, masked
    ("bfloat16", 32, 1, 2, 70, 70, True, False),     # two query blocks, a ragged key tile
    ("bfloat16", 64, 2, 1, 20, 20, True, True),      # padding mask: batch 0's first rows see no key
    ("bfloat16", 64, 1, 1, 7, 75, True, False),      # Tq < Tk: queries at the end of the keys
    ("bfloat16", 128, 1, 2, 1, 9, True, False),      # one query (decoding) sees every key
    ("bfloat16", 128, 1, 1, 1, 1, True, True),
    ("bfloat16", 32, 2, 3, 1, 1, True, False),       # T = 1: P = 1, the reference dQ = dK = 0 exactly
    ("float16", 64, 1, 2, 33, 33, False, True),      # not causal, masked
    ("float32", 32, 1, 1, 17, 17, True, False),      # float32: the three-part bfloat16 product
    ("float32", 128, 1, 1, 20, 20, True, True),      # float32 D=128: backward tiles of 16 queries
    ("bfloat16", 128, 1, 1, 40, 40, False, False),   # D=128: the dK/dV kernel reads V's fragments from shared memory
]


@pytest.mark.parametrize("N", [32, 64])
def test_forward_key_tiles(emulated, monkeypatch, N):
    """The forward's builds by key tile (FA.FWD_KEY_TILES) at bfloat16 D = 128: 32 keys in two stages, 64 in one;
    ragged tiles, causal."""
    monkeypatch.setitem(FA.FWD_KEY_TILES, ("bfloat16", 128), N)
    _check_case("bfloat16", 128, 1, 2, 70, 70, True, False, None, emulated)
    assert emulated[f"flash_fwd<Bf16,128,{N},1>"].launches == 1


@pytest.mark.parametrize("dtype,D,B,H,Tq,Tk,causal,masked", CASES)
def test_flash_equals_the_reference(emulated, dtype, D, B, H, Tq, Tk, causal, masked):
    _check_case(dtype, D, B, H, Tq, Tk, causal, masked, None, emulated)


@pytest.mark.parametrize("dtype,D,B,H,Tq,Tk,causal,masked,variant",
                         [c + (v,) for c, vs in VARIANT_CASES for v in vs if v != FA.default_variant(*c[:2])])
def test_backward_variants_equal_the_reference(emulated, dtype, D, B, H, Tq, Tk, causal, masked, variant):
    """The other builds of the backward (FA.BWD_VARIANTS: 8 warps, vector atomics, heavy-first grid, stages,
    register bound, fast exp2, vector Delta) on poisoned memory, the launch's dynamic shared memory exactly
    what the kernel counts."""
    _check_case(dtype, D, B, H, Tq, Tk, causal, masked, variant, emulated)
    name = FA.kernel_names(dtype, D, variant)["dkdv"]
    assert emulated[name].launches == 1


def test_dkdv_shared_memory_count_matches_the_kernel():
    """flash_attention.dkdv_smem_bytes (the launch's byte count) equals the kernel's DkdvSmem::BYTES for every
    compiled build (a launch with fewer bytes traps on the GPU)."""
    for dt, D in COMBOS:
        for v in [None] + VARIANTS.get((dt, D), []):
            fn = getattr(_lib, _SMEM[FA.kernel_names(dt, D, v)["dkdv"]])
            fn.restype = ctypes.c_int
            assert fn() == FA.dkdv_smem_bytes(dt, D, v), (dt, D, v)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="flash backward: variant 'nope'"):
        FA.kernel_names("bfloat16", 64, "nope")
    assert all(v in FA.BWD_VARIANTS for v in FA.BWD_DEFAULT.values())


@pytest.mark.parametrize("dtype,D,variant", [("bfloat16", 64, None), ("bfloat16", 32, "w8_vec4_heavy_fast"),
                                             ("float32", 32, None)])
def test_heads_read_and_written_in_place(emulated, dtype, D, variant):
    """The fused op's layout (tensor/cuda/attention.py): q, k, v are views of one poisoned (B, T, 3, H, D) qkv
    buffer, O is written into the heads of a (B, T, H, D) buffer, dO comes laid out as O, and dQ, dK, dV land in
    a (B, T, 3, H, D) buffer: every kernel addresses them through their strides, equal to the reference."""
    B, H, T = 2, 3, 70
    rng = np.random.default_rng(D)
    dt = DTYPES[dtype]
    qkv = rng.standard_normal((B, T, 3, H, D)).astype(dt)
    qkv[:, :, 0] *= 2
    g = rng.standard_normal((B, T, H, D)).astype(dt)
    qkv_d, g_d = guarded(qkv), guarded(g)
    heads = qkv_d.transpose(2, 0, 3, 1, 4)   # (3, B, H, T, D) views
    o_buf = poisoned((B, T, H, D), dt)
    d_buf = poisoned((B, T, 3, H, D), dt)
    d = d_buf.transpose(2, 0, 3, 1, 4)
    assert FA.views_fit(*heads, o_buf.transpose(0, 2, 1, 3), *d)
    o, lse = FA.forward(heads[0], heads[1], heads[2], None, True, out=o_buf.transpose(0, 2, 1, 3))
    assert np.shares_memory(o, o_buf)
    FA.backward(g_d.transpose(0, 2, 1, 3), heads[0], heads[1], heads[2], o, lse, None, True, out=(d[0], d[1], d[2]),
                variant=variant)
    f64 = [a.astype(np.float64) for a in (heads[0], heads[1], heads[2], g_d.transpose(0, 2, 1, 3))]
    want = reference(*f64, None, True)
    want.pop(1)
    got = [o_buf.transpose(0, 2, 1, 3), d[0], d[1], d[2]]
    check([a.astype(np.float64) for a in got], want, ("O", "dQ", "dK", "dV"), TOL[dtype])


def test_views_the_kernels_cannot_address_are_refused():
    q = np.zeros((1, 2, 8, 32), np.float32)
    assert FA.views_fit(q) and not FA.views_fit(q[:, :, ::-1])
    assert not FA.views_fit(q.transpose(0, 1, 3, 2)[:, :, :8, :8])   # D not contiguous
    assert not FA.views_fit(np.zeros((1, 2, 8, 34), np.float32)[..., :32])   # rows 136 bytes apart
    with pytest.raises(ValueError, match="flash attention backward: dO must be laid out as O"):
        FA.backward(q.transpose(0, 2, 1, 3).copy().transpose(0, 2, 1, 3), q, q, q, q, q[..., 0])


def _check_case(dtype, D, B, H, Tq, Tk, causal, masked, variant, emulated):
    rng = np.random.default_rng(Tq * 1000 + Tk + D)
    dt = DTYPES[dtype]
    # inputs exactly representable in the dtype, so both sides see the same numbers
    q, k, v = (rng.standard_normal((B, H, T, D)).astype(dt).astype(np.float64) for T in (Tq, Tk, Tk))
    q = (q * 2.0).astype(dt).astype(np.float64)   # sharper softmax rows
    g = rng.standard_normal((B, H, Tq, D)).astype(dt).astype(np.float64)
    mask = None
    if masked:
        mask = rng.random((B, Tk)) > 0.3
        mask[0, : min(4, Tk)] = False        # with causal: batch 0's first rows see no key at all
        if Tk == 1:
            mask[:] = False                  # the one key masked: O = 0, every gradient 0
    got = flash(q, k, v, g, mask, causal, dtype, variant)
    want = reference(q, k, v, g, mask, causal)
    assert sum(kern.launches for kern in emulated.values()) == 4
    L, Lref = got.pop(1), want.pop(1)
    assert np.array_equal(np.isinf(L), np.isinf(Lref)), "L: rows with no key (+inf) differ"
    np.testing.assert_allclose(np.where(np.isinf(L), 0.0, L), np.where(np.isinf(Lref), 0.0, Lref), atol=1e-4,
                               err_msg="L")
    check(got, want, ("O", "dQ", "dK", "dV"), TOL[dtype])


def test_arguments_are_packed_as_the_kernels_declare(emulated):
    """A Python int reaches a kernel as 8 bytes and a float as a double (CuPy's packing), which an
    int / float parameter misreads; the emulated launch refuses them, as this check shows."""
    q = guarded(np.zeros((1, 1, 3, 32), np.float32))
    kern = FA._kernels("float32", 32)["fwd"]
    m, (H, Tq, Tk, causal, has_mask), sl2 = FA._args(q, q, None, True)
    good = (q, q, q, m, poisoned(q.shape, q.dtype), poisoned((1, 1, 3), np.float32), H, Tq, Tk, causal, has_mask)
    strides = FA._strides(q, q, q)
    kern((1, 1), (128,), good + (sl2,) + strides)
    with pytest.raises(TypeError, match="argument 11"):
        kern((1, 1), (128,), good + (float(sl2),) + strides)
    with pytest.raises(TypeError, match="argument 6"):
        kern((1, 1), (128,), good[:6] + (1,) + good[7:] + (sl2,) + strides)
    with pytest.raises(TypeError, match="argument 14"):   # a row stride is an int32
        kern((1, 1), (128,), good + (sl2,) + strides[:2] + (int(strides[2]),) + strides[3:])
