"""RoPE (nn/rotary.py) and RMSNorm (nn/layers.py), and the GPT options that use them.

RoPE is checked against its closed form (a rotation of each channel pair (i, i + D/2) by
m * 10000^(-2i/D)) and its defining property (q_m . k_n depends on the positions only through
n - m); RMSNorm against its formula; both gradchecked in float64. KV-cached decoding is checked
against the full forward for every position encoding, and a tiny rope + rmsnorm GPT trains and samples.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nn import RMSNorm, RotaryEmbedding
from nn.layers import rms_norm
from nn.rotary import apply_rotary, rotary_tables
from tensor import Tensor, gradcheck, no_grad
from tinygrad_lm.model import GPT, GPTConfig

FEW = settings(max_examples=max(5, settings.default.max_examples // 5), deadline=None)


def _t(a):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def rope_formula(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """x (..., T, D) with positions (T,): pair (i, i + D/2) at position m rotated by m * 10000^(-2i/D)."""
    D = x.shape[-1]
    out = np.empty_like(x, dtype=np.float64)
    for t, m in enumerate(positions):
        for i in range(D // 2):
            a = m * 10000.0 ** (-2 * i / D)
            x1, x2 = x[..., t, i], x[..., t, i + D // 2]
            out[..., t, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., t, i + D // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


# ------------------------------------------------------------------ RoPE
@FEW
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.sampled_from([2, 4, 8]), st.integers(0, 2**32 - 1))
def test_rope_matches_the_rotation_formula_and_keeps_norms(B, H, T, D, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((B, H, T, D)), rng.standard_normal((B, H, T, D))
    pos = rng.permutation(16)[:T]
    rope = RotaryEmbedding(D, 16)
    rope.cos.data, rope.sin.data = (a.astype(np.float64) for a in rotary_tables(16, D))  # (float32 by default)
    with no_grad():
        qr, kr = rope(Tensor(q), Tensor(k), pos)
    np.testing.assert_allclose(qr.numpy(), rope_formula(q, pos), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(kr.numpy(), rope_formula(k, pos), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(qr.numpy(), axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-6)


@FEW
@given(st.sampled_from([2, 4, 8, 16]), st.integers(0, 40), st.integers(0, 40), st.integers(0, 20),
       st.integers(0, 2**32 - 1))
def test_rope_scores_depend_only_on_the_relative_position(D, m, n, shift, seed):
    """q_m . k_n = q_(m+s) . k_(n+s): the same vectors at shifted positions give the same score,
    and that score is q . R((n - m) theta) k."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, 1, 1, D)), rng.standard_normal((1, 1, 1, D))
    cos, sin = (a.astype(np.float64) for a in rotary_tables(64, D))  # (rounded to float32 once: rtol 1e-6)

    def score(a, b):
        qa = apply_rotary(Tensor(q), cos[[a]], sin[[a]]).numpy()
        kb = apply_rotary(Tensor(k), cos[[b]], sin[[b]]).numpy()
        return float((qa * kb).sum())

    with no_grad():
        s0, s1 = score(m, n), score(m + shift, n + shift)
    assert s0 == pytest.approx(s1, rel=1e-6, abs=1e-6)
    assert s0 == pytest.approx(float((q * rope_formula(k, np.array([n - m]))).sum()), rel=1e-6, abs=1e-6)


@FEW
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.sampled_from([2, 4, 6]), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_rotary_gradcheck(B, H, T, D, per_row, seed):
    rng = np.random.default_rng(seed)
    cos, sin = (a.astype(np.float64) for a in rotary_tables(12, D))
    pos = rng.integers(0, 12, (B, T)) if per_row else rng.integers(0, 12, T)
    x = _t(rng.standard_normal((B, H, T, D)))
    assert gradcheck(lambda x: apply_rotary(x, cos[pos], sin[pos]), [x])


def test_rope_per_row_positions_equal_each_row_alone():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 4, 8))
    pos = np.array([[0, 1, 2, 3], [5, 6, 7, 8]])
    rope = RotaryEmbedding(8, 16)
    with no_grad():
        both = rope(Tensor(q), Tensor(q), pos)[0].numpy()
        for b in range(2):
            alone = rope(Tensor(q[b:b + 1]), Tensor(q[b:b + 1]), pos[b])[0].numpy()
            np.testing.assert_allclose(both[b:b + 1], alone, rtol=1e-6, atol=1e-7)


def test_rope_errors():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(5, 8)
    rope = RotaryEmbedding(4, 8)
    x = Tensor(np.zeros((1, 1, 2, 4)))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        rope(x, x, np.array([7, 8]))


# ------------------------------------------------------------------ RMSNorm
@FEW
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(0, 2**32 - 1))
def test_rmsnorm_gradcheck(B, T, C, seed):
    rng = np.random.default_rng(seed)
    x, w = _t(rng.standard_normal((B, T, C))), _t(1 + 0.5 * rng.standard_normal(C))
    assert gradcheck(lambda x, w: rms_norm(x, w), [x, w])


