"""The fused attention kernels' CUDA source (tensor/cuda/flash_attention.py) run on the CPU through
tests/cuda_emulation.py: host threads for CUDA threads, float16/bfloat16 as uint16 bit patterns with
round-to-nearest-even, and the m16n8k16 tensor-core product computed lane by lane from the PTX
fragment layouts (cuda_emulation.FRAGMENT_HOST). Forward (O and the row log-sum-exp) and backward
(dQ, dK, dV) against tensor/attention.py's reference formulas in float64 on the same rounded inputs:
ragged tiles, one query, Tq < Tk, causal and not, a key-padding mask with fully masked rows, D = 32,
64, 128, each dtype. tests/test_gpu_flash.py checks the same on a GPU. Skipped without a C++ compiler."""
from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

from cuda_emulation import FRAGMENT_HOST, build
from tensor.attention import allowed_keys, sdpa_backward, sdpa_forward
from tensor.cuda import flash_attention as FA

COMBOS = [("bfloat16", 32), ("bfloat16", 64), ("bfloat16", 128), ("float16", 64), ("float32", 32)]
TOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-5}   # max |error| / max |reference|


def _launchers() -> str:
    out = []
    for dt, D in COMBOS:
        names = FA.kernel_names(dt, D)
        tag = f"{dt}_{D}"
        out.append(f"""
extern "C" void fwd_{tag}(const void* q, const void* k, const void* v, const unsigned char* mask, void* o, float* lse,
        int BH, int H, int Tq, int Tk, int causal, int has_mask, float sl2) {{
    typedef {FA.TRAITS[dt]}::S S;
    launch(Dim{{(unsigned)((Tq + 63) / 64), (unsigned)BH, 1}}, Dim{{128, 1, 1}}, [=] {{
        {names['fwd']}((const S*)q, (const S*)k, (const S*)v, mask, (S*)o, lse, H, Tq, Tk, causal, has_mask, sl2); }});
}}
extern "C" void bwd_{tag}(const void* q, const void* k, const void* v, const unsigned char* mask, const void* go,
        const void* o, const float* lse, float* delta, void* dq, void* dk, void* dv, int BH, int H, int Tq, int Tk,
        int causal, int has_mask, float sl2, float scale) {{
    typedef {FA.TRAITS[dt]}::S S;
    launch(Dim{{(unsigned)((BH * Tq + 3) / 4), 1, 1}}, Dim{{128, 1, 1}}, [=] {{
        {names['delta']}((const S*)go, (const S*)o, delta, BH * Tq); }});
    launch(Dim{{(unsigned)((Tk + 63) / 64), (unsigned)BH, 1}}, Dim{{128, 1, 1}}, [=] {{
        {names['dkdv']}((const S*)q, (const S*)k, (const S*)v, mask, (const S*)go, lse, delta, (S*)dk, (S*)dv, H, Tq,
                        Tk, causal, has_mask, sl2, scale); }});
    launch(Dim{{(unsigned)((Tq + 63) / 64), (unsigned)BH, 1}}, Dim{{128, 1, 1}}, [=] {{
        {names['dq']}((const S*)q, (const S*)k, (const S*)v, mask, (const S*)go, lse, delta, (S*)dq, H, Tq, Tk,
                      causal, has_mask, sl2, scale); }});
}}
""")
    return "".join(out)


_lib = build(FRAGMENT_HOST + FA._SOURCE, _launchers())
pytestmark = pytest.mark.skipif(_lib is None, reason="needs a C++ compiler (g++)")


