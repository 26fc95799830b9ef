"""GPU checks of the fused paths of a training and decode step: the vectorized GELU kernels, the
bias in cuBLASLt's GEMM epilogue (forward BIAS, backward BGRADB) through tensor/cuda/cublaslt.py
and tensor/cuda/linear.py, LayerNorm writing its output in the compute dtype (both builds, and the one-warp-a-row
kernel adding the residual's gradient) and the cross-entropy kernels; each against
float64 formulas or the reference path, in float32/float16/bfloat16, odd shapes, no bias, and
inside a captured CUDA graph. Skipped cleanly without CuPy or a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from tensor import Tensor, backend, dispatch
import tensor.functional as F

pytestmark = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")

DTYPES = ["float32", "float16", "bfloat16"]
TOL = {"float32": dict(rtol=1e-4, atol=1e-4), "float16": dict(rtol=1e-2, atol=1e-2),
       "bfloat16": dict(rtol=4e-2, atol=4e-2)}


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _gpu(a: np.ndarray, dtype=None):
    return backend.to_device(np.ascontiguousarray(a if dtype is None else a.astype(dtype)), "cuda")


def _host(a) -> np.ndarray:
    return backend.to_numpy(a).astype(np.float64)


def _gelu64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = np.sqrt(2 / np.pi)
    t = np.tanh(k * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)


# ------------------------------------------------------------------ GELU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4097, 3 * 16384 + 5])
@pytest.mark.parametrize("offset", [0, 1])
def test_gelu_kernels_equal_the_formula_vectorized_and_not(dtype: str, n: int, offset: int) -> None:
    """offset 0: 16-byte aligned (vector loads, a tail when n is not a multiple of the vector);
    offset 1: a view one element in (the one-element variant)."""
    from tensor.cuda import gelu
    rng = np.random.default_rng(n)
    t = _dtype(dtype)
    xh, gh = (rng.standard_normal(n + offset) * 3).astype(t), rng.standard_normal(n + offset).astype(t)
    x, g = _gpu(xh)[offset:], _gpu(gh)[offset:]
    assert (x.data.ptr % 16 == 0) == (offset == 0)
    y, dx = gelu.gelu_forward(x), gelu.gelu_backward(x, g)
    y64, d64 = _gelu64(xh[offset:].astype(np.float64))
    np.testing.assert_allclose(_host(y), y64, **TOL[dtype])
    np.testing.assert_allclose(_host(dx), d64 * gh[offset:].astype(np.float64), **TOL[dtype])


# ------------------------------------------------------------------ cuBLASLt epilogues
SHAPES = [(64, 768, 3072), (16, 96, 40), (5, 7, 3), (33, 16, 1), (1, 8, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias_f32", [True, False])
def test_cublaslt_bias_epilogue_equals_the_product_plus_bias(dtype: str, shape: tuple, bias_f32: bool) -> None:
    from tensor.cuda import cublaslt
    m, k, n = shape
    rng = np.random.default_rng(m * k + n)
    t = _dtype(dtype)
    xh, wh, bh = rng.standard_normal((m, k)), rng.standard_normal((n, k)), rng.standard_normal(n)
    x, w = _gpu(xh, t), _gpu(wh, t)
    b = _gpu(bh, np.float32 if bias_f32 else t)
    y = cublaslt.matmul_bias(x, w.T, b, t)
    if y is None:
        # the GPT's shapes (multiples of 8, aligned) must take the fused path; odd ones may decline
        assert shape != (64, 768, 3072), f"cuBLASLt declined the bias epilogue for {shape} {dtype}"
        return
    assert y.dtype == t and y.shape == (m, n)
    ref = xh.astype(t).astype(np.float64) @ wh.astype(t).astype(np.float64).T + bh.astype(b.dtype).astype(np.float64)
    np.testing.assert_allclose(_host(y), ref, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * np.sqrt(k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cublaslt_bgradb_gives_the_weight_and_bias_gradients(dtype: str, shape: tuple) -> None:
    """dW = g^T x in float32 and db = column sums of g from one GEMM (a = g^T, b = x)."""
    from tensor.cuda import cublaslt
    rows, n_in, n_out = shape
    rng = np.random.default_rng(rows + n_in)
    t = _dtype(dtype)
    gh, xh = rng.standard_normal((rows, n_out)).astype(t), rng.standard_normal((rows, n_in)).astype(t)
    res = cublaslt.matmul_bgrad(_gpu(gh).T, _gpu(xh), np.float32, np.float32)
    if res is None:
        assert shape != (64, 768, 3072), f"cuBLASLt declined BGRADB for {shape} {dtype}"
        return
    dw, db = res
    assert dw.dtype == np.float32 and db.dtype == np.float32 and dw.shape == (n_out, n_in) and db.shape == (n_out,)
    g64, x64 = gh.astype(np.float64), xh.astype(np.float64)
    np.testing.assert_allclose(_host(dw), g64.T @ x64, rtol=1e-4 if dtype == "float32" else 1e-2,
                               atol=1e-3 * np.sqrt(rows))
    # (db may come back through the inputs' dtype where cuBLASLt takes no float32 bias gradient)
    np.testing.assert_allclose(_host(db), g64.sum(axis=0), rtol=1e-4 if dtype == "float32" else 1e-2,
                               atol=1e-3 * np.sqrt(rows))


# ------------------------------------------------------------------ Linear (cuBLASLt inside) against the reference
@pytest.mark.parametrize("compute", [None, "float16", "bfloat16"])
@pytest.mark.parametrize("lead,n_in,n_out", [((64,), 768, 3072), ((2, 7), 33, 5), ((3,), 8, 1), ((4, 16), 96, 40)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_fused_equals_the_reference_with_gradients(compute, lead, n_in, n_out, has_bias, monkeypatch) -> None:
    from tensor.cuda.linear import LinearCUDA
    rng = np.random.default_rng(n_in * n_out)
    host = [rng.standard_normal(lead + (n_in,)), rng.standard_normal((n_out, n_in)) * 0.1,
            rng.standard_normal(n_out) if has_bias else None]
    g = rng.standard_normal(lead + (n_out,))
    cd = None if compute is None else _dtype(compute)

    def run(cls) -> list:
        ts = [None if a is None else Tensor(a.astype(np.float32), device="cuda", requires_grad=True) for a in host]
        y = cls.apply(*ts, compute_dtype=cd)
        y.backward(Tensor(g.astype(y.dtype), device="cuda"))
        return [_host(y.data)] + [_host(t.grad) for t in ts if t is not None]

    fused = run(LinearCUDA)
    ref = run(F.Linear)
    tol = TOL[compute or "float32"]
    for i, (a, b) in enumerate(zip(fused, ref)):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=f"result {i}")


# ------------------------------------------------------------------ LayerNorm emitting the compute dtype
@pytest.mark.parametrize("out", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("C", [768, 33, 1, 128, 1024, 1152])
def test_layer_norm_writes_the_compute_dtype_with_float32_statistics(out: str, C: int) -> None:
    from tensor.cuda.layernorm import LayerNormCUDA
    rng = np.random.default_rng(C)
    xh = rng.standard_normal((37, C)) * 3 + 1
    wh, bh = rng.standard_normal(C), rng.standard_normal(C)
    g = rng.standard_normal((37, C))
    od = _dtype(out)

    def run(cls) -> list:
        ts = [Tensor(a.astype(np.float32), device="cuda", requires_grad=True) for a in (xh, wh, bh)]
        y = cls.apply(*ts, eps=1e-5, out_dtype=od)
        assert y.dtype == od
        y.backward(Tensor(g.astype(od), device="cuda"))
        for t in ts:
            assert t.grad.dtype == np.float32
        return [_host(y.data)] + [_host(t.grad) for t in ts]

    fused, ref = run(LayerNormCUDA), run(F.LayerNorm)
    for i, (a, b) in enumerate(zip(fused, ref)):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=TOL[out]["rtol"], atol=TOL[out]["atol"] * scale, err_msg=f"result {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C, rows", [(384, 37), (768, 5000), (128, 1), (1024, 2113)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_one_warp_a_row_adds_the_residual_gradient(dtype: str, C: int, rows: int, affine: bool) -> None:
    """The residual pattern h = x + f(LayerNorm(x)) with x in each dtype: the kernel that adds the residual's
    gradient into dx (and sums dweight, dbias in its blocks, several rows a warp at 5000 rows) against the
    reference LayerNorm and the engine's add."""
    from tensor.cuda import layernorm as LN
    assert LN.warp_nv(np.empty((1, C), np.float32))
    rng = np.random.default_rng(rows)
    xh = rng.standard_normal((rows, C)) * 2 + 0.5
    wh, bh = rng.standard_normal(C), rng.standard_normal(C)
    gh = rng.standard_normal((rows, C))
    dt = _dtype(dtype)

    def run(cls) -> list:
        ts = [Tensor(a.astype(dt), device="cuda", requires_grad=True) for a in ((xh, wh, bh) if affine else (xh,))]
        n = cls.apply(*ts, eps=1e-5)
        h = ts[0] + n * Tensor(gh.astype(dt), device="cuda")
        h.backward(Tensor(np.ones((rows, C), dt), device="cuda"))
        return [_host(n.data)] + [_host(t.grad) for t in ts]

    fused, ref = run(LN.LayerNormCUDA), run(F.LayerNorm)
    for i, (a, b) in enumerate(zip(fused, ref)):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale, err_msg=f"result {i}")


