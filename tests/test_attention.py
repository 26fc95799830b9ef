"""Attention: the reference pieces (tensor/attention.py: split_heads, scaled_dot_product_attention,
merge_heads, and their composition CausalAttentionQKV), the CPU fast paths beneath them
(tensor/cpu/attention.py), the KV cache and the CausalSelfAttention layer.

Values are checked against a naive NumPy attention written here (loops over query rows,
-inf masking, explicit softmax); the references' gradients against central differences
(tensor.gradcheck, float64); every CPU fast path against its reference, forward and backward;
and the memory the ops keep for backward against the module docstrings.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nn import CausalSelfAttention
from nn.attention import KVCache, causal_attention_qkv, merge_heads, scaled_dot_product_attention, split_heads
from tensor import Tensor, gradcheck, no_grad
from tensor.attention import CausalAttentionQKV, MergeHeads, ScaledDotProductAttention, SplitHeads
from tensor.cpu import attention as cpu_attention
from tensor.dispatch import FAST_PATHS, fast_class, reference_only

N = settings.default.max_examples
FEW = settings(max_examples=max(5, N // 5))  # gradchecks of whole layers (many parameters)


# ------------------------------------------------------------------ the reference
def naive_attention(q, k, v, causal=False, mask=None):
    """softmax(q k^T / sqrt(D)) v one query row at a time; masked keys get -inf; a row with
    every key masked gives zeros. q (B, H, Tq, D), k, v (B, H, Tk, D); mask (B, Tk) or
    broadcastable to (B, H, Tq, Tk), True = attend."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    allowed = np.ones((B, H, Tq, Tk), dtype=bool)
    if causal:
        for i in range(Tq):
            for j in range(Tk):
                if j > i + (Tk - Tq):  # query i sits at absolute position i + Tk - Tq
                    allowed[:, :, i, j] = False
    if mask is not None:
        m = np.asarray(mask)
        allowed &= np.broadcast_to(m[:, None, None, :] if m.ndim == 2 else m, allowed.shape)
    out = np.zeros((B, H, Tq, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                s = np.array([np.dot(q[b, h, i], k[b, h, j]) / math.sqrt(D) for j in range(Tk)])
                s = np.where(allowed[b, h, i], s, -np.inf)
                if not allowed[b, h, i].any():
                    continue
                w = np.exp(s - s.max())
                w /= w.sum()
                out[b, h, i] = w @ v[b, h]
    return out


def _t(a):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


@st.composite
def attn_case(draw, allow_tq_lt_tk=True):
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    Tk = draw(st.integers(1, 6))
    Tq = draw(st.integers(1, Tk)) if allow_tq_lt_tk else Tk
    D = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, T, D)) for T in (Tq, Tk, Tk))
    mask_kind = draw(st.sampled_from(["none", "padding", "full"]))
    if mask_kind == "padding":
        mask = rng.random((B, Tk)) < 0.7
    elif mask_kind == "full":  # broadcastable (B, 1, Tq, Tk)
        mask = rng.random((B, 1, Tq, Tk)) < 0.7
    else:
        mask = None
    causal = draw(st.booleans())
    return q, k, v, causal, mask


# ------------------------------------------------------------------ values
@given(attn_case())
def test_sdpa_matches_naive(case):
    q, k, v, causal, mask = case
    out = scaled_dot_product_attention(_t(q), _t(k), _t(v), causal=causal, mask=mask)
    np.testing.assert_allclose(out.numpy(), naive_attention(q, k, v, causal, mask), rtol=1e-10, atol=1e-12)
    assert not np.isnan(out.numpy()).any()


