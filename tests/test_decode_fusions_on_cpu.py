"""The CPU side of the bf16 decoder's fusions (issue 19), checked without a GPU: the residual-add
kernel (tensor/cuda/residual.py) run through tests/cuda_emulation.py, bfloat16 as its bit pattern,
against float32 + float(b); cuBLASLt's split-K choice (tensor/cuda/cublaslt.py: choose_algorithm);
the MLP's c_fc + GELU as F.linear_gelu, equal to the two ops, values and gradients; and the add of a
16-bit tensor into a float32 one on the CPU (the dispatch asks only for adds of two dtypes).
tests/test_gpu_fuse.py runs the same paths on a GPU."""
from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np
import pytest

import tensor.functional as F
from cuda_emulation import build
from nn.layers import MLP, Linear
from tensor import Tensor
from tensor.cuda import cublaslt, residual

PRELUDE = r"""
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
struct bf16 {   // bfloat16 as its bit pattern: the high half of a float32
    unsigned short bits;
    operator float() const { unsigned u = (unsigned)bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
"""
LAUNCHERS = r"""
extern "C" void run_add(int vec, const float* a, const bf16* b, float* y, long long n, int blocks, int threads) {
    launch(Dim{(unsigned)blocks, 1, 1}, Dim{(unsigned)threads, 1, 1}, [=] {
        if (vec) add_widen<bf16, 4>(a, b, y, n); else add_widen<bf16, 1>(a, b, y, n); });
}
"""
_lib = build(PRELUDE + residual.ADD_WIDEN, LAUNCHERS)
needs_cxx = pytest.mark.skipif(_lib is None, reason="needs a C++ compiler (g++)")
if _lib is not None:
    vp = ctypes.c_void_p
    _lib.run_add.argtypes = [ctypes.c_int, vp, vp, vp, ctypes.c_longlong, ctypes.c_int, ctypes.c_int]


@needs_cxx
@pytest.mark.parametrize("vec", [1, 0])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 127, 1000])
@pytest.mark.parametrize("blocks", [1, 3])
def test_add_widen_kernel_is_float32_plus_the_widened_bfloat16(vec: int, n: int, blocks: int) -> None:
    """The 4-wide loop (float4 of a, 4 bfloat16 of b), its grid stride and tail, and the
    one-element variant: exactly a + float(b), every element written once."""
    rng = np.random.default_rng(n)
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(ml_dtypes.bfloat16)
    y = np.full(n, np.nan, np.float32)
    _lib.run_add(vec, a.ctypes.data, b.ctypes.data, y.ctypes.data, n, blocks, 32)
    np.testing.assert_array_equal(y, a + b.astype(np.float32))


# ------------------------------------------------------------------ cuBLASLt: which algorithm
def test_choose_algorithm_prefers_the_first_without_split_k_only_when_asked() -> None:
    none, inplace = cublaslt._REDUCTION_NONE, 1
    configs = [(4, inplace), (1, none), (1, none)]
    assert cublaslt.choose_algorithm(configs, avoid_split_k=False) == 0
    assert cublaslt.choose_algorithm(configs, avoid_split_k=True) == 1
    assert cublaslt.choose_algorithm([(1, none), (2, inplace)], avoid_split_k=True) == 0
    assert cublaslt.choose_algorithm([(2, inplace), (3, 2)], avoid_split_k=True) == 0   # none without: the first
    assert cublaslt.choose_algorithm([(1, inplace), (0, none)], avoid_split_k=True) == 1  # 0 splits: not split
    assert cublaslt.choose_algorithm([(-1, -1), (1, none)], avoid_split_k=True) == 1     # -1: cuBLASLt did not say
    assert cublaslt.plan_summary() == [] or all("chosen_split_k" in p for p in cublaslt.plan_summary())