# ------------------------------------------------------------------ storage of each dtype on the host
def to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 -> the dtype's storage: float32, or the uint16 bit pattern (round to nearest even)."""
    if dtype == "float32":
        return np.ascontiguousarray(x, np.float32)
    if dtype == "float16":
        return np.ascontiguousarray(x, np.float16).view(np.uint16)
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bits(b: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return b.astype(np.float64)
    if dtype == "float16":
        return b.view(np.float16).astype(np.float64)
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def test_bf16_rounding_matches_ml_dtypes():
    ml = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(0).standard_normal(10000) * np.logspace(-30, 30, 10000)
    assert np.array_equal(to_bits(x, "bfloat16"), x.astype(np.float32).astype(ml.bfloat16).view(np.uint16))


def flash(q, k, v, g, mask, causal, dtype):
    """Forward and backward through the emulated kernels: O, L, dQ, dK, dV as float64."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    qb, kb, vb, gb = (to_bits(a, dtype) for a in (q, k, v, g))
    o, dq = np.zeros_like(qb), np.zeros_like(qb)
    dk, dv = np.zeros_like(kb), np.zeros_like(kb)
    lse, delta = np.zeros((B, H, Tq), np.float32), np.zeros((B, H, Tq), np.float32)
    m = np.ascontiguousarray(mask if mask is not None else np.ones((B, Tk), bool))
    sl2, scale = math.log2(math.e) / math.sqrt(D), 1.0 / math.sqrt(D)
    f = ctypes.c_float
    tag = f"{dtype}_{D}"
    getattr(_lib, f"fwd_{tag}")(qb.ctypes.data, kb.ctypes.data, vb.ctypes.data, m.ctypes.data, o.ctypes.data,
                                lse.ctypes.data, B * H, H, Tq, Tk, int(causal), int(mask is not None), f(sl2))
    getattr(_lib, f"bwd_{tag}")(qb.ctypes.data, kb.ctypes.data, vb.ctypes.data, m.ctypes.data, gb.ctypes.data,
                                o.ctypes.data, lse.ctypes.data, delta.ctypes.data, dq.ctypes.data, dk.ctypes.data,
                                dv.ctypes.data, B * H, H, Tq, Tk, int(causal), int(mask is not None), f(sl2), f(scale))
    return [from_bits(a, dtype) for a in (o,)] + [lse.astype(np.float64)] + [from_bits(a, dtype) for a in (dq, dk, dv)]


if _lib is not None:
    _vp, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    for _dt, _D in COMBOS:
        getattr(_lib, f"fwd_{_dt}_{_D}").argtypes = [_vp] * 6 + [_i] * 6 + [_f]
        getattr(_lib, f"bwd_{_dt}_{_D}").argtypes = [_vp] * 11 + [_i] * 6 + [_f, _f]


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
    ("float16", 64, 1, 2, 33, 33, False, True),      # not causal, masked
    ("float32", 32, 1, 1, 17, 17, True, False),      # float32: the three-part bfloat16 product
]


@pytest.mark.parametrize("dtype,D,B,H,Tq,Tk,causal,masked", CASES)
def test_flash_equals_the_reference(dtype, D, B, H, Tq, Tk, causal, masked):
    rng = np.random.default_rng(Tq * 1000 + Tk + D)
    # inputs exactly representable in the dtype, so both sides see the same numbers
    q, k, v = (from_bits(to_bits(rng.standard_normal((B, H, T, D)), dtype), dtype) for T in (Tq, Tk, Tk))
    q *= 2.0   # sharper softmax rows
    q = from_bits(to_bits(q, dtype), dtype)
    g = from_bits(to_bits(rng.standard_normal((B, H, Tq, D)), dtype), dtype)
    mask = None
    if masked:
        mask = rng.random((B, Tk)) > 0.3
        mask[0, : min(4, Tk)] = False        # with causal: batch 0's first rows see no key at all
        if Tk == 1:
            mask[:] = False                  # the one key masked: O = 0, every gradient 0
    got = flash(q, k, v, g, mask, causal, dtype)
    want = reference(q, k, v, g, mask, causal)
    for name, a, b in zip(("O", "L", "dQ", "dK", "dV"), got, want):
        assert a.shape == b.shape, name
        if name == "L":
            assert np.array_equal(np.isinf(a), np.isinf(b)), name
            a, b = np.where(np.isinf(a), 0.0, a), np.where(np.isinf(b), 0.0, b)
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
            continue
        assert np.isfinite(a).all(), name
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
        assert err <= TOL[dtype], (name, err)