@given(attn_case(allow_tq_lt_tk=False))
def test_qkv_matches_naive(case):
    q, k, v, _, _ = case
    B, H, T, D = q.shape
    rng = np.random.default_rng(T * 31 + B)
    mask = rng.random((B, T)) < 0.7 if T > 1 else None
    # qkv (B, T, 3C) with channel layout [q heads | k heads | v heads], head h at h*D:(h+1)*D
    qkv = np.concatenate([a.transpose(0, 2, 1, 3).reshape(B, T, H * D) for a in (q, k, v)], axis=-1)
    out = causal_attention_qkv(_t(qkv), H, mask=mask)
    ref = naive_attention(q, k, v, causal=True, mask=mask).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_fully_masked_rows_give_zeros_and_zero_grads():
    rng = np.random.default_rng(0)
    q, k, v = (_t(rng.standard_normal((2, 2, 3, 4))) for _ in range(3))
    mask = np.array([[False, False, False], [True, False, True]])
    out = scaled_dot_product_attention(q, k, v, causal=False, mask=mask)
    assert np.all(out.numpy()[0] == 0.0) and not np.isnan(out.numpy()).any()
    out.sum().backward()
    for t in (q, k, v):
        assert np.isfinite(t.grad).all()
    assert np.all(q.grad[0] == 0.0) and np.all(k.grad[0] == 0.0) and np.all(v.grad[0] == 0.0)
    # causal + padding that hides the first key: query 0 sees nothing
    out = scaled_dot_product_attention(q, k, v, causal=True, mask=np.array([[False, True, True]] * 2))
    assert np.all(out.numpy()[:, :, 0] == 0.0) and not np.isnan(out.numpy()).any()
    # the fused-qkv op too
    x = _t(rng.standard_normal((1, 3, 12)))
    y = causal_attention_qkv(x, 2, mask=np.array([[False, True, True]]))
    assert np.all(y.numpy()[0, 0] == 0.0) and not np.isnan(y.numpy()).any()


@given(st.integers(2, 6), st.integers(0, 2**32 - 1))
def test_causal_future_token_does_not_change_past(T, seed):
    rng = np.random.default_rng(seed)
    m = CausalSelfAttention(8, 2, rng=rng)
    x = rng.standard_normal((2, T, 8)).astype(np.float32)
    t = int(rng.integers(0, T))
    x2 = x.copy()
    x2[:, t:] = rng.standard_normal(x2[:, t:].shape)
    with no_grad():
        y, y2 = m(Tensor(x)).numpy(), m(Tensor(x2)).numpy()
    np.testing.assert_array_equal(y[:, :t], y2[:, :t])
    if t < T:
        assert not np.allclose(y[:, t:], y2[:, t:])


def test_padding_mask_hides_keys():
    """Changing a padded (masked-out) key position changes nothing at the real positions."""
    rng = np.random.default_rng(1)
    m = CausalSelfAttention(8, 2, rng=rng)
    x = rng.standard_normal((1, 5, 8)).astype(np.float32)
    mask = np.array([[False, False, True, True, True]])  # left padding
    x2 = x.copy()
    x2[:, :2] = 100.0
    with no_grad():
        y, y2 = m(Tensor(x), mask=mask).numpy(), m(Tensor(x2), mask=mask).numpy()
    np.testing.assert_allclose(y[:, 2:], y2[:, 2:], rtol=1e-6, atol=1e-6)


def test_attention_dropout_values():
    """With v = identity (D = Tk) the output IS the dropped attention matrix: every entry is
    0 or P/(1-p), about a fraction p are zeroed, and the same generator seed repeats the mask."""
    p, B, H, T = 0.4, 4, 4, 16
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((B, H, T, T)), rng.standard_normal((B, H, T, T))
    v = np.broadcast_to(np.eye(T), (B, H, T, T)).copy()
    P = naive_attention(q, k, v, causal=False)
    out = scaled_dot_product_attention(_t(q), _t(k), _t(v), causal=False, dropout_p=p,
                                       generator=np.random.default_rng(7)).numpy()
    kept = out != 0
    np.testing.assert_allclose(out[kept], P[kept] / (1 - p), rtol=1e-10)
    frac = 1 - kept.mean()
    n = out.size
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    again = scaled_dot_product_attention(_t(q), _t(k), _t(v), causal=False, dropout_p=p,
                                         generator=np.random.default_rng(7)).numpy()
    np.testing.assert_array_equal(out, again)