def test_layer_norm_backward_folds_the_waiting_gradient_in_the_kernel(monkeypatch) -> None:
    """In a block (x + attn(ln_1(x))), ln_1's backward is handed x's residual gradient and adds it in the kernel."""
    from tensor.cuda import layernorm as LN
    seen = []
    real = LN.layer_norm_backward_rows

    def spy(*args, **kwargs):
        seen.append(args[5] is not None)
        return real(*args, **kwargs)
    monkeypatch.setattr(LN, "layer_norm_backward_rows", spy)
    from nn.layers import Block
    blk = Block(128, 2).to("cuda")
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 8, 128)).astype(np.float32), device="cuda", requires_grad=True)
    # (a contiguous seed: sum()'s backward would hand ln_2 a broadcast view, which the engine's add takes instead)
    blk(x).backward(Tensor(rng.standard_normal((2, 8, 128)).astype(np.float32), device="cuda"))
    assert seen == [True, True]


def test_autocast_sets_the_layer_norm_output_dtype() -> None:
    from nn.amp import autocast_
    from tinygrad_lm.model import GPT, GPTConfig
    m = autocast_(GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0).to("cuda"), "bf16")
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32), device="cuda")
    assert str(m.transformer.ln_f(x).dtype) == "bfloat16"


# ------------------------------------------------------------------ inside a CUDA graph, against the reference path
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n_embd", [64, 128])
def test_cuda_graph_step_with_the_fused_paths_equals_the_reference_path(precision: str, n_embd: int, monkeypatch) -> None:
    """A captured step (GELU kernels, cuBLASLt epilogues, LayerNorm in the compute dtype) against an
    eager step with every fast path off (TINYGRAD_LM_FAST=0: the reference formulas)."""
    from nn.amp import autocast_
    from nn.cuda_graph import CapturedStep
    from tensor.cuda import cublaslt
    from tinygrad_lm.model import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=n_embd, pos_encoding="learned")
    model = autocast_(GPT(cfg, seed=5).to("cuda"), precision)
    step = CapturedStep(model, batch=4, seq=16)
    assert any(p is not None for p in cublaslt._PLANS.values()), "no GEMM took the cuBLASLt epilogue"
    ids = np.random.default_rng(1).integers(0, 64, (4, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    loss = float(backend.to_numpy(step(x, y)))
    graph = [_host(p.grad) for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    monkeypatch.setattr(dispatch, "_env_fast", False)
    _, eager = model(x, y)
    eager.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=6e-2, atol=1e-2)
    np.testing.assert_allclose(loss, eager.item(), **tol)
    for (name, p), g in zip(model.named_parameters(), graph):
        np.testing.assert_allclose(g, _host(p.grad), err_msg=name, **tol)


# ------------------------------------------------------------------ decoding (issue 19): residual add, GELU epilogue, split-K
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4097, 3 * 16384 + 5])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("swap", [False, True])
def test_residual_add_kernel_is_float32_plus_the_widened_branch(dtype: str, n: int, offset: int, swap: bool) -> None:
    """offset 0: aligned (4-wide vectors and a tail); offset 1: views one element in (one at a time)."""
    from tensor.cuda.residual import AddCUDA
    rng = np.random.default_rng(n)
    ah, bh = rng.standard_normal(n + offset).astype(np.float32), rng.standard_normal(n + offset).astype(_dtype(dtype))
    a, b = _gpu(ah)[offset:], _gpu(bh)[offset:]
    assert AddCUDA.supports(b, a) if swap else AddCUDA.supports(a, b)
    y = AddCUDA().forward(b, a) if swap else AddCUDA().forward(a, b)
    assert y.dtype == np.float32 and y.shape == (n,)
    np.testing.assert_array_equal(backend.to_numpy(y), ah[offset:] + bh[offset:].astype(np.float32))
    # the backward: g to the float32 side, g narrowed to the 16-bit side's dtype (round to nearest even)
    op = AddCUDA()
    op.forward(b, a) if swap else op.forward(a, b)
    g = _gpu(rng.standard_normal(n + offset).astype(np.float32) * 3)[offset:]
    ga, gb = op.backward(g)[::-1] if swap else op.backward(g)
    assert ga is g and gb.dtype == _dtype(dtype)
    np.testing.assert_array_equal(backend.to_numpy(gb).view(np.uint16), backend.to_numpy(g).astype(_dtype(dtype)).view(np.uint16))


