"""Attention: the fused `scaled_dot_product_attention` and `causal_attention_qkv` ops, and
the CausalSelfAttention layer.

Values are checked against a naive NumPy attention written here (loops over query rows,
-inf masking, explicit softmax); gradients against central differences (tensor.gradcheck,
float64); and the memory the fused op keeps for backward against the module docstring.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nn import CausalSelfAttention
from nn.attention import causal_attention_qkv, scaled_dot_product_attention
from tensor import Tensor, gradcheck, no_grad

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
    """nn/attention.py: P (B*H*Tq*Tk elements of the input dtype) + a bool keep-mask with dropout;
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
