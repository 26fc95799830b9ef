"""GPU (CuPy) checks of the fused attention kernels (tensor/cuda/flash_attention.py) against the
reference formulas (tensor/attention.py) in float64 on the same dtype-rounded inputs, the dispatch
choosing them (tensor/cuda/attention.py's SCORES_BUDGET rule; the tests set it to 0 where they need
flash), and a GPT training step captured in a CUDA graph through them. Skipped cleanly without CuPy
or a GPU. Tolerances: max |error| / max(max |reference|, 1) per output (check); a failure names the
tensor, its shape, the worst element's index and both values. The same kernels run on the CPU in
tests/test_flash_on_cpu.py (emulated, poisoned memory): a failure here that passes there points at
what the emulation cannot see (timing, hardware rounding, launch limits)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tensor import Tensor, backend

pytestmark = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")

TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}   # see check


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


def _reference(q, k, v, g, mask, causal):
    from tensor.attention import allowed_keys, sdpa_backward, sdpa_forward
    allowed = allowed_keys(np, q.shape[2], k.shape[2], causal, mask)
    o, p, _ = sdpa_forward(q, k, v, allowed, 0.0, None)
    return [o] + list(sdpa_backward(g, q, k, v, p, None, 0.0))


def check(got, want, names, tol: float) -> None:
    """Each output's max |error| over max(max |reference|, 1) is at most tol. The inputs are unit normal,
    so outputs are of order 1; the floor of 1 keeps a reference that cancels to exactly 0 (dQ and dK
    at T = 1, where P = 1 and dS = dP - Delta) from turning the dtype's rounding noise into a huge
    "relative" error. A failure names the tensor, the index of its worst element and both values."""
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: shape {a.shape}, reference {b.shape}"
        bad = ~np.isfinite(a) & np.isfinite(b)
        if bad.any():
            idx = tuple(int(i) for i in np.unravel_index(np.argmax(bad), a.shape))
            raise AssertionError(f"{name}: {int(bad.sum())} non-finite values of {a.size}, first at {idx}: "
                                 f"{a[idx]} (reference {b[idx]})")
        diff = np.abs(np.where(np.isfinite(b), a - b, 0.0))
        scale = max(float(np.abs(np.where(np.isfinite(b), b, 0.0)).max(initial=0.0)), 1.0)
        err = float(diff.max(initial=0.0)) / scale
        if not err <= tol:
            idx = tuple(int(i) for i in np.unravel_index(np.argmax(diff), a.shape))
            raise AssertionError(f"{name} {a.shape}: max error {err:.3g} (tolerance {tol}) at {idx}: got {a[idx]:.6g}, "
                                 f"reference {b[idx]:.6g}; max |reference| {scale:.4g}; "
                                 f"{int((diff > tol * scale).sum())} elements over")


def _inputs(rng: np.random.Generator, dtype: str, D: int, T: int, variant: str) -> tuple:
    """Host q, k, v (B, H, Tq|T, D), the output gradient g and the (B, T) key mask (None when causal only);
    masked: Tq < Tk, the queries at the end, and batch 0's first keys masked (with causal, its first rows
    may see no key)."""
    B, H = (2, 3) if T <= 257 else (1, 2)
    Tq = T if variant == "causal" else max(1, T // 2)
    dt = _dtype(dtype)
    host = [(rng.standard_normal((B, H, n, D)) * s).astype(dt) for n, s in ((Tq, 2.0), (T, 1.0), (T, 1.0))]
    g = rng.standard_normal((B, H, Tq, D)).astype(dt)
    mask = None
    if variant == "masked":
        mask = rng.random((B, T)) > 0.3
        mask[0, : min(5, T)] = False
    return host, g, mask


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("T", [1, 7, 64, 100, 257, 1024])
@pytest.mark.parametrize("variant", ["causal", "masked"])
def test_flash_kernels_equal_the_reference(dtype: str, D: int, T: int, variant: str) -> None:
    _against_the_reference(dtype, D, T, variant, T * 7 + D)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("N", [32, 64])
@pytest.mark.parametrize("T", [1, 7, 100, 257, 1024])
@pytest.mark.parametrize("variant", ["causal", "masked"])
def test_forward_key_tiles_equal_the_reference(monkeypatch, dtype: str, N: int, T: int, variant: str) -> None:
    """The forward's builds by key tile at D = 128 (FA.FWD_KEY_TILES: 32 keys in two stages, 64 in one)."""
    from tensor.cuda import flash_attention as FA
    monkeypatch.setitem(FA.FWD_KEY_TILES, (dtype, 128), N)
    assert FA.kernel_names(dtype, 128)["fwd"].startswith(f"flash_fwd<{FA.TRAITS[dtype]},128,{N},")
    _against_the_reference(dtype, 128, T, variant, T * 5 + N)