def test_tensor_add_of_two_dtypes_takes_the_kernel_and_keeps_the_gradient_dtypes() -> None:
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((4, 64)).astype(np.float32), device="cuda", requires_grad=True)
    h = Tensor(rng.standard_normal((4, 64)).astype(_dtype("bfloat16")), device="cuda", requires_grad=True)
    y = x + h
    assert type(y._ctx).__name__ == "AddCUDA" and y.dtype == np.float32
    y.backward(Tensor(np.ones((4, 64), np.float32), device="cuda"))
    assert x.grad.dtype == np.float32 and h.grad.dtype == _dtype("bfloat16")
    assert type((x + x)._ctx).__name__ == "Add"   # one dtype: the reference add, no dispatch
    assert type((x + h[:1])._ctx).__name__ == "Add"   # broadcasting: the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cublaslt_gelu_bias_epilogue_equals_gelu_of_the_product_plus_bias(dtype: str, shape: tuple) -> None:
    from tensor.cuda import cublaslt
    m, k, n = shape
    rng = np.random.default_rng(m * k + n + 1)
    t = _dtype(dtype)
    xh, wh, bh = rng.standard_normal((m, k)) / np.sqrt(k), rng.standard_normal((n, k)), rng.standard_normal(n)
    y = cublaslt.matmul_bias_gelu(_gpu(xh, t), _gpu(wh, t).T, _gpu(bh, t), t)
    if y is None:
        assert shape != (64, 768, 3072), f"cuBLASLt declined the GELU_BIAS epilogue for {shape} {dtype}"
        return
    z = xh.astype(t).astype(np.float64) @ wh.astype(t).astype(np.float64).T + bh.astype(t).astype(np.float64)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == "float32" else TOL[dtype]   # (cuBLASLt's own tanh)
    np.testing.assert_allclose(_host(y), _gelu64(z)[0], **tol)


