"""The decode-attention kernels' CUDA source (tensor/cuda/decode_attention.py) run on the CPU through
tests/cuda_emulation.py (host threads for CUDA threads; float16/bfloat16 as uint16 bit patterns with
round-to-nearest-even): tensor/cuda/decode_attention.py's own `decode_attention` (grids, splits, argument
lists, the combine pass) against the reference formula softmax(q k^T / sqrt(D) + mask) v in float64 on the
same rounded inputs. Both kernels (the 16-byte-load `decode_attn_vec`, the scalar `decode_attn_partial`),
one split and many, strided views of a longer cache, padding masks with a fully masked row, chunks shorter
than a block's batch of rows. tests/test_gpu_decode.py checks the same on a GPU. Skipped without a C++
compiler."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cuda_emulation import FRAGMENT_HOST, EmulatedKernel, build, packed_launcher
from tensor.cuda import decode_attention as DA
from tensor.cuda.common import CTYPE

ml_dtypes = pytest.importorskip("ml_dtypes")
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
TOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}   # max |error|, outputs of size ~1
# the device types the kernel text names, over FRAGMENT_HOST's conversions
HOST_TYPES = r"""
struct uint4 { unsigned x, y, z, w; };
struct __nv_bfloat16 {
    unsigned short x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : x(f32_to_bf16(f)) {}
    operator float() const { return bf16_to_f32(x); }
};
struct __half {
    unsigned short x;
    __half() = default;
    __half(float f) : x(f32_to_f16(f)) {}
    operator float() const { return f16_to_f32(x); }
};
"""
_NAMES = [f"decode_attn_vec<{CTYPE[t]},{d}>" for t in DTYPES for d in DA.VEC_HEADS]
_NAMES += [f"decode_attn_partial<{CTYPE[t]},{e}>" for t in DTYPES for e in (1, 2, 3, 4)]
_NAMES += [f"decode_attn_combine<{CTYPE[t]}>" for t in DTYPES]
_SYMBOLS = {n: f"run_{i}" for i, n in enumerate(_NAMES)}
_lib = build(f"#define MAX_CHUNK {DA.MAX_CHUNK}\n" + FRAGMENT_HOST + HOST_TYPES + DA._SOURCE,
             "".join(packed_launcher(sym, n) for n, sym in _SYMBOLS.items()))
pytestmark = pytest.mark.skipif(_lib is None, reason="needs a C++ compiler (g++)")


class _Module:
    def __init__(self, kernels: dict):
        self.kernels = kernels

    def get_function(self, name: str) -> EmulatedKernel:
        return self.kernels.setdefault(name, EmulatedKernel(_lib, _SYMBOLS[name], name))


def poisoned(shape, dtype) -> np.ndarray:
    """Every byte 0xff (NaN): what the kernels must overwrite or never read; 16-byte aligned."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.full(n + 32, 0xFF, np.uint8)
    start = -buf.ctypes.data % 16
    return buf[start:start + n].view(dtype).reshape(shape)


@pytest.fixture
def emulated(monkeypatch):
    kernels: dict = {}
    monkeypatch.setattr(DA, "_module", lambda: _Module(kernels))
    monkeypatch.setattr(DA, "empty", poisoned)
    return kernels


def reference(q, k, v, mask) -> np.ndarray:
    """softmax(q k^T / sqrt(D) + mask) v in float64; a fully masked row gives zeros."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("bhqd,bhtd->bhqt", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask[:, None, None, :], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(np.isfinite(m), np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    l = p.sum(-1, keepdims=True)
    return np.einsum("bhqt,bhtd->bhqd", p, v) / np.where(l > 0, l, 1.0)


CASES = [  # dtype, B, H, Tk, D, masked, splits, kernel
    ("bfloat16", 2, 3, 37, 64, True, None, "vector"),
    ("bfloat16", 1, 2, 300, 64, False, 1, "vector"),       # one split: the block writes O itself
    ("bfloat16", 1, 1, 70, 128, True, 3, "vector"),        # chunks of 24 rows: fewer than a block's batch
    ("float16", 2, 1, 9, 32, True, None, "vector"),
    ("float32", 1, 2, 50, 64, True, 2, "vector"),
    ("float32", 1, 1, 33, 128, False, None, "vector"),
    ("float32", 1, 1, 5, 32, False, 1, "vector"),
    ("bfloat16", 2, 2, 40, 64, True, 3, "scalar"),
    ("float32", 1, 2, 17, 48, False, None, None),           # D 48: the scalar kernel by default
    ("float32", 1, 1, 1, 64, False, None, "scalar"),        # one key
    ("float32", 2, 1, 100, 16, True, 3, None),              # D 16: one element a lane
    ("float32", 1, 2, 70, 96, True, 1, None),               # D 96: three elements a lane
    ("float32", 2, 1, 40, 8, True, 7, None),                # D 8: lanes past D idle
]


@pytest.mark.parametrize("dtype,B,H,Tk,D,masked,splits,kernel", CASES)
def test_decode_kernels_equal_the_reference(emulated, dtype, B, H, Tk, D, masked, splits, kernel):
    rng = np.random.default_rng(Tk * 7 + D)
    dt = DTYPES[dtype]
    cap = Tk + 5   # k, v: views of a longer cache
    q = rng.standard_normal((B, H, 1, D)).astype(dt)
    kc, vc = (poisoned((B, H, cap, D), dt) for _ in range(2))
    kc[...] = rng.standard_normal(kc.shape).astype(dt)
    vc[...] = rng.standard_normal(vc.shape).astype(dt)
    k, v = kc[:, :, :Tk], vc[:, :, :Tk]
    mask = None
    if masked:
        mask = rng.random((B, Tk)) > 0.3
        mask[0, : Tk // 2] = False
        if B > 1:
            mask[1, :] = False       # a fully masked row: zeros
    assert DA.vector_fits(q, k, v) == (D in DA.VEC_HEADS)
    got = DA.decode_attention(q, k, v, mask, splits=splits, kernel=kernel)
    used = {n.split("<")[0] for n, kern in emulated.items() if kern.launches}
    assert ("decode_attn_vec" in used) == (kernel == "vector")
    assert got.dtype == q.dtype and got.shape == (B, H, 1, D)
    want = reference(q, k, v, mask)
    assert np.isfinite(got.astype(np.float64)).all()
    assert np.abs(got.astype(np.float64) - want).max() <= TOL[dtype]
    if masked and B > 1:
        assert (got[1].astype(np.float64) == 0).all()


def test_vector_kernel_refuses_what_it_cannot_load():
    q = np.zeros((1, 1, 1, 64), np.float32)
    k = poisoned((1, 1, 8, 66), np.float32)[..., :64]   # rows 264 bytes apart: not 16-byte aligned
    with pytest.raises(ValueError, match="decode_attention: the vector kernel"):
        DA.decode_attention(q, k, k, kernel="vector")
    assert not DA.vector_fits(q, k, k)
    assert DA.num_splits(1, 5000, vector=True) * DA.MAX_CHUNK >= 5000