def _against_the_reference(dtype: str, D: int, T: int, variant: str, seed: int) -> None:
    from tensor.cuda import flash_attention as FA
    cp = backend.cupy_module()
    host, g, mask = _inputs(np.random.default_rng(seed), dtype, D, T, variant)
    dev = [cp.asarray(a) for a in host]
    dmask = None if mask is None else cp.asarray(mask)
    assert FA.fits(*dev, mask=dmask, causal=True)
    o, lse = FA.forward(*dev, mask=dmask, causal=True)
    grads = FA.backward(cp.asarray(g), *dev, o, lse, mask=dmask, causal=True)
    got = [cp.asnumpy(a).astype(np.float64) for a in (o,) + tuple(grads)]
    want = _reference(*[a.astype(np.float64) for a in host], g.astype(np.float64), mask, True)
    check(got, want, ("O", "dQ", "dK", "dV"), TOL[dtype])


def _variants():
    from tensor.cuda import flash_attention as FA
    return sorted(FA.BWD_VARIANTS)


@pytest.mark.parametrize("bwd", _variants())
@pytest.mark.parametrize("dtype,D", [("bfloat16", 64), ("bfloat16", 128), ("float16", 32), ("float32", 64)])
@pytest.mark.parametrize("T", [7, 200, 1024])
@pytest.mark.parametrize("variant", ["causal", "masked"])
def test_backward_variants_equal_the_reference(dtype: str, D: int, T: int, variant: str, bwd: str) -> None:
    """Every build of the backward (FA.BWD_VARIANTS: 8 warps, vector atomics, heavy-first grid, stages,
    register bound, fast exp2, vector Delta) against the reference, as the test above for the default."""
    from tensor.cuda import flash_attention as FA
    cp = backend.cupy_module()
    host, g, mask = _inputs(np.random.default_rng(T * 11 + D), dtype, D, T, variant)
    dev = [cp.asarray(a) for a in host]
    dmask = None if mask is None else cp.asarray(mask)
    o, lse = FA.forward(*dev, mask=dmask, causal=True)
    grads = FA.backward(cp.asarray(g), *dev, o, lse, mask=dmask, causal=True, variant=bwd)
    got = [cp.asnumpy(a).astype(np.float64) for a in (o,) + tuple(grads)]
    want = _reference(*[a.astype(np.float64) for a in host], g.astype(np.float64), mask, True)
    check(got, want, ("O", "dQ", "dK", "dV"), TOL[dtype])