@pytest.mark.parametrize("compute", [None, "bfloat16", "float16"])
@pytest.mark.parametrize("lead,n_in,n_out", [((1,), 768, 3072), ((32,), 384, 1536), ((2, 7), 33, 5)])
@pytest.mark.parametrize("bias_dtype", ["float32", "compute"])
def test_linear_gelu_without_gradients_equals_the_reference(compute, lead, n_in, n_out, bias_dtype) -> None:
    """F.linear_gelu under no_grad (the GELU_BIAS epilogue, or LinearCUDA + the GELU kernel where
    cuBLASLt declines) against the reference LinearGelu with every fast path off."""
    from tensor.cuda import cublaslt
    from tensor.tensor import no_grad
    rng = np.random.default_rng(n_in + n_out)
    cd = None if compute is None else _dtype(compute)
    bt = np.float32 if bias_dtype == "float32" or cd is None else cd
    x = Tensor(rng.standard_normal(lead + (n_in,)).astype(np.float32), device="cuda")
    w = Tensor((rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32 if cd is None else cd), device="cuda")
    b = Tensor(rng.standard_normal(n_out).astype(bt), device="cuda")
    with no_grad():
        got = F.linear_gelu(x, w, b, compute_dtype=cd)
        with dispatch.reference_only():
            want = F.LinearGelu.apply(x, w, b, compute_dtype=cd)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOL[compute] if compute else dict(rtol=1e-3, atol=1e-3)   # (cuBLASLt's own tanh)
    np.testing.assert_allclose(_host(got.data), _host(want.data), **tol)
    if n_in == 768 and cd is not None:   # the decoder's case must take the epilogue
        assert any(p["epilogue"] == cublaslt._EPILOGUE_GELU_BIAS and p["k"] == n_in for p in cublaslt.plan_summary())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("m", [1, 8, 32, 64, 65])