def test_cublaslt_epilogue_values_are_the_header_s() -> None:
    """cublasLt.h: BIAS = 4, GELU = 32, GELU_BIAS = GELU | BIAS, BGRADB = 512; algorithm config
    attributes SPLITK_NUM = 2, REDUCTION_SCHEME = 3; REDUCTION_SCHEME_NONE = 0."""
    assert (cublaslt._EPILOGUE_BIAS, cublaslt._EPILOGUE_GELU_BIAS, cublaslt._EPILOGUE_BGRADB) == (4, 32 | 4, 512)
    assert (cublaslt._CONFIG_SPLITK_NUM, cublaslt._CONFIG_REDUCTION_SCHEME, cublaslt._REDUCTION_NONE) == (2, 3, 0)


# ------------------------------------------------------------------ the MLP through F.linear_gelu
@pytest.mark.parametrize("compute", [None, "bf16"])
def test_mlp_equals_c_proj_of_gelu_of_c_fc_with_gradients(compute) -> None:
    from nn.amp import autocast_
    rng = np.random.default_rng(0)
    mlp = MLP(8, rng=np.random.default_rng(1))
    if compute:
        autocast_(mlp, compute)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    g = rng.standard_normal((2, 3, 8)).astype(np.float32)

    def grads(fn) -> list:
        for p in mlp.parameters():
            p.grad = None
        xt = Tensor(x, requires_grad=True)
        y = fn(xt)
        y.backward(Tensor(g.astype(y.dtype)))
        return [y.numpy(), xt.grad] + [p.grad for p in mlp.parameters()]

    fused = grads(mlp)
    ref = grads(lambda xt: mlp.c_proj(mlp.c_fc(xt).gelu()))
    for a, b in zip(fused, ref):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_linear_gelu_node_equals_the_two_ops() -> None:
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    ts = [Tensor(a, requires_grad=True) for a in (x, w, b)]
    y = F.LinearGelu.apply(*ts)
    y.backward(Tensor(np.ones((5, 3))))
    ts2 = [Tensor(a, requires_grad=True) for a in (x, w, b)]
    y2 = F.gelu(F.linear(*ts2))
    y2.backward(Tensor(np.ones((5, 3))))
    np.testing.assert_allclose(y.numpy(), y2.numpy(), rtol=1e-12, atol=1e-12)
    for t, t2 in zip(ts, ts2):
        np.testing.assert_allclose(t.grad, t2.grad, rtol=1e-12, atol=1e-12)
    assert y._ctx.saved is None  # released after backward, its two parts too
    assert y._ctx.linear.saved is None and y._ctx.gelu.saved is None


def test_mlp_with_a_replaced_c_fc_runs_that_module() -> None:
    class Doubled(Linear):
        def forward(self, x):
            return super().forward(x) * 2.0
    mlp = MLP(8, rng=np.random.default_rng(1))
    new = Doubled(8, 32, rng=np.random.default_rng(1))
    mlp.c_fc = new
    x = Tensor(np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32))
    np.testing.assert_allclose(mlp(x).numpy(), mlp.c_proj((new(x)).gelu()).numpy(), rtol=1e-6)


# ------------------------------------------------------------------ an add of two dtypes on the CPU
@pytest.mark.parametrize("swap", [False, True])
def test_float32_plus_bfloat16_on_the_cpu_is_the_reference_add(swap: bool) -> None:
    rng = np.random.default_rng(3)
    a = Tensor(rng.standard_normal((2, 5)).astype(np.float32), requires_grad=True)
    b = Tensor(rng.standard_normal((2, 5)).astype(ml_dtypes.bfloat16), requires_grad=True)
    y = b + a if swap else a + b
    assert y.dtype == np.float32 and type(y._ctx).__name__ == "Add"
    np.testing.assert_array_equal(y.numpy(), a.numpy() + b.numpy().astype(np.float32))
    y.backward(Tensor(np.ones((2, 5), np.float32)))
    assert a.grad.dtype == np.float32 and b.grad.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(b.grad.astype(np.float32), np.ones((2, 5)))