@pytest.mark.parametrize("bwd", _variants())
def test_backward_variants_in_a_cuda_graph(bwd: str) -> None:
    """Each backward build captured in a CUDA graph (dynamic shared memory, the grid orders) replays to the
    eager result: same dK, dV bits (deterministic), dQ within atomics' reordering."""
    from tensor.cuda import flash_attention as FA
    cp = backend.cupy_module()
    rng = np.random.default_rng(2)
    dt = _dtype("bfloat16")
    q, k, v, g = (cp.asarray(rng.standard_normal((2, 2, 300, 64)).astype(dt)) for _ in range(4))
    o, lse = FA.forward(q, k, v, causal=True)
    want = [cp.asnumpy(a).astype(np.float64) for a in FA.backward(g, q, k, v, o, lse, causal=True, variant=bwd)]
    out = tuple(cp.empty_like(a) for a in (q, k, v))
    FA.backward(g, q, k, v, o, lse, causal=True, out=out, variant=bwd)   # compiled and allocated outside the capture
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()   # the graph's own temporaries
    cp.cuda.Device().synchronize()
    with stream, cp.cuda.using_allocator(pool.malloc):
        stream.begin_capture()
        try:
            FA.backward(g, q, k, v, o, lse, causal=True, out=out, variant=bwd)
        finally:
            graph = stream.end_capture()
        for a in out:
            a.fill(0)
        graph.launch()
    stream.synchronize()
    got = [cp.asnumpy(a).astype(np.float64) for a in out]
    np.testing.assert_allclose(got[0], want[0], rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_flash_not_causal_and_tq_above_tk(dtype: str) -> None:
    from tensor.cuda import flash_attention as FA
    cp = backend.cupy_module()
    rng = np.random.default_rng(5)
    dt = _dtype(dtype)
    host = [rng.standard_normal((1, 2, n, 64)).astype(dt) for n in (90, 70, 70)]
    g = rng.standard_normal((1, 2, 90, 64)).astype(dt)
    dev = [cp.asarray(a) for a in host]
    o, lse = FA.forward(*dev, causal=False)
    got = [cp.asnumpy(a).astype(np.float64) for a in (o,) + FA.backward(cp.asarray(g), *dev, o, lse, causal=False)]
    check(got, _reference(*[a.astype(np.float64) for a in host], g.astype(np.float64), None, False),
           ("O", "dQ", "dK", "dV"), TOL[dtype])


def _counting(monkeypatch, budget: int = 0) -> dict:
    """Count the flash kernels' forward and backward calls (proof that the dispatch took them), with the
    dispatch's SCORES_BUDGET set to `budget` (0: flash wherever it fits)."""
    from tensor.cuda import attention as CA
    from tensor.cuda import flash_attention as FA
    monkeypatch.setattr(CA, "SCORES_BUDGET", budget)
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(FA, name)

        def wrapped(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(FA, name, wrapped)
    return calls


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("masked", [False, True])
def test_dispatch_takes_flash_and_saves_no_scores(monkeypatch, dtype: str, masked: bool) -> None:
    """The Functions the model calls (nn.attention) pick the CUDA classes, which run the flash kernels:
    saved for backward are q, k, v, o and the (B, H, T) log-sum-exp, nothing of size T x T."""
    from nn.attention import causal_attention_qkv, scaled_dot_product_attention
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(3)
    B, T, H, D = 2, 100, 3, 64
    dt = _dtype(dtype)
    mask = rng.random((B, T)) > 0.2 if masked else None
    qkv_host = rng.standard_normal((B, T, 3 * H * D))
    g_host = rng.standard_normal((B, T, H * D))
    qkv = Tensor(qkv_host.astype(dt), device="cuda", requires_grad=True)
    y = causal_attention_qkv(qkv, H, mask=None if mask is None else Tensor(mask, device="cuda"))
    saved = [a for a in y._ctx.saved if a is not None]
    assert len(saved) == 5 and saved[-1].shape == (B, H, T) and max(a.size for a in saved) == B * H * T * D
    y.backward(Tensor(g_host.astype(dt), device="cuda"))
    assert calls == {"forward": 1, "backward": 1}
    # the reference on the CPU, in float64, on the same rounded inputs
    from tensor.attention import split_forward
    q, k, v = (np.ascontiguousarray(a) for a in split_forward(qkv_host.astype(dt).astype(np.float64), H, 3))
    gh = np.ascontiguousarray(split_forward(g_host.astype(dt).astype(np.float64), H, 1)[0])
    o, dq, dk, dv = _reference(q, k, v, gh, mask, True)
    want_y = o.transpose(0, 2, 1, 3).reshape(B, T, H * D)
    want_dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * D)
    check([backend.to_numpy(y.data).astype(np.float64), backend.to_numpy(qkv.grad).astype(np.float64)],
           [want_y, want_dqkv], ("y", "dqkv"), TOL[dtype])
    # the pieces' path (scaled_dot_product_attention on contiguous heads) takes them too
    qt, kt, vt = (Tensor(a.astype(dt), device="cuda", requires_grad=True) for a in (q, k, v))
    scaled_dot_product_attention(qt, kt, vt, mask=None if mask is None else Tensor(mask, device="cuda")).sum().backward()
    assert calls == {"forward": 2, "backward": 2}


def test_the_scores_budget_picks_the_path(monkeypatch) -> None:
    """tensor/cuda/attention.py's rule: head dims up to FLASH_HEAD_DIM take flash; above it, flash from
    FLASH_KEYS keys on, and below that causal without a mask takes cuBLAS while its float32 scores fit
    SCORES_BUDGET, flash beyond; a padding mask takes flash at any size."""
    from nn.attention import causal_attention_qkv
    from tensor.cuda import attention as CA
    B, T, H = 2, 64, 2
    scores = B * H * T * T * 4
    mask = Tensor(np.ones((B, T), bool), device="cuda")
    for D, budget, keys, masked, want in ((128, scores, T + 1, False, 0), (128, scores - 1, T + 1, False, 1),
                                          (128, scores, T + 1, True, 1), (128, scores, T, False, 1),
                                          (64, scores, T + 1, False, 1)):
        qkv = Tensor(np.random.default_rng(0).standard_normal((B, T, 3 * H * D)).astype(np.float32), device="cuda",
                     requires_grad=True)
        calls = _counting(monkeypatch, budget)
        monkeypatch.setattr(CA, "FLASH_KEYS", keys)
        causal_attention_qkv(qkv, H, mask=mask if masked else None).sum().backward()
        assert calls == {"forward": want, "backward": want}, (D, budget, keys, masked, calls)
        monkeypatch.undo()


def test_dropout_keeps_the_cublas_path(monkeypatch) -> None:
    from nn.attention import causal_attention_qkv
    calls = _counting(monkeypatch)
    qkv = Tensor(np.random.default_rng(0).standard_normal((2, 16, 3 * 2 * 32)).astype(np.float32), device="cuda",
                 requires_grad=True)
    causal_attention_qkv(qkv, 2, dropout_p=0.2, generator=np.random.default_rng(1)).sum().backward()
    assert calls == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpt_step_in_a_cuda_graph_through_flash_equals_eager(monkeypatch, precision: str) -> None:
    """A GPT (D = 32 heads) training step recorded as a CUDA graph (nn.cuda_graph.CapturedStep) and
    replayed on new batches gives the eager step's loss and gradients; the flash kernels ran."""
    from nn.amp import autocast_
    from nn.cuda_graph import CapturedStep
    from tinygrad_lm.model import GPT, GPTConfig
    calls = _counting(monkeypatch)
    cfg = GPTConfig(vocab_size=61, block_size=80, n_layer=2, n_head=2, n_embd=64)
    model = autocast_(GPT(cfg, seed=0).to("cuda"), precision)
    step = CapturedStep(model, batch=3, seq=70)
    assert calls["forward"] > 0 and calls["backward"] > 0
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    rng = np.random.default_rng(4)
    for _ in range(2):
        ids = rng.integers(0, 61, (3, 71))
        x, y = ids[:, :-1], ids[:, 1:]
        loss = step(x, y)
        graph = [backend.to_numpy(p.grad) for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        _, eager = model(x, y)
        eager.backward()
        np.testing.assert_allclose(float(backend.to_numpy(loss)), eager.item(), **tol)
        for gr, p in zip(graph, model.parameters()):
            np.testing.assert_allclose(gr, backend.to_numpy(p.grad), **tol)
            p.grad = None


def test_lse_is_the_row_log_sum_exp() -> None:
    from tensor.cuda import flash_attention as FA
    cp = backend.cupy_module()
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 1, 40, 32)).astype(np.float32) for _ in range(3))
    mask = np.ones((1, 40), bool)
    mask[0, :3] = False
    _, lse = FA.forward(*(cp.asarray(a) for a in (q, k, v)), mask=cp.asarray(mask), causal=True)
    s = np.where(np.tri(40, 40, dtype=bool) & mask, q[0, 0].astype(np.float64) @ k[0, 0].T / math.sqrt(32), -np.inf)
    with np.errstate(divide="ignore"):
        want = np.log(np.exp(s).sum(-1))
    want[np.isneginf(want)] = np.inf   # rows with no key: +inf, so backward's exp(S - L) is 0
    got = cp.asnumpy(lse)[0, 0]
    assert np.array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5)