def test_errors():
    x = _t(np.zeros((1, 1, 3, 4)))
    with pytest.raises(ValueError, match="causal needs Tq <= Tk"):
        scaled_dot_product_attention(x, _t(np.zeros((1, 1, 2, 4))), _t(np.zeros((1, 1, 2, 4))))
    with pytest.raises(ValueError, match="expected q"):
        scaled_dot_product_attention(x, x, _t(np.zeros((1, 1, 3, 5))))
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(x, x, x, dropout_p=1.0)
    with pytest.raises(TypeError, match="boolean"):
        scaled_dot_product_attention(x, x, x, mask=np.ones((1, 3)))
    with pytest.raises(ValueError, match="split into 3 x 2 heads"):
        causal_attention_qkv(_t(np.zeros((1, 3, 9))), 2)
    with pytest.raises(ValueError, match="not divisible"):
        CausalSelfAttention(6, 4)


# ------------------------------------------------------------------ gradients
@given(attn_case(), st.sampled_from([0.0, 0.3]))
def test_sdpa_gradcheck(case, p):
    q, k, v, causal, mask = case
    seed = int(q.size + 10 * k.shape[2])

    def f(q, k, v):  # a fresh generator per call: the same dropout mask every evaluation
        return scaled_dot_product_attention(q, k, v, causal=causal, mask=mask, dropout_p=p,
                                            generator=np.random.default_rng(seed))

    assert gradcheck(f, [_t(q), _t(k), _t(v)])


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from(["none", "padding"]), st.sampled_from([0.0, 0.3]), st.integers(0, 2**32 - 1))
def test_qkv_gradcheck(B, T, H, D, mask_kind, p, seed):
    rng = np.random.default_rng(seed)
    qkv = _t(rng.standard_normal((B, T, 3 * H * D)))
    mask = rng.random((B, T)) < 0.7 if mask_kind == "padding" else None
    assert gradcheck(lambda x: causal_attention_qkv(x, H, mask=mask, dropout_p=p,
                                                    generator=np.random.default_rng(seed)), [qkv])


def _f64(m):
    for prm in m.parameters():
        prm.data = prm.data.astype(np.float64)
    return m


@FEW
@given(st.integers(1, 3), st.integers(1, 6), st.sampled_from([(2, 1), (2, 2), (4, 2), (6, 3), (8, 4), (12, 3)]),
       st.booleans(), st.sampled_from(["none", "padding"]), st.sampled_from([0.0, 0.25]), st.integers(0, 2**32 - 1))
def test_causal_self_attention_gradcheck(B, T, CH, bias, mask_kind, p, seed):
    C, H = CH
    rng = np.random.default_rng(seed)
    m = _f64(CausalSelfAttention(C, H, dropout=p, bias=bias, rng=rng))
    x = _t(rng.standard_normal((B, T, C)))
    mask = rng.random((B, T)) < 0.7 if mask_kind == "padding" else None

    def f(x, *params):
        m.generator = np.random.default_rng(seed)                 # attention dropout
        m.resid_dropout.generator = np.random.default_rng(seed + 1)  # residual dropout
        return m(x, mask=mask)

    assert gradcheck(f, [x, *m.parameters()])