@pytest.mark.parametrize("k,n", [(768, 2304), (768, 768), (768, 3072), (3072, 768), (1536, 384)])
def test_no_split_k_choice_gives_the_same_products(dtype: str, m: int, k: int, n: int, monkeypatch) -> None:
    """The bias GEMM with the heuristic's first algorithm (NO_SPLIT_K_ROWS = 0) and with the first
    without split-K (64) against float64; where an algorithm other than the first was taken, it does
    not split k. Prints what each case chose (run with -s to see it)."""
    from tensor.cuda import cublaslt
    rng = np.random.default_rng(m + k + n)
    t = _dtype(dtype)
    xh, wh, bh = rng.standard_normal((m, k)), rng.standard_normal((n, k)) / np.sqrt(k), rng.standard_normal(n)
    x, w, b = _gpu(xh, t), _gpu(wh, t), _gpu(bh, t)
    ref = xh.astype(t).astype(np.float64) @ wh.astype(t).astype(np.float64).T + bh.astype(t).astype(np.float64)
    for rows in (0, 64):
        monkeypatch.setattr(cublaslt, "NO_SPLIT_K_ROWS", rows)
        y = cublaslt.matmul_bias(x, w.T, b, t)
        assert y is not None, f"cuBLASLt declined the bias epilogue for {(m, k, n)} {dtype}"
        np.testing.assert_allclose(_host(y), ref, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * 4)
    mine = [p for p in cublaslt.plan_summary() if (p["m"], p["k"], p["n"]) == (m, k, n) and p["dtype"] == dtype
            and p["epilogue"] == cublaslt._EPILOGUE_BIAS]
    print(mine)
    assert {p["avoid_split_k"] for p in mine} == ({False, True} if m <= 64 else {False})
    for p in mine:
        if not p["avoid_split_k"]:
            assert p["chosen"] == 0
        elif p["chosen"] > 0:
            assert p["chosen_split_k"] <= 1


# ------------------------------------------------------------------ cross-entropy kernels against the reference
CE_TOL = {"float64": dict(loss=1e-10, rtol=1e-9, atol=1e-13), "float32": dict(loss=2e-5, rtol=1e-4, atol=1e-6),
          "float16": dict(loss=2e-5, rtol=2e-3, atol=1e-3), "bfloat16": dict(loss=2e-5, rtol=1e-2, atol=4e-3)}


def _ce_run(cls, xh: np.ndarray, tg: np.ndarray, g: float, ignore_index: int = -100) -> tuple:
    """(loss, dlogits) of cls.apply on the GPU, on the same (16-bit: same 16-bit) logits."""
    x = Tensor(_gpu(xh), requires_grad=True)
    loss = cls.apply(x, _gpu(tg), ignore_index=ignore_index)
    loss.backward(Tensor(backend.to_device(np.full(loss.shape, g, dtype=loss.dtype), "cuda")))  # (0-d: not _gpu)
    assert x.grad.dtype == xh.dtype and x.grad.shape == xh.shape
    return float(_host(loss.data)), _host(x.grad)


