"""The GELU kernels' CUDA source (tensor/cuda/gelu.py) run on the CPU through tests/cuda_emulation.py
(host threads for CUDA threads): the 16-byte vector loop, its grid stride and the tail, and the
one-element variant, against the float64 formula (float32 only; tests/test_gpu_fuse.py checks every
dtype on a GPU; skipped without a C++ compiler). And cuBLASLt's operand bookkeeping
(tensor/cuda/cublaslt.py: which of our operands is its A, ops, leading dimensions, layouts,
epilogue vectors) emulated with strided NumPy views."""
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
needs_cxx = pytest.mark.skipif(_lib is None, reason="needs a C++ compiler (g++)")
if _lib is not None:
    vp = ctypes.c_void_p
    _lib.run_gelu.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, vp, ctypes.c_longlong, ctypes.c_int, ctypes.c_int]


def _formula(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = np.sqrt(2 / np.pi)
    t = np.tanh(k * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)


@needs_cxx
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


# ------------------------------------------------------------------ cuBLASLt's operand bookkeeping
def _col_major(x: np.ndarray, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major (rows, cols) matrix with leading dimension ld that starts at x's first element."""
    isz = x.itemsize
    return np.lib.stride_tricks.as_strided(x, shape=(rows, cols), strides=(isz, ld * isz))


def _operands(rng: np.random.Generator, m: int, k: int, n: int, layout: str) -> tuple:
    """a (m, k), b (k, n) as row-major, transposed or row-strided views."""
    if layout == "rows":
        return rng.standard_normal((m, k)), rng.standard_normal((k, n))
    if layout == "transposed":  # a Linear's W.T, a gradient's g.T
        return rng.standard_normal((k, m)).T, rng.standard_normal((n, k)).T
    return rng.standard_normal((m, k + 3))[:, :k], rng.standard_normal((k, n + 5))[:, 1:n + 1]


@pytest.mark.parametrize("layout", ["rows", "transposed", "strided"])
@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (1, 8, 8), (33, 16, 1), (4, 1, 6)])
def test_cublaslt_operand_swap_gives_the_row_major_product_bias_and_bias_gradient(layout, m, k, n) -> None:
    """tensor/cuda/cublaslt.py hands cuBLASLt our b as its A and our a as its B, with ops and leading
    dimensions from the strides; D (n, m) column-major = op(A) op(B), BIAS adds along D's rows and
    BGRADB sums op(B) over k. Emulated here with strided views of the same memory: D must read back
    as a @ b + bias in row-major order, and the bias gradient as a's row sums."""
    from tensor.cuda import cublaslt as LT
    rng = np.random.default_rng(m * 100 + n)
    a, b = _operands(rng, m, k, n, layout)
    bias = rng.standard_normal(n)
    (opa, lda), (opb, ldb) = LT.lt_operands(a, b)
    (ra, ca, la), (rb, cb, lb), (rd, cd, ld) = LT.lt_layouts(m, n, k, opa, lda, opb, ldb)
    A = _col_major(b, ra, ca, la)
    B = _col_major(a, rb, cb, lb)
    A, B = (A.T if opa == LT._OP_T else A), (B.T if opb == LT._OP_T else B)
    assert A.shape == (n, k) and B.shape == (k, m) and (rd, cd, ld) == (n, m, n)
    D = A @ B + bias[:, None]
    out = np.empty((m, n))
    _col_major(out, rd, cd, ld)[...] = D     # D written column-major into our row-major buffer
    np.testing.assert_allclose(out, a @ b + bias, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(B.sum(axis=0), a.sum(axis=1), rtol=1e-12, atol=1e-12)