def test_causal_self_attention_dropout_is_reproducible_and_eval_is_deterministic():
    rng = np.random.default_rng(0)
    m = CausalSelfAttention(8, 2, dropout=0.5, rng=rng)
    x = Tensor(rng.standard_normal((2, 5, 8)).astype(np.float32))
    outs = []
    for _ in range(2):
        m.generator, m.resid_dropout.generator = np.random.default_rng(1), np.random.default_rng(2)
        outs.append(m(x).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    m.eval()
    m.generator = m.resid_dropout.generator = None
    np.testing.assert_array_equal(m(x).numpy(), m(x).numpy())
    assert not np.allclose(m(x).numpy(), outs[0])


# ------------------------------------------------------------------ memory kept for backward
def _saved_bytes(out, inputs):
    """Bytes of the arrays the op keeps for backward that are not views of its inputs or its output."""
    total = 0
    for a in out._ctx.saved:
        if a is None or not hasattr(a, "nbytes"):
            continue
        if any(np.shares_memory(a, t.data) for t in (*inputs, out)):
            continue
        total += a.nbytes
    return total


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_memory_matches_docstring(dtype, p):
    """tensor/cpu/attention.py: P (B*H*Tq*Tk elements of the input dtype) + a bool keep-mask with dropout;
    O is kept too, as a view of the op's own output (no copy: checked here)."""
    B, H, Tq, Tk, D = 2, 3, 5, 7, 4
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.standard_normal((B, H, T, D)).astype(dtype), requires_grad=True) for T in (Tq, Tk, Tk))
    out = scaled_dot_product_attention(q, k, v, causal=True, dropout_p=p, generator=rng)
    n = B * H * Tq * Tk
    assert _saved_bytes(out, (q, k, v)) == n * np.dtype(dtype).itemsize + (n if p else 0)
    qkv = Tensor(rng.standard_normal((B, Tk, 3 * H * D)).astype(dtype), requires_grad=True)
    y = causal_attention_qkv(qkv, H, dropout_p=p, generator=rng)
    n = B * H * Tk * Tk
    assert _saved_bytes(y, (qkv,)) == n * np.dtype(dtype).itemsize + (n if p else 0)
    assert any(a is not None and hasattr(a, "shape") and np.shares_memory(a, y.data) for a in y._ctx.saved)


# ------------------------------------------------------------------ the CPU path in chunks of the batch
@pytest.mark.parametrize("mask_kind,p", [("none", 0.0), ("padding", 0.0), ("none", 0.2)])
def test_chunked_batch_equals_one_chunk(monkeypatch, mask_kind, p):
    """The CPU path works through the batch in ~1 MB chunks of scores (tensor/cpu/attention.py,
    _over_batch): one batch item per chunk gives exactly the values and gradients of one chunk
    for everything (each head is computed the same way), and both match the naive reference."""
    import tensor.cpu.attention as attention
    B, T, H, D = 5, 16, 2, 8
    rng = np.random.default_rng(0)
    qkv0 = rng.standard_normal((B, T, 3 * H * D)).astype(np.float32)
    g = rng.standard_normal((B, T, H * D)).astype(np.float32)
    mask = rng.random((B, T)) > 0.3 if mask_kind == "padding" else None
    results = []
    for chunk_bytes in (1 << 30, 1):
        monkeypatch.setattr(attention, "SCORE_CHUNK_BYTES", chunk_bytes)
        qkv = Tensor(qkv0, requires_grad=True)
        y = causal_attention_qkv(qkv, H, mask=mask, dropout_p=p, generator=np.random.default_rng(7))
        y.backward(Tensor(g))
        results.append((y.numpy(), qkv.grad.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    if p == 0.0:
        q, k, v = (qkv0.reshape(B, T, 3, H, D)[:, :, i].transpose(0, 2, 1, 3).astype(np.float64) for i in range(3))
        ref = naive_attention(q, k, v, causal=True, mask=mask)
        np.testing.assert_allclose(results[1][0], ref.transpose(0, 2, 1, 3).reshape(B, T, H * D), atol=1e-5)


# ------------------------------------------------------------------ the reference pieces, float64
@given(attn_case(), st.sampled_from([0.0, 0.3]))
def test_reference_sdpa_gradcheck(case, p):
    q, k, v, causal, mask = case
    seed = int(q.size + 10 * k.shape[2])
    with reference_only():
        assert gradcheck(lambda q, k, v: scaled_dot_product_attention(
            q, k, v, causal=causal, mask=mask, dropout_p=p, generator=np.random.default_rng(seed)),
            [_t(q), _t(k), _t(v)])


@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2**32 - 1))
def test_reference_split_and_merge_are_inverse_permutations_and_gradcheck(B, T, H, D, parts, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, parts * H * D))
    with reference_only():
        heads = split_heads(_t(x), H, parts)
        for j, h in enumerate(heads):  # channel j*C + h*D + d of token t is element (h, t, d) of part j
            want = x[:, :, j * H * D:(j + 1) * H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3)
            np.testing.assert_array_equal(h.numpy(), want)
            np.testing.assert_array_equal(merge_heads(h).numpy(), x[:, :, j * H * D:(j + 1) * H * D])
        w = [rng.standard_normal((B, H, T, D)) for _ in range(parts)]
        assert gradcheck(lambda x: sum((h * wj).sum() for h, wj in zip(split_heads(x, H, parts), w)), [_t(x)])
        assert gradcheck(lambda y: merge_heads(y), [_t(rng.standard_normal((B, H, T, D)))])


