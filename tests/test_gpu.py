"""GPU (CuPy) checks: skipped cleanly without CuPy or a GPU; run for real on the device machine."""
from __future__ import annotations

import contextlib

import numpy as np

from tensor import dispatch
import pytest

from tensor import Tensor, backend, gradcheck
import tensor.functional as F

pytestmark = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and an NVIDIA GPU")


def tiny_gpt(seed: int = 0, pos: str = "sinusoidal"):
    from tinygrad_lm.model import GPT, GPTConfig
    return GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=16, pos_encoding=pos), seed=seed)


def test_tensor_lives_on_the_gpu_and_comes_back() -> None:
    x = Tensor(np.arange(6.0).reshape(2, 3), device="cuda", requires_grad=True)
    assert x.device == "cuda"
    y = (x * 2).sum()
    y.backward()
    assert backend.device_of(x.grad) == "cuda"
    np.testing.assert_allclose(backend.to_numpy(x.grad), 2.0)
    assert x.to("cpu").device == "cpu"


def test_mixing_devices_is_an_error_naming_both() -> None:
    a = Tensor(np.ones(3), device="cuda")
    b = Tensor(np.ones(3))
    with pytest.raises(RuntimeError, match="cuda.*cpu|cpu.*cuda"):
        a + b


@pytest.mark.parametrize("name", ["matmul", "linear", "softmax", "log_softmax", "cross_entropy", "layer_norm", "embedding",
                                  "gelu", "max", "getitem", "attention"])
