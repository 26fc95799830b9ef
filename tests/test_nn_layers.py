"""Layers: gradients by central differences (tensor.gradcheck, float64, hypothesis sizes)
and values by closed forms written here (x @ W.T + b, LayerNorm moments, dropout rate and
scale, GELU's tanh formula, the sinusoidal table of Vaswani et al., the GPT init rule)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nn import (GELU, MLP, Block, Dropout, Embedding, LayerNorm, Linear, Module, ModuleList,
                SinusoidalPositionalEncoding, init)
from tensor import Tensor, gradcheck, no_grad

N = settings.default.max_examples
FEW = settings(max_examples=max(5, N // 5))  # whole-block gradchecks (hundreds of parameters)

seeds = st.integers(0, 2**32 - 1)
batch = st.integers(1, 3)
time_ = st.integers(1, 6)
chan = st.integers(2, 12)
# (C, n_head) with n_head dividing C
c_heads = st.integers(2, 12).flatmap(lambda c: st.tuples(st.just(c), st.sampled_from([h for h in range(1, c + 1)
                                                                                      if c % h == 0])))


def _t(a):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def _f64(m):
    for p in m.parameters():
        p.data = p.data.astype(np.float64)
    return m


# ------------------------------------------------------------------ Linear
@given(batch, time_, chan, chan, st.booleans(), st.booleans(), seeds)
def test_linear_gradcheck_and_value(B, T, cin, cout, bias, three_d, seed):
    rng = np.random.default_rng(seed)
    m = _f64(Linear(cin, cout, bias=bias, rng=rng))
    x = _t(rng.standard_normal((B, T, cin) if three_d else (B * T, cin)))
    ref = x.data @ m.weight.data.T + (m.bias.data if bias else 0.0)
    np.testing.assert_allclose(m(x).numpy(), ref, rtol=1e-12, atol=1e-12)
    assert m(x).shape == x.shape[:-1] + (cout,)
    assert gradcheck(lambda x, *ps: m(x), [x, *m.parameters()])


def test_linear_layout_and_init():
    m = Linear(5, 3, rng=np.random.default_rng(0))
    assert m.weight.shape == (3, 5) and m.bias.shape == (3,) and m.weight.dtype == np.float32
    bound = 1 / math.sqrt(5)
    assert np.abs(m.weight.numpy()).max() <= bound and np.abs(m.bias.numpy()).max() <= bound
    assert Linear(5, 3, bias=False).bias is None
    with pytest.raises(ValueError, match="features"):
        m(Tensor(np.zeros((2, 4), np.float32)))


# ------------------------------------------------------------------ Embedding
@given(st.integers(1, 6), st.integers(2, 8), batch, time_, seeds)
def test_embedding_gradcheck_repeated_ids(V, C, B, T, seed):
    rng = np.random.default_rng(seed)
    m = _f64(Embedding(V, C, rng=rng))
    ids = rng.integers(0, V, size=(B, T))
    ids.reshape(-1)[0] = ids.reshape(-1)[-1]  # at least one repeat when B*T > 1
    np.testing.assert_array_equal(m(ids).numpy(), m.weight.data[ids])
    assert gradcheck(lambda w: m(ids), [m.weight])
    # the gradient of sum(out * g) for row v is the sum of g over the positions holding v
    g = rng.standard_normal((B, T, C))
    m.weight.grad = None
    m(ids).backward(g)
    ref = np.zeros((V, C))
    for b in range(B):
        for t in range(T):
            ref[ids[b, t]] += g[b, t]
    np.testing.assert_allclose(m.weight.grad, ref, rtol=1e-12, atol=1e-12)


def test_embedding_errors():
    m = Embedding(4, 2)
    with pytest.raises(IndexError):
        m(np.array([[0, 4]]))
    with pytest.raises(TypeError):
        m(np.array([0.5]))


# ------------------------------------------------------------------ LayerNorm
@given(batch, time_, chan, st.booleans(), seeds)
def test_layer_norm_gradcheck(B, T, C, bias, seed):
    rng = np.random.default_rng(seed)
    m = _f64(LayerNorm(C, bias=bias))
    m.weight.data = rng.standard_normal(C)  # non-trivial scale and shift, so their gradients matter
    if bias:
        m.bias.data = rng.standard_normal(C)
    x = _t(rng.standard_normal((B, T, C)) * 2 + 1)
    assert gradcheck(lambda x, *ps: m(x), [x, *m.parameters()])


@given(batch, time_, chan, seeds)
def test_layer_norm_moments_and_affine(B, T, C, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C)) * 3 + 5
    m = _f64(LayerNorm(C))
    y = m(_t(x)).numpy()
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    var = x.var(-1, keepdims=True)
    np.testing.assert_allclose(y.var(-1), (var / (var + 1e-5))[..., 0], rtol=1e-10)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    m.weight.data, m.bias.data = w, b
    np.testing.assert_allclose(m(_t(x)).numpy(), (x - x.mean(-1, keepdims=True)) / np.sqrt(var + 1e-5) * w + b,
                               rtol=1e-10, atol=1e-12)
    nb = LayerNorm(C, bias=False)
    assert nb.bias is None and [n for n, _ in nb.named_parameters()] == ["weight"]


def test_layer_norm_float32_stats():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32) * 10
    y = LayerNorm(64)(Tensor(x)).numpy()
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)


# ------------------------------------------------------------------ Dropout
@given(batch, time_, chan, st.sampled_from([0.1, 0.5, 0.9]), seeds)
def test_dropout_gradcheck_fixed_generator(B, T, C, p, seed):
    m = Dropout(p)
    x = _t(np.random.default_rng(seed).standard_normal((B, T, C)))

    def f(x):
        m.generator = np.random.default_rng(seed)  # the same mask at every evaluation
        return m(x)

    assert gradcheck(f, [x])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_rate_scale_and_eval(p):
    x = np.random.default_rng(0).uniform(1, 2, size=(200, 250))
    m = Dropout(p, generator=np.random.default_rng(1))
    y = m(_t(x)).numpy()
    zeroed = y == 0
    n = x.size
    assert abs(zeroed.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(y[~zeroed], x[~zeroed] / (1 - p), rtol=1e-12)
    # the same seed gives the same mask
    np.testing.assert_array_equal(Dropout(p, generator=np.random.default_rng(1))(_t(x)).numpy(), y)
    # the gradient is the same mask and scale
    t = _t(x)
    Dropout(p, generator=np.random.default_rng(1))(t).sum().backward()
    np.testing.assert_allclose(t.grad, np.where(zeroed, 0.0, 1 / (1 - p)))
    # eval mode: identity
    m.eval()
    t = _t(x)
    assert m(t) is t or np.array_equal(m(t).numpy(), x)
    assert np.array_equal(Dropout(0.0)(t).numpy(), x)


def test_dropout_bad_p():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="p must be in"):
            Dropout(p)


# ------------------------------------------------------------------ GELU
@given(batch, time_, chan, seeds)
def test_gelu_gradcheck_and_value(B, T, C, seed):
    x = _t(np.random.default_rng(seed).standard_normal((B, T, C)) * 3)
    a = x.data
    ref = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    np.testing.assert_allclose(GELU()(x).numpy(), ref, rtol=1e-12, atol=1e-15)
    assert gradcheck(GELU(), [x])


# ------------------------------------------------------------------ MLP, Block
@FEW
@given(batch, time_, st.integers(2, 12), st.booleans(), seeds)
def test_mlp_gradcheck(B, T, C, bias, seed):
    rng = np.random.default_rng(seed)
    m = _f64(MLP(C, bias=bias, rng=rng))
    x = _t(rng.standard_normal((B, T, C)))
    assert m(x).shape == (B, T, C)
    assert gradcheck(lambda x, *ps: m(x), [x, *m.parameters()])


def _block_fn(m, mask, seed, p):
    def f(x, *params):
        m.attn.generator = np.random.default_rng(seed)
        m.attn.resid_dropout.generator = np.random.default_rng(seed + 1)
        m.mlp.dropout.generator = np.random.default_rng(seed + 2)
        return m(x, mask=mask)
    return f


def test_block_gradcheck_every_parameter():
    """One small Block, every parameter (with padding mask and dropout)."""
    rng = np.random.default_rng(5)
    m = _f64(Block(4, 2, dropout=0.2, rng=rng))
    for p in m.parameters():  # LayerNorm weight/bias away from 1/0, biases non-zero
        p.data = p.data + 0.3 * rng.standard_normal(p.shape)
    x = _t(rng.standard_normal((2, 3, 4)))
    mask = np.array([[True, True, True], [False, True, True]])
    assert gradcheck(_block_fn(m, mask, 11, 0.2), [x, *m.parameters()])


@FEW
@given(batch, time_, c_heads, st.booleans(), st.sampled_from([0.0, 0.2]), st.booleans(), st.data())
def test_block_gradcheck(B, T, CH, bias, p, padded, data):
    """Hypothesis sizes; the input and a drawn subset of the parameters each example
    (every parameter is covered at a fixed size by test_block_gradcheck_every_parameter)."""
    C, H = CH
    seed = data.draw(seeds)
    rng = np.random.default_rng(seed)
    m = _f64(Block(C, H, dropout=p, bias=bias, rng=rng))
    for prm in m.parameters():
        prm.data = prm.data + 0.1 * rng.standard_normal(prm.shape)
    names = [n for n, _ in m.named_parameters()]
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    params = dict(m.named_parameters())
    x = _t(rng.standard_normal((B, T, C)))
    mask = rng.random((B, T)) < 0.7 if padded else None
    assert gradcheck(_block_fn(m, mask, seed, p), [x, *(params[n] for n in chosen)])


def test_block_eval_equals_formula():
    """x + attn(ln_1(x)), then + mlp(ln_2(.)): assembled from the sub-layers by hand."""
    rng = np.random.default_rng(2)
    m = _f64(Block(8, 2, rng=rng))
    x = _t(rng.standard_normal((2, 4, 8)))
    with no_grad():
        h = x.data + m.attn(m.ln_1(x)).data
        ref = h + m.mlp(m.ln_2(Tensor(h))).data
        np.testing.assert_allclose(m(x).numpy(), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ positions
@given(st.integers(1, 20), st.integers(1, 17), seeds)
def test_sinusoidal_formula(L, C, seed):
    pe = SinusoidalPositionalEncoding(L, C)
    assert pe.parameters() == []
    table = pe(np.arange(L)).numpy()
    assert table.shape == (L, C)
    for pos in range(L):
        for j in range(C):
            i = j // 2
            angle = pos / 10000 ** (2 * i / C)
            ref = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(table[pos, j] - ref) < 1e-6, (pos, j)
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, L, size=(2, 3))
    out = pe(positions)
    assert out.shape == (2, 3, C) and not out.requires_grad
    np.testing.assert_array_equal(out.numpy(), table[positions])
    with pytest.raises(ValueError, match="block_size"):
        pe(np.array([L]))


# ------------------------------------------------------------------ GPT init rule
class _Tiny(Module):
    def __init__(self, n_layer, C, V, rng):
        self.wte = Embedding(V, C, rng=rng)
        self.h = ModuleList(Block(C, 4, rng=rng) for _ in range(n_layer))
        self.ln_f = LayerNorm(C)


def test_gpt_init_statistics():
    n_layer, C = 4, 64
    m = _Tiny(n_layer, C, 300, np.random.default_rng(0))
    for p in m.parameters():  # scramble so that every value below comes from the init
        p.data = p.data + 1.0
    init.gpt_init_(m, n_layer, np.random.default_rng(1))
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in m.named_parameters():
        a = p.numpy().astype(np.float64)
        assert p.dtype == np.float32, name
        if name.endswith("c_proj.weight"):
            std = resid_std
        elif "ln" in name:
            np.testing.assert_array_equal(a, 1.0 if name.endswith("weight") else 0.0, err_msg=name)
            continue
        elif name.endswith("bias"):
            np.testing.assert_array_equal(a, 0.0, err_msg=name)
            continue
        else:
            std = 0.02
        n = a.size  # sample std within ~6 standard errors; mean within 6 se
        assert abs(a.std() - std) < 6 * std / math.sqrt(2 * n), (name, a.std(), std)
        assert abs(a.mean()) < 6 * std / math.sqrt(n), (name, a.mean())
    pooled = np.concatenate([p.numpy().ravel() for n_, p in m.named_parameters() if n_.endswith("c_proj.weight")])
    assert abs(pooled.std() - resid_std) < 0.02 * resid_std
    # reproducible from the seed
    m2 = _Tiny(n_layer, C, 300, np.random.default_rng(9))
    init.gpt_init_(m2, n_layer, np.random.default_rng(1))
    for (n1, a), (n2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2
        np.testing.assert_array_equal(a, b)