@settings(max_examples=max(5, N // 3), deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.sampled_from(["none", "padding"]),
       st.sampled_from([0.0, 0.3]), st.integers(0, 2**32 - 1))
def test_reference_fused_qkv_equals_the_pieces_and_gradchecks(B, T, H, D, mask_kind, p, seed):
    """CausalAttentionQKV (one node) is merge_heads(sdpa(*split_heads(qkv))): same values and gradients."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, 3 * H * D))
    mask = rng.random((B, T)) < 0.7 if mask_kind == "padding" else None
    g = rng.standard_normal((B, T, H * D))

    def pieces(x):
        q, k, v = split_heads(x, H)
        return merge_heads(scaled_dot_product_attention(q, k, v, causal=True, mask=mask, dropout_p=p,
                                                        generator=np.random.default_rng(seed)))

    def fused(x):
        return CausalAttentionQKV.apply(x, n_head=H, mask=mask, dropout_p=p, generator=np.random.default_rng(seed))

    with reference_only():
        res = []
        for f in (pieces, fused):
            t = _t(x)
            y = f(t)
            y.backward(Tensor(g))
            res.append((y.numpy(), t.grad))
        np.testing.assert_allclose(res[1][0], res[0][0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(res[1][1], res[0][1], rtol=1e-12, atol=1e-12)
        assert gradcheck(fused, [_t(x)])


# ------------------------------------------------------------------ CPU fast paths = the reference
def _run(cls, arrays, g, **kw):
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    y = cls.apply(*ts, **kw)
    y.backward(Tensor(g))
    return [y.numpy()] + [t.grad for t in ts]


TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-6),
       np.float16: dict(rtol=1e-2, atol=2e-3)}


@settings(max_examples=max(10, N // 2), deadline=None)
@given(attn_case(), st.sampled_from([0.0, 0.25]), st.sampled_from([np.float64, np.float32, np.float16]),
       st.sampled_from([1 << 20, 1, 200, 1000]))
def test_cpu_sdpa_equals_reference(case, p, dtype, chunk_bytes):
    """Hypothesis-drawn (B, H, Tq, Tk, D), causal or not, padding and full masks, Tq < Tk (the
    KV-cache case), dropout with the same generator, and score chunks from one batch item to all."""
    q, k, v, causal, mask = case
    cls = fast_class(ScaledDotProductAttention, "cpu")
    assert cls is cpu_attention.CpuScaledDotProductAttention
    g = np.random.default_rng(1).standard_normal(q.shape)
    arrays = [a.astype(dtype) for a in (q, k, v)]
    kw = dict(mask=mask, causal=causal, dropout_p=p)
    old = cpu_attention.SCORE_CHUNK_BYTES
    cpu_attention.SCORE_CHUNK_BYTES = chunk_bytes
    try:
        fast = _run(cls, arrays, g.astype(dtype), generator=np.random.default_rng(5), **kw)
    finally:
        cpu_attention.SCORE_CHUNK_BYTES = old
    ref = _run(ScaledDotProductAttention, arrays, g.astype(dtype), generator=np.random.default_rng(5), **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
        assert a.dtype == b.dtype == dtype, name
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), err_msg=name, **TOL[dtype])


@settings(max_examples=max(10, N // 2), deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 3), st.integers(1, 4), st.sampled_from(["none", "padding"]),
       st.sampled_from([0.0, 0.25]), st.sampled_from([np.float64, np.float32, np.float16]),
       st.sampled_from([1 << 20, 1, 300]), st.integers(0, 2**32 - 1))
def test_cpu_fused_qkv_equals_reference(B, T, H, D, mask_kind, p, dtype, chunk_bytes, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, 3 * H * D)).astype(dtype)
    g = rng.standard_normal((B, T, H * D)).astype(dtype)
    mask = rng.random((B, T)) < 0.7 if mask_kind == "padding" else None
    cls = fast_class(CausalAttentionQKV, "cpu")
    assert cls is cpu_attention.CpuCausalAttentionQKV
    kw = dict(n_head=H, mask=mask, dropout_p=p)
    old = cpu_attention.SCORE_CHUNK_BYTES
    cpu_attention.SCORE_CHUNK_BYTES = chunk_bytes
    try:
        fast = _run(cls, [x], g, generator=np.random.default_rng(seed), **kw)
    finally:
        cpu_attention.SCORE_CHUNK_BYTES = old
    ref = _run(CausalAttentionQKV, [x], g, generator=np.random.default_rng(seed), **kw)
    for name, a, b in zip(("out", "dqkv"), fast, ref):
        assert a.dtype == b.dtype == dtype, name
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), err_msg=name, **TOL[dtype])


def test_every_attention_fast_path_subclasses_its_reference():
    refs = {c.__name__: c for c in (ScaledDotProductAttention, CausalAttentionQKV, SplitHeads, MergeHeads)}
    for name, ref in refs.items():
        assert name in FAST_PATHS
        for device, spec in FAST_PATHS[name].items():
            if device == "cpu":  # (CUDA ones import CuPy modules: tests/test_gpu_attention.py)
                cls = fast_class(ref, device)
                assert issubclass(cls, ref) and cls is not ref and callable(cls.supports)
            else:
                assert spec.startswith("tensor.cuda.attention:")


def test_cpu_merge_heads_of_the_fast_sdpa_output_is_a_view():
    """The CPU sdpa writes O in the merged layout (B, T, H, D): merge_heads then copies nothing."""
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.standard_normal((2, 3, 4, 5)).astype(np.float32)) for _ in range(3))
    o = scaled_dot_product_attention(q, k, v)
    y = merge_heads(o)
    assert np.shares_memory(y.data, o.data) and y.data.flags.c_contiguous


# ------------------------------------------------------------------ KV cache
def test_kv_cache_append_returns_every_key_and_refuses_grad_mode_and_overflow():
    rng = np.random.default_rng(0)
    cache = KVCache(2, 3, 5, 4, np.zeros(1, np.float32))
    ks = [rng.standard_normal((2, 3, t, 4)).astype(np.float32) for t in (2, 3)]
    with pytest.raises(RuntimeError, match="no_grad"):
        cache.append(Tensor(ks[0]), Tensor(ks[0]))
    with no_grad():
        k, v = cache.append(Tensor(ks[0]), Tensor(ks[0] + 1))
        assert k.shape == (2, 3, 2, 4)
        k, v = cache.append(Tensor(ks[1]), Tensor(ks[1] + 1))
        np.testing.assert_array_equal(k.numpy(), np.concatenate(ks, axis=2))
        np.testing.assert_array_equal(v.numpy(), np.concatenate(ks, axis=2) + 1)
        with pytest.raises(ValueError, match="exceed the cache size 5"):
            cache.append(Tensor(ks[0][:, :, :1]), Tensor(ks[0][:, :, :1]))


@pytest.mark.parametrize("masked", [False, True])
def test_cached_layer_equals_the_full_layer(masked):
    """Tokens fed in pieces through a KV cache (split, sdpa over the cached keys, merge) give the
    full causal layer's outputs, with and without a key-padding mask."""
    rng = np.random.default_rng(2)
    m = CausalSelfAttention(12, 3, rng=rng)
    x = rng.standard_normal((2, 7, 12)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    if masked:
        mask[0, :2] = False
    with no_grad():
        full = m(Tensor(x), mask=mask if masked else None).numpy()
        cache = KVCache(2, 3, 7, 4, x)
        parts = [m(Tensor(x[:, a:b]), mask=mask if masked else None, cache=cache).numpy()
                 for a, b in ((0, 3), (3, 4), (4, 7))]
    got = np.concatenate(parts, axis=1)
    rows = (slice(None), slice(2, None)) if masked else (slice(None),)  # (fully masked rows are 0 either way)
    np.testing.assert_allclose(got[rows], full[rows], rtol=1e-5, atol=1e-6)