@pytest.mark.parametrize("dtype", DTYPES + ["float64"])
@pytest.mark.parametrize("C", [5, 65, 4104, 50257, 50304])
@pytest.mark.parametrize("N", [3, 37])
def test_cross_entropy_kernels_equal_the_reference(dtype: str, C: int, N: int) -> None:
    """CrossEntropyCUDA (one-pass online log-sum-exp forward; 16-byte loads where C * itemsize % 16 == 0,
    here 4104 and 50304, else one element a load) against the reference CrossEntropy on the same inputs
    (16-bit logits: the reference computes in float32): the loss and the logits' gradient. Every third
    target ignored (nll 0, dx exactly 0); the last row has its first half at -inf and targets C - 1.
    (float64 is dispatched to the reference; its kernels are called here directly, through apply.)"""
    from tensor.cuda import cross_entropy as ce
    rng = np.random.default_rng(C * 100 + N)
    t = _dtype(dtype)
    xh = (rng.standard_normal((N, C)) * 4).astype(t)
    xh[-1, :C // 2] = -np.inf
    tg = rng.integers(0, C, N)
    tg[::3], tg[-1] = -100, C - 1
    vec = (C * t.itemsize) % 16 == 0
    assert (ce._plan(_gpu(xh))[1] > 1) == vec
    assert ce.CrossEntropyCUDA.supports(_gpu(xh)) == (dtype != "float64")
    loss, dx = _ce_run(ce.CrossEntropyCUDA, xh, tg, 0.7)
    ref_loss, ref_dx = _ce_run(F.CrossEntropy, xh, tg, 0.7)
    tol = CE_TOL[dtype]
    scale = 0.7 / int((tg != -100).sum())
    print(f"cross_entropy {dtype} C={C} N={N} vec={vec}: loss {loss:.8g} (reference {ref_loss:.8g}), "
          f"max |ddx| {np.abs(dx - ref_dx).max() / scale:.3g} * scale")
    np.testing.assert_allclose(loss, ref_loss, rtol=tol["loss"])
    assert np.all(dx[tg == -100] == 0) and np.all(dx[-1, :C // 2] == 0)
    np.testing.assert_allclose(dx, ref_dx, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cross_entropy_kernels_on_a_misaligned_view_and_with_every_target_ignored(dtype: str) -> None:
    """A view one element into its buffer (rows a whole number of vectors, the base not 16-byte aligned):
    the one-element kernels, equal to the reference; every target ignored: loss 0 and dx 0."""
    from tensor.cuda import cross_entropy as ce
    rng = np.random.default_rng(1)
    t = _dtype(dtype)
    N, C = 6, 4104
    buf = _gpu(rng.standard_normal(N * C + 1).astype(t))
    x = buf[1:].reshape(N, C)
    assert ce._plan(x)[1] == 1
    tg = _gpu(rng.integers(0, C, N))
    got, ref = (cls.apply(Tensor(x), tg) for cls in (ce.CrossEntropyCUDA, F.CrossEntropy))
    np.testing.assert_allclose(_host(got.data), _host(ref.data), rtol=2e-5)
    lse, nll = ce.cross_entropy_forward(x, tg, -100)
    dx = ce.cross_entropy_backward(x, tg, lse, _gpu(np.array([0.5], np.float32)), -100)
    ref_dx = _ce_run(F.CrossEntropy, backend.to_numpy(x), backend.to_numpy(tg), 0.5 * N)[1]
    np.testing.assert_allclose(_host(dx), ref_dx, rtol=CE_TOL[dtype]["rtol"], atol=CE_TOL[dtype]["atol"] * 0.5)
    loss, dxi = _ce_run(ce.CrossEntropyCUDA, rng.standard_normal((4, 64)).astype(t), np.full(4, 7), 1.0, ignore_index=7)
    assert loss == 0 and np.all(dxi == 0)