def test_gradcheck_float64_on_gpu(name: str) -> None:
    from nn.functional import scaled_dot_product_attention
    rng = np.random.default_rng(0)
    g = lambda *s: Tensor(rng.standard_normal(s), device="cuda", requires_grad=True)  # noqa: E731
    t = np.array([0, 3, 1])
    ids = np.array([[0, 2, 2], [1, 0, 3]])
    cases = {
        "matmul": (lambda a, b: a @ b, [g(2, 3, 4), g(4, 5)]),
        "linear": (lambda a, w, b: F.linear(a, w, b), [g(2, 3, 4), g(5, 4), g(5)]),  # cuBLAS gemmEx + GEMV
        "softmax": (lambda a: F.softmax(a), [g(3, 5)]),
        "log_softmax": (lambda a: F.log_softmax(a, axis=0), [g(3, 5)]),
        "cross_entropy": (lambda a: F.cross_entropy(a, t), [g(3, 5)]),
        "layer_norm": (lambda a, w, b: F.layer_norm(a, w, b), [g(2, 3, 6), g(6), g(6)]),
        "embedding": (lambda w: F.embedding(ids, w), [g(4, 3)]),
        "gelu": (lambda a: a.gelu(), [g(4, 4)]),
        "max": (lambda a: a.max(axis=1), [g(3, 4)]),
        "getitem": (lambda a: a[np.array([0, 2, 0])], [g(3, 4)]),
        "attention": (lambda q, k, v: scaled_dot_product_attention(q, k, v), [g(1, 2, 4, 3), g(1, 2, 4, 3), g(1, 2, 4, 3)]),
    }
    fn, inputs = cases[name]
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
def test_cpu_and_gpu_give_the_same_loss_and_grads(pos: str) -> None:
    idx = np.random.default_rng(1).integers(0, 31, (3, 13))
    cpu, gpu = tiny_gpt(pos=pos), tiny_gpt(pos=pos).to("cuda")
    _, lc = cpu(idx[:, :-1], idx[:, 1:])
    _, lg = gpu(idx[:, :-1], idx[:, 1:])
    lc.backward()
    lg.backward()
    assert lg.device == "cuda"
    np.testing.assert_allclose(lg.item(), lc.item(), rtol=1e-5)
    for (n, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        np.testing.assert_allclose(backend.to_numpy(pg.grad), pc.grad, rtol=1e-3, atol=1e-5, err_msg=n)


def test_training_step_on_gpu_syncs_only_at_log_steps(tmp_path, monkeypatch) -> None:
    from tinygrad_lm.train import Trainer, make_config
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    cfg = make_config(None, None, data=str(corpus), n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4,
                      max_iters=5, sample_tokens=0, progress=False, out=str(tmp_path / "run"), device="cuda",
                      cache_dir=str(tmp_path / "cache"))
    tr = Trainer(cfg, log=lambda s: None)
    tr.train_step()  # warm-up (allocations, plan)
    calls = []
    real = backend.device_to_host
    monkeypatch.setattr(backend, "device_to_host", lambda x: calls.append(x.shape) or real(x))
    losses = [tr.train_step() for _ in range(3)]
    assert calls == [], f"a training step copied to the host: {calls}"
    lossf = tr.check_finite(losses[-1])  # the one sync, at a log step
    assert np.isfinite(lossf) and len(calls) >= 1
    assert all(backend.device_of(p.data) == "cuda" for p in tr.model.parameters())
    for st in tr.optimizer.state.values():
        assert all(backend.device_of(v) == "cuda" for v in st.values() if hasattr(v, "shape"))


def test_sampler_on_gpu_matches_cpu() -> None:
    from tinygrad_lm.sample import generate
    prompt = np.array([[1, 2, 3]])
    a = generate(tiny_gpt(), prompt, 20, temperature=0)
    b = generate(tiny_gpt().to("cuda"), prompt, 20, temperature=0)
    assert (a == b).all()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_step_on_gpu(precision: str) -> None:
    from nn.amp import autocast_
    idx = np.random.default_rng(2).integers(0, 31, (4, 13))
    ref, m = tiny_gpt(), autocast_(tiny_gpt().to("cuda"), precision)
    _, l32 = ref(idx[:, :-1], idx[:, 1:])
    logits, l = m(idx[:, :-1], idx[:, 1:])
    l.backward()
    assert str(logits.dtype) in ("float16", "bfloat16")
    assert l.dtype == np.float32
    np.testing.assert_allclose(l.item(), l32.item(), rtol=2e-2)
    for p in m.parameters():
        assert p.dtype == np.float32 and p.grad.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_fused_kernels_match_the_reference_ops(dtype: str, monkeypatch) -> None:
    """Each fused kernel against the readable array-API path (TINYGRAD_LM_FAST=0)."""
    from nn.functional import causal_attention_qkv
    rng = np.random.default_rng(3)
    tol = {"float16": dict(rtol=2e-2, atol=2e-2), "bfloat16": dict(rtol=6e-2, atol=6e-2)}.get(
        dtype, dict(rtol=1e-4, atol=1e-5))
    if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    shapes = {"x": (2, 5, 8), "w": (8,), "qkv": (2, 5, 24), "logits": (6, 11)}
    host = {k: rng.standard_normal(s) for k, s in shapes.items()}
    targets = np.array([0, 3, -100, 10, 2, 2])

    def run() -> dict:
        t = {k: Tensor(v.astype(dtype), device="cuda", requires_grad=True) for k, v in host.items()}
        outs = {
            "gelu": t["x"].gelu(),
            "layer_norm": F.layer_norm(t["x"], t["w"], t["w"] * 0.5),
            "attention": causal_attention_qkv(t["qkv"], n_head=2),
            "cross_entropy": F.cross_entropy(t["logits"], targets),
        }
        total = sum(((o.astype(np.float32) * 1.3) ** 2).sum() for o in outs.values())
        total.backward()
        res = {k: backend.to_numpy(o.data).astype(np.float64) for k, o in outs.items()}
        res.update({f"grad_{k}": backend.to_numpy(v.grad).astype(np.float64) for k, v in t.items()})
        return res

    fused = run()
    monkeypatch.setattr(dispatch, "_env_fast", False)
    ref = run()
    for k in ref:
        np.testing.assert_allclose(fused[k], ref[k], err_msg=k, **tol)


def test_fused_adam_matches_reference(monkeypatch) -> None:
    from nn import Parameter
    from nn.optim import AdamW

    def run() -> np.ndarray:
        p = Parameter(np.linspace(-1, 1, 12).reshape(3, 4), device="cuda")
        opt = AdamW([p], lr=0.1, weight_decay=0.1)
        for i in range(3):
            p.grad = p.data * (i + 1) - 0.3
            opt.step()
        return backend.to_numpy(p.data)

    fused = run()
    monkeypatch.setattr(dispatch, "_env_fast", False)
    np.testing.assert_allclose(fused, run(), rtol=1e-10, atol=1e-12)


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_cublas_matmul_against_float64_products_on_every_layout(dtype: str) -> None:
    """tensor.cublas.matmul: transposed, strided, batched, broadcast and non-collapsible operands,
    out= into a slice with beta, float32 results from 16-bit inputs; reference: NumPy float64."""
    from tensor.cuda import cublas
    cp = backend.cupy_module()
    dt = _dtype(dtype)
    tol = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    rng = np.random.default_rng(5)

    def dev(shape):  # values exactly representable in dt, so the reference sees the same inputs
        h = rng.standard_normal(shape).astype(dt)
        return cp.asarray(h), h.astype(np.float64)

    def check(got, want):
        got = backend.to_numpy(got).astype(np.float64)
        scale = np.abs(want).max() + 1
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= tol * scale * 4, (got, want)

    a, ah = dev((5, 7))
    b, bh = dev((7, 3))
    check(cublas.matmul(a, b), ah @ bh)
    bt, bth = dev((3, 7))
    check(cublas.matmul(a, bt.T), ah @ bth.T)                      # column-major b: an op flag, no copy
    at, ath = dev((7, 5))
    check(cublas.matmul(at.T, bt.T), ath.T @ bth.T)
    big, bigh = dev((5, 20))
    check(cublas.matmul(big[:, 3:10], b), bigh[:, 3:10] @ bh)       # strided rows (lda 20)
    q, qh = dev((4, 6, 5, 7))
    k, kh = dev((4, 6, 9, 7))
    check(cublas.matmul(q, k.swapaxes(-1, -2)), qh @ kh.swapaxes(-1, -2))   # batched, transposed keys
    check(cublas.matmul(q, b), qh @ bh)                             # b broadcast over every batch
    w, wh = dev((1, 6, 7, 3))
    check(cublas.matmul(q, w), qh @ wh)                             # partial broadcast (copied)
    qkv, qkvh = dev((2, 5, 3, 4, 7))                                # heads sliced out of a fused qkv
    heads, hh = qkv.transpose(2, 0, 3, 1, 4), qkvh.transpose(2, 0, 3, 1, 4)
    check(cublas.matmul(heads[0], heads[1].swapaxes(-1, -2)), hh[0] @ hh[1].swapaxes(-1, -2))
    out = cp.zeros((3, 4, 6, 5, 9), dtype=dt)
    cublas.matmul(q, k.swapaxes(-1, -2), out=out[1])
    check(out[1], qh @ kh.swapaxes(-1, -2))
    assert float(abs(out[0]).max()) == 0 and float(abs(out[2]).max()) == 0
    c, ch = dev((5, 3))
    check(cublas.matmul(a, b, out=c, alpha=0.5, beta=2.0), 0.5 * (ah @ bh) + 2.0 * ch)
    if dt.itemsize == 2:
        r = cublas.matmul(a, b, out_dtype=np.float32)
        assert r.dtype == np.float32
        check(r, ah @ bh)
    check(cublas.matmul(a[:, :0], b[:0]), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="cublas.matmul"):
        cublas.matmul(a, a)


def test_clip_grad_norm_multi_tensor_path_matches_the_formula() -> None:
    from nn import Parameter
    from nn.utils import clip_grad_norm_
    rng = np.random.default_rng(6)
    shapes = [(300, 70000), (5,), (17, 3), (1,)]  # one tensor spans several chunks
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    want = np.sqrt(sum((h.astype(np.float64) ** 2).sum() for h in host))
    for sync in (True, False):
        ps = [Parameter(np.zeros(s, np.float32), device="cuda") for s in shapes]
        for p, h in zip(ps, host):
            p.grad = backend.to_device(h, "cuda")
        norm = clip_grad_norm_(ps, 1.0, sync=sync)
        assert abs(float(backend.to_numpy(norm)) - want) <= 1e-4 * want
        for p, h in zip(ps, host):
            np.testing.assert_allclose(backend.to_numpy(p.grad), h * (1.0 / (want + 1e-6)), rtol=1e-4, atol=1e-9)
    # not finite: nothing is clipped (sync=False), the norm says so
    ps = [Parameter(np.zeros(3, np.float32), device="cuda"), Parameter(np.zeros(2, np.float32), device="cuda")]
    ps[0].grad = backend.to_device(np.array([1.0, np.inf, 2.0], np.float32), "cuda")
    ps[1].grad = backend.to_device(np.array([3.0, 4.0], np.float32), "cuda")
    norm = clip_grad_norm_(ps, 1.0, sync=False)
    assert not np.isfinite(float(backend.to_numpy(norm)))
    np.testing.assert_array_equal(backend.to_numpy(ps[1].grad), [3.0, 4.0])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_qkv_on_gpu_equals_the_reference(dropout: float) -> None:
    """The GPU path (cuBLAS batched GEMMs on the split heads, gradients written into one buffer)
    against the reference: on the CPU without dropout; with attention dropout against the reference
    on the GPU with the same Generator seed (the GPU draws its masks on the device, so they are
    not the CPU's)."""
    from nn.functional import causal_attention_qkv
    x = np.random.default_rng(7).standard_normal((2, 6, 3 * 8))
    res = []
    for device, reference in (("cpu", True), ("cuda", True), ("cuda", False)):
        if device == "cpu" and dropout:
            continue
        t = Tensor(x.astype(np.float32), device=device, requires_grad=True)
        with dispatch.reference_only() if reference else contextlib.nullcontext():
            y = causal_attention_qkv(t, n_head=2, dropout_p=dropout, generator=np.random.default_rng(1))
            (y * y).sum().backward()
        res.append((backend.to_numpy(y.data), backend.to_numpy(t.grad)))
    for a, b in zip(res[0], res[-1]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_dropout_masks_are_drawn_on_the_device_from_the_generator() -> None:
    """uniform() on the GPU: one draw from the NumPy Generator seeds device_uniform, whose numbers
    equal their NumPy formula; dropout keeps ~1 - p of the elements and scales them by 1 / (1 - p);
    the same Generator state gives the same mask."""
    from tensor.cuda.sampling import device_uniform, uniforms_f32
    u = backend.to_numpy(device_uniform(12345, (3, 1000)))
    np.testing.assert_array_equal(u.reshape(-1), uniforms_f32(12345, 3000))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02
    x = Tensor(np.ones((64, 1024), np.float32), device="cuda")
    y1 = backend.to_numpy(F.dropout(x, 0.25, generator=np.random.default_rng(3)).data)
    y2 = backend.to_numpy(F.dropout(x, 0.25, generator=np.random.default_rng(3)).data)
    np.testing.assert_array_equal(y1, y2)
    assert set(np.unique(y1)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((y1 > 0).mean() - 0.75) < 0.01   # 65,536 draws: 5 standard deviations ~ 0.008
    y3 = backend.to_numpy(F.dropout(x, 0.25, generator=np.random.default_rng(4)).data)
    assert (y3 != y1).any()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_linear_returns_float32_gradients_close_to_float64(precision: str) -> None:
    from nn.amp import low_dtype
    rng = np.random.default_rng(8)
    x, w, b = rng.standard_normal((4, 5, 16)), rng.standard_normal((12, 16)) * 0.3, rng.standard_normal(12)
    ts = [Tensor(v.astype(np.float32), device="cuda", requires_grad=True) for v in (x, w, b)]
    y = F.linear(*ts, compute_dtype=low_dtype(precision))
    assert str(y.dtype) == str(low_dtype(precision))
    (y.astype(np.float32) * 1.5).sum().backward()
    g = np.full((4, 5, 12), 1.5)
    want = {0: g @ w, 1: g.reshape(-1, 12).T @ x.reshape(-1, 16), 2: g.reshape(-1, 12).sum(0)}
    for i, t in enumerate(ts):
        assert t.grad.dtype == np.float32
        got = backend.to_numpy(t.grad)
        np.testing.assert_allclose(got, want[i], rtol=3e-2, atol=3e-2 * np.abs(want[i]).max())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (1000, 33), (16384, 384), (3, 7, 96)])
def test_column_sums_kernel_matches_float64_and_repeats_bit_for_bit(dtype: str, shape: tuple) -> None:
    """functional.sum_rows on the GPU (tensor/cuda/colsum.py: partial sums per row slice, the last
    block of each column tile adds them in order, counters reset for the next launch)."""
    from tensor.functional import sum_rows
    cp = backend.cupy_module()
    h = np.random.default_rng(9).standard_normal(shape).astype(_dtype(dtype))
    x = cp.asarray(h)
    want = h.astype(np.float64).reshape(-1, shape[-1]).sum(0)
    first = sum_rows(x, np.float32)
    for _ in range(3):  # the same bits every launch (and the counters were left at zero)
        np.testing.assert_array_equal(backend.to_numpy(sum_rows(x, np.float32)), backend.to_numpy(first))
    tol = 1e-5 * np.sqrt(h.size) + 1e-5
    np.testing.assert_allclose(backend.to_numpy(first), want, rtol=1e-5, atol=tol)
    same = sum_rows(x)
    assert same.dtype == x.dtype and same.shape == (shape[-1],)


def test_loss_scaler_unscales_and_detects_overflow_on_gpu() -> None:
    from nn import Parameter
    from nn.amp import LossScaler
    s = LossScaler(init_scale=8.0, growth_interval=2)
    ps = [Parameter(np.zeros((300, 700), np.float32), device="cuda"), Parameter(np.zeros(3, np.float32), device="cuda")]
    host = [np.full((300, 700), 4.0, np.float32), np.array([8.0, -16.0, 2.0], np.float32)]
    for p, h in zip(ps, host):
        p.grad = backend.to_device(h, "cuda")
    assert s.unscale_(ps)
    for p, h in zip(ps, host):
        np.testing.assert_array_equal(backend.to_numpy(p.grad), h / 8.0)
    s.update()
    ps[0].grad[123, 456] = np.inf  # an overflow deep inside a large gradient
    assert not s.unscale_(ps)
    s.update()
    assert s.scale_value == 4.0 and s.skipped_steps == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_step_equals_the_eager_step_on_new_batches(precision: str) -> None:
    """nn.cuda_graph.CapturedStep: each replay, with a different batch copied in, gives the
    loss and every gradient of an eager forward+backward on the same weights; the loss scale
    is read at replay time."""
    from nn.amp import autocast_
    from nn.cuda_graph import CapturedStep
    rng = np.random.default_rng(11)
    model = autocast_(tiny_gpt(3, "learned").to("cuda"), precision)
    step = CapturedStep(model, batch=4, seq=12)
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=1e-3)
    for i in range(3):
        ids = rng.integers(0, 31, (4, 13))
        x, y = ids[:, :-1], ids[:, 1:]
        scale = 1.0 if i < 2 else 8.0
        loss = step(x, y, loss_scale=scale)
        graph = [backend.to_numpy(p.grad) / scale for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        _, eager = model(x, y)
        eager.backward()
        np.testing.assert_allclose(float(backend.to_numpy(loss)), eager.item(), **tol)
        for g, p in zip(graph, model.parameters()):
            np.testing.assert_allclose(g, backend.to_numpy(p.grad), **tol)
            p.grad = None


def test_cuda_graph_refuses_dropout_and_cpu_models() -> None:
    from nn.cuda_graph import CapturedStep
    from tinygrad_lm.model import GPT, GPTConfig
    m = GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1)).to("cuda")
    with pytest.raises(ValueError, match="dropout"):
        CapturedStep(m, 2, 8)
    with pytest.raises(ValueError, match="GPU"):
        CapturedStep(tiny_gpt(), 2, 8)


