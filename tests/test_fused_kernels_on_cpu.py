"""The GELU kernels' CUDA source (tensor/cuda/gelu.py) run on the CPU through tests/cuda_emulation.py
(host threads for CUDA threads): the 16-byte vector loop, its grid stride and the tail, and the
one-element variant, against the float64 formula. float32 only; tests/test_gpu_fuse.py checks every
dtype on a GPU. Skipped without a C++ compiler."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from cuda_emulation import build
from tensor.cuda import gelu

PRELUDE = r"""
struct uint4 { unsigned x, y, z, w; };
#define __expf(v) std::exp(v)
"""
LAUNCHERS = r"""
extern "C" void run_gelu(int bwd, int vec, const float* x, const float* g, float* y, long long n, int blocks,
        int threads) {
    launch(Dim{(unsigned)blocks, 1, 1}, Dim{(unsigned)threads, 1, 1}, [=] {
        if (bwd) { if (vec) gelu_bwd<float, uint4, 4>(x, g, y, n); else gelu_bwd<float, float, 1>(x, g, y, n); }
        else     { if (vec) gelu_fwd<float, uint4, 4>(x, y, n);    else gelu_fwd<float, float, 1>(x, y, n); } });
}
"""

_lib = build(PRELUDE + gelu.GELU_KERNELS, LAUNCHERS)
pytestmark = pytest.mark.skipif(_lib is None, reason="needs a C++ compiler (g++)")
if _lib is not None:
    vp = ctypes.c_void_p
    _lib.run_gelu.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, vp, ctypes.c_longlong, ctypes.c_int, ctypes.c_int]


def _formula(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = np.sqrt(2 / np.pi)
    t = np.tanh(k * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)


@pytest.mark.parametrize("vec", [1, 0])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 127, 1000])
@pytest.mark.parametrize("blocks", [1, 3])
def test_gelu_kernels_equal_the_formula(vec: int, n: int, blocks: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    y, dx = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    _lib.run_gelu(0, vec, x.ctypes.data, None, y.ctypes.data, n, blocks, 32)
    _lib.run_gelu(1, vec, x.ctypes.data, g.ctypes.data, dx.ctypes.data, n, blocks, 32)
    y64, d64 = _formula(x.astype(np.float64))
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, d64 * g, rtol=1e-5, atol=1e-6)
