"""GPU (CuPy) checks of attention's CUDA fast paths (tensor/cuda/attention.py) against the reference
Functions (tensor/attention.py) run on the same CuPy arrays; skipped cleanly without CuPy or a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from tensor import Tensor, backend

pytestmark = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")

TOL = {"float32": dict(rtol=1e-4, atol=1e-5), "float16": dict(rtol=2e-2, atol=2e-2),
       "bfloat16": dict(rtol=6e-2, atol=6e-2)}


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


def _run(cls, host: list, g: np.ndarray, dtype, **kw) -> list:
    ts = [Tensor(a.astype(dtype), device="cuda", requires_grad=True) for a in host]
    y = cls.apply(*ts, **kw)
    y.backward(Tensor(g.astype(dtype), device="cuda"))
    return [backend.to_numpy(a).astype(np.float64) for a in [y.data] + [t.grad for t in ts]]


def _close(fast: list, ref: list, names: tuple, dtype: str) -> None:
    for name, a, b in zip(names, fast, ref):
        np.testing.assert_allclose(a, b, err_msg=name, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 5, 8), (1, 2, 1, 7, 16), (2, 2, 33, 40, 32), (1, 1, 1100, 1100, 8)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cuda_sdpa_equals_reference(dtype: str, shape: tuple, dropout: float) -> None:
    """Causal, Tq <= Tk (the KV-cache case), rows short (a warp per row) and past 1024 keys (a block per row)."""
    from tensor.attention import ScaledDotProductAttention
    from tensor.cuda.attention import CudaScaledDotProductAttention
    B, H, Tq, Tk, D = shape
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((B, H, T, D)) for T in (Tq, Tk, Tk)]
    g = rng.standard_normal((B, H, Tq, D))
    dt = _dtype(dtype)
    assert CudaScaledDotProductAttention.supports(*[Tensor(a.astype(dt), device="cuda").data for a in host])
    kw = dict(causal=True, dropout_p=dropout)
    fast = _run(CudaScaledDotProductAttention, host, g, dt, generator=np.random.default_rng(1), **kw)
    ref = _run(ScaledDotProductAttention, host, g, dt, generator=np.random.default_rng(1), **kw)
    _close(fast, ref, ("out", "dq", "dk", "dv"), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cuda_fused_qkv_equals_reference(dtype: str, dropout: float) -> None:
    from tensor.attention import CausalAttentionQKV
    from tensor.cuda.attention import CudaCausalAttentionQKV
    rng = np.random.default_rng(2)
    B, T, H, D = 3, 37, 4, 16
    host = [rng.standard_normal((B, T, 3 * H * D))]
    g = rng.standard_normal((B, T, H * D))
    dt = _dtype(dtype)
    kw = dict(n_head=H, dropout_p=dropout)
    fast = _run(CudaCausalAttentionQKV, host, g, dt, generator=np.random.default_rng(3), **kw)
    ref = _run(CausalAttentionQKV, host, g, dt, generator=np.random.default_rng(3), **kw)
    _close(fast, ref, ("out", "dqkv"), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_split_and_merge_equal_reference(dtype: str) -> None:
    from tensor.attention import MergeHeads, SplitHeads
    from tensor.cuda.attention import CudaMergeHeads, CudaSplitHeads
    rng = np.random.default_rng(4)
    dt = _dtype(dtype)
    x, gs = [rng.standard_normal((2, 5, 3 * 4 * 8))], rng.standard_normal((3, 2, 4, 5, 8))
    _close(_run(CudaSplitHeads, x, gs, dt, n_head=4, parts=3), _run(SplitHeads, x, gs, dt, n_head=4, parts=3),
           ("heads", "dx"), dtype)
    y, gm = [rng.standard_normal((2, 4, 5, 8))], rng.standard_normal((2, 5, 32))
    _close(_run(CudaMergeHeads, y, gm, dt), _run(MergeHeads, y, gm, dt), ("merged", "dy"), dtype)


def test_dispatch_picks_the_cuda_paths_and_the_reference_elsewhere() -> None:
    from tensor.attention import CausalAttentionQKV, ScaledDotProductAttention
    from tensor.cuda.attention import CudaCausalAttentionQKV, CudaScaledDotProductAttention
    from tensor.dispatch import pick
    x = Tensor(np.zeros((1, 2, 4, 8), np.float32), device="cuda").data
    fast = pick(ScaledDotProductAttention, x, x, x, mask=None, causal=True, dropout_p=0.1)
    assert fast is CudaScaledDotProductAttention
    assert pick(ScaledDotProductAttention, x, x, x, mask=x[0, 0] > 0, causal=True) is ScaledDotProductAttention
    assert pick(ScaledDotProductAttention, x.astype(np.float64), x, x, causal=True) is ScaledDotProductAttention
    qkv = Tensor(np.zeros((1, 4, 24), np.float32), device="cuda").data
    assert pick(CausalAttentionQKV, qkv, mask=None, dropout_p=0.0) is CudaCausalAttentionQKV


@pytest.mark.parametrize("pos_encoding,norm", [("sinusoidal", "layernorm"), ("rope", "rmsnorm")])
def test_gpt_on_gpu_equals_cpu_and_decodes_with_the_cache(pos_encoding: str, norm: str) -> None:
    from tensor import no_grad
    from tinygrad_lm.model import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=16, pos_encoding=pos_encoding, norm=norm)
    idx = np.random.default_rng(1).integers(0, 31, (3, 13))
    cpu, gpu = GPT(cfg, seed=0), GPT(cfg, seed=0).to("cuda")
    _, lc = cpu(idx[:, :-1], idx[:, 1:])
    _, lg = gpu(idx[:, :-1], idx[:, 1:])
    lc.backward()
    lg.backward()
    np.testing.assert_allclose(lg.item(), lc.item(), rtol=1e-5)
    for (n, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        np.testing.assert_allclose(backend.to_numpy(pg.grad), pc.grad, rtol=1e-3, atol=1e-5, err_msg=n)
    with no_grad():
        full = backend.to_numpy(gpu(idx)[0].data)
        caches = gpu.new_caches(3)
        parts = [backend.to_numpy(gpu(idx[:, a:b], caches=caches)[0].data) for a, b in ((0, 5), (5, 6), (6, 13))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-4, atol=1e-4)