def test_trainer_with_cuda_graph_matches_eager_losses(tmp_path) -> None:
    from tinygrad_lm.train import Trainer, make_config
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    losses = {}
    for graph in (False, True):
        cfg = make_config(None, None, data=str(corpus), n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4,
                          max_iters=5, sample_tokens=0, progress=False, out=str(tmp_path / f"run{graph}"),
                          device="cuda", cache_dir=str(tmp_path / "cache"), cuda_graph=graph)
        tr = Trainer(cfg, log=lambda s: None)
        losses[graph] = [float(backend.to_numpy(tr.train_step())) for _ in range(4)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


@pytest.mark.parametrize("Tk", [5, 33, 256, 1100])  # 1100: past a warp's 1024, the block-per-row kernels
def test_causal_softmax_kernels_against_numpy(Tk: int) -> None:
    from tensor.cuda import softmax as kernels
    cp = backend.cupy_module()
    rng = np.random.default_rng(12)
    Tq, scale = min(Tk, 7), 0.3
    s = rng.standard_normal((2, 3, Tq, Tk)).astype(np.float32) * 4
    p = backend.to_numpy(kernels.causal_softmax(cp.asarray(s), scale, np.float32))
    allowed = np.tri(Tq, Tk, k=Tk - Tq, dtype=bool)
    z = np.where(allowed, s.astype(np.float64) * scale, -np.inf)
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
    dp = rng.standard_normal(p.shape).astype(np.float32)
    ds = backend.to_numpy(kernels.softmax_backward(cp.asarray(p), cp.asarray(dp), scale))
    want_ds = scale * p * (dp - (dp * p).sum(-1, keepdims=True))
    np.testing.assert_allclose(ds, want_ds, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_and_merge_heads_are_the_transposes(dtype: str) -> None:
    from tensor.cuda import layout as kernels
    cp = backend.cupy_module()
    x = np.random.default_rng(13).standard_normal((3, 7, 3 * 4 * 5)).astype(_dtype(dtype))
    heads = backend.to_numpy(kernels.split_heads(cp.asarray(x), 4, 3))
    np.testing.assert_array_equal(heads, x.reshape(3, 7, 3, 4, 5).transpose(2, 0, 3, 1, 4))
    back = backend.to_numpy(kernels.merge_heads(cp.asarray(heads)))
    np.testing.assert_array_equal(back, x)


# ------------------------------------------------------------------ every CUDA fast path against its reference
def _cuda_fast_paths() -> list:
    from tensor.dispatch import FAST_PATHS
    return sorted(name for name, d in FAST_PATHS.items() if "cuda" in d)


_CUDA_DTYPES = ["float32", "float16", "bfloat16"]


@pytest.mark.parametrize("op", _cuda_fast_paths())
@pytest.mark.parametrize("dtype", _CUDA_DTYPES + ["float64"])
def test_cuda_fast_path_equals_the_reference(op: str, dtype: str) -> None:
    """The CUDA class registered in FAST_PATHS against the reference Function on the same CuPy
    inputs (tests/test_tensor_fastpaths.py draws the cases); float64 only where it applies (Linear:
    cuBLAS), the others leave float64 to the reference."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from test_tensor_fastpaths import compare
    if dtype == "float64" and op != "Linear":
        pytest.skip("float64 takes the reference path (tensor/cuda/common.py: FLOATS)")

    @settings(max_examples=10, deadline=None)
    @given(data=st.data())
    def check(data) -> None:
        compare(op, data, dtype, device="cuda")
    check()


def test_every_cuda_fast_path_is_checked_here() -> None:
    from tensor.dispatch import fast_class
    from test_tensor_fastpaths import CASES, reference_of, registered_class
    for name in _cuda_fast_paths():
        assert name in CASES
        assert fast_class(reference_of(name), "cuda") is registered_class(name, "cuda")


@pytest.mark.parametrize("dtype", _CUDA_DTYPES)
def test_cuda_sum_rows_equals_the_reference(dtype: str) -> None:
    from tensor.dispatch import reference_only
    cp = backend.cupy_module()
    for shape in [(1, 3), (129, 40), (4096, 33)]:
        x = cp.asarray(np.random.default_rng(1).standard_normal(shape).astype(_dtype(dtype)))
        for out in (None, np.float32):
            fast = F.sum_rows(x, out)
            with reference_only():
                ref = F.sum_rows(x, out)
            assert fast.dtype == ref.dtype
            np.testing.assert_allclose(backend.to_numpy(fast).astype(np.float64), backend.to_numpy(ref).astype(np.float64),
                                       rtol=2e-2, atol=2e-2 * np.sqrt(shape[0]))