@FEW
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_rmsnorm_value_is_the_formula(B, T, C, seed):
    rng = np.random.default_rng(seed)
    x, w = 3 * rng.standard_normal((B, T, C)), rng.standard_normal(C)
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(rms_norm(Tensor(x), Tensor(w)).numpy(), want, rtol=1e-12, atol=1e-12)
    m = RMSNorm(C)
    y = m(Tensor(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(np.sqrt((y.astype(np.float64) ** 2).mean(-1)), 1.0, rtol=1e-3)  # unit RMS, w = 1
    assert [n for n, _ in m.named_parameters()] == ["weight"]


def test_rmsnorm_half_input_uses_float32_statistics():
    x = np.full((2, 64), 300.0, dtype=np.float16)  # x^2 = 9e4 overflows float16
    y = rms_norm(Tensor(x), Tensor(np.ones(64, np.float32)))
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.numpy().astype(np.float32), 1.0, rtol=1e-3)
    with pytest.raises(ValueError, match="rms_norm: weight"):
        rms_norm(Tensor(np.ones((2, 3))), Tensor(np.ones(4)))


# ------------------------------------------------------------------ the GPT options
def tiny(**kw) -> GPTConfig:
    d = dict(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=16)
    d.update(kw)
    return GPTConfig(**d)


def _noisy(model: GPT, seed: int = 0) -> GPT:
    """Weights away from init, so that every path (positions included) changes the logits."""
    rng = np.random.default_rng(seed)
    model.load_state_dict({k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
                           for k, v in model.state_dict().items()})
    return model


@pytest.mark.parametrize("pos_encoding,norm", [("sinusoidal", "layernorm"), ("learned", "layernorm"),
                                               ("rope", "layernorm"), ("rope", "rmsnorm")])
def test_kv_cached_decoding_equals_the_full_forward(pos_encoding, norm):
    model = _noisy(GPT(tiny(pos_encoding=pos_encoding, norm=norm), seed=1))
    idx = np.random.default_rng(2).integers(0, 13, (2, 10))
    with no_grad():
        full = model(idx)[0].numpy()
        caches = model.new_caches(2)
        parts = [model(idx[:, a:b], caches=caches)[0].numpy() for a, b in ((0, 4), (4, 5), (5, 6), (6, 10))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned", "rope"])
def test_padded_batch_with_per_row_positions_equals_each_prompt_alone(pos_encoding):
    """Left padding + key mask + per-row positions, cached: each row's logits are its own."""
    model = _noisy(GPT(tiny(pos_encoding=pos_encoding), seed=3))
    rng = np.random.default_rng(4)
    short, long_ = rng.integers(0, 13, 3), rng.integers(0, 13, 6)
    idx = np.stack([np.concatenate([np.zeros(3, np.int64), short]), long_])
    real = np.array([[False] * 3 + [True] * 3, [True] * 6])
    pos = np.array([[0, 0, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    nxt = np.array([[5], [7]])
    with no_grad():
        caches = model.new_caches(2)
        a = model(idx, mask=real, positions=pos, caches=caches)[0].numpy()
        b = model(nxt, mask=np.concatenate([real, [[True], [True]]], 1), positions=np.array([[3], [6]]),
                  caches=caches)[0].numpy()
        alone0 = model(np.concatenate([short, [5]])[None])[0].numpy()
        alone1 = model(np.concatenate([long_, [7]])[None])[0].numpy()
    np.testing.assert_allclose(a[0, 3:], alone0[0, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b[0, 0], alone0[0, 3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[1], alone1[0, :6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b[1, 0], alone1[0, 6], rtol=1e-5, atol=1e-5)


def test_rope_positions_matter_and_no_position_parameters():
    """Without positions, causal attention at the last token is blind to the order of the tokens
    before it (a weighted sum over a set); with rope, swapping two earlier tokens changes it."""
    model = _noisy(GPT(tiny(pos_encoding="rope", n_layer=1), seed=0))
    with no_grad():
        a = model(np.array([[1, 2, 3, 4, 5]]))[0].numpy()
        b = model(np.array([[2, 1, 3, 4, 5]]))[0].numpy()
    assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-3
    assert not any("wpe" in n for n, _ in model.named_parameters())


def test_tiny_rope_rmsnorm_gpt_trains_and_samples():
    from nn.optim import AdamW
    from tinygrad_lm.sample import generate
    model = GPT(tiny(pos_encoding="rope", norm="rmsnorm", n_embd=32, n_head=4), seed=0)
    text = np.array([1, 2, 3, 4, 5, 6, 7, 8] * 8)
    x = np.stack([text[i:i + 12] for i in range(0, 40, 4)])
    y = np.stack([text[i + 1:i + 13] for i in range(0, 40, 4)])
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(15):
        _, loss = model(x, y)
        model.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    cached = generate(model, np.array([[1, 2, 3]]), 8, temperature=0)
    uncached = generate(model, np.array([[1, 2, 3]]), 8, temperature=0, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert cached.shape == (1, 11)
