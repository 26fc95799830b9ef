"""Fused ops: softmax, log_softmax, cross_entropy, layer_norm, embedding, dropout, linear."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensor.functional as F
from tensor import Tensor, gradcheck
from test_tensor_common import Case, arrays, distinct_array, floats, grad_property, shapes, t64


@st.composite
def softmax_case(draw, log: bool) -> Case:
    shape = draw(shapes(min_dims=1, max_dims=3))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    x = draw(arrays(shape, floats(-4, 4)))
    f = F.log_softmax if log else F.softmax
    return Case(f"{f.__name__}(tensor{shape}, axis={axis})", lambda t: f(t, axis=axis), [x])


HALF_LOSS = {"out_dtype": {np.float16: np.float32}}  # losses of half-precision logits are float32


@st.composite
def cross_entropy_case(draw) -> Case:
    lead = draw(shapes(min_dims=0, max_dims=2, max_side=3, max_size=6))
    C = draw(st.integers(1, 4))
    logits = draw(arrays(lead + (C,), floats(-4, 4)))
    ignore = draw(st.sampled_from([-100, -1, 0]))
    targets = draw(hnp.arrays(np.int64, lead, elements=st.integers(0, C - 1)))
    if draw(st.booleans()):  # some positions ignored
        drop = draw(hnp.arrays(np.bool_, lead))
        targets = np.where(drop, ignore, targets)
    as_tensor = draw(st.booleans())
    tg = Tensor(targets) if as_tensor else targets
    if ignore == -100 and draw(st.booleans()):
        return Case(f"cross_entropy(logits{logits.shape}, targets={targets.tolist()})",
                    lambda t: F.cross_entropy(t, tg), [logits], extra=HALF_LOSS)
    return Case(f"cross_entropy(logits{logits.shape}, targets={targets.tolist()}, ignore_index={ignore})",
                lambda t: F.cross_entropy(t, tg, ignore_index=ignore), [logits], extra=HALF_LOSS)


@st.composite
def layer_norm_case(draw) -> Case:
    lead = draw(shapes(min_dims=0, max_dims=2, max_size=6))
    C = draw(st.integers(2, 4))
    x = draw(distinct_array(lead + (C,), step=0.25)) * draw(st.sampled_from([1.0, 0.5, 3.0]))  # rows never constant
    has_w, has_b = draw(st.booleans()), draw(st.booleans())
    arrs, rg = [x], [True]
    if has_w:
        arrs.append(draw(arrays((C,))))
        rg.append(draw(st.booleans()))
    if has_b:
        arrs.append(draw(arrays((C,))))
        rg.append(draw(st.booleans()))
    eps = draw(st.sampled_from([1e-5, 1e-3]))

    def fn(t, *p):
        w = p[0] if has_w else None
        b = p[-1] if has_b else None
        return F.layer_norm(t, w, b, eps=eps)
    return Case(f"layer_norm(x{x.shape}, weight={has_w}, bias={has_b}, eps={eps}), requires_grad={rg}", fn, arrs, rg)


@st.composite
def embedding_case(draw) -> Case:
    V, C = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    ids = draw(hnp.arrays(np.int64, draw(shapes(min_dims=0, max_dims=2, max_size=8)), elements=st.integers(0, V - 1)))
    w = draw(arrays((V, C)))
    ids_ = draw(st.sampled_from([ids, Tensor(ids), ids.tolist()]))
    return Case(f"embedding(ids={ids.tolist()}, weight{w.shape})", lambda t: F.embedding(ids_, t), [w])


@st.composite
def dropout_case(draw) -> Case:
    shape = draw(shapes())
    p = draw(st.sampled_from([0.1, 0.5, 0.9]))
    seed = draw(st.integers(0, 2 ** 16))
    x = draw(arrays(shape))
    # a fresh generator with the same seed on every call: the same mask each time finite differences look
    return Case(f"dropout(tensor{shape}, p={p}, seed={seed})",
                lambda t: F.dropout(t, p, generator=np.random.default_rng(seed)), [x])


@st.composite
def linear_case(draw) -> Case:
    lead = draw(shapes(min_dims=0, max_dims=2, max_size=6))
    n_in, n_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x, w = draw(arrays(lead + (n_in,))), draw(arrays((n_out, n_in)))
    if draw(st.booleans()):
        b = draw(arrays((n_out,)))
        rg = draw(st.sampled_from([(True, True, True), (False, True, True), (True, False, False), (False, False, True)]))
        return Case(f"linear(x{x.shape}, W{w.shape}, b), requires_grad={rg}", F.linear, [x, w, b], rg)
    rg = draw(st.sampled_from([(True, True), (False, True), (True, False)]))
    return Case(f"linear(x{x.shape}, W{w.shape}), requires_grad={rg}", F.linear, [x, w], rg)


@st.composite
def linear_gelu_case(draw) -> Case:
    """The fused node itself (F.linear_gelu on the CPU runs the two ops): gelu(x W^T + b)."""
    c = draw(linear_case())
    return Case(c.label.replace("linear", "LinearGelu", 1), F.LinearGelu.apply, c.arrays, c.requires_grad)


GRAD_CASES = {
    "Softmax": softmax_case(log=False),
    "LogSoftmax": softmax_case(log=True),
    "CrossEntropy": cross_entropy_case(),
    "LayerNorm": layer_norm_case(),
    "Embedding": embedding_case(),
    "Dropout": dropout_case(),
    "Linear": linear_case(),
    "LinearGelu": linear_gelu_case(),
}
VALUE_TESTED: set = set()

test_gradients = grad_property(GRAD_CASES)


# ------------------------------------------------------------------ closed forms
@given(data=st.data())
def test_softmax_rows_sum_to_one(data):
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(arrays(shape, floats(-50, 50)))
    for dtype in (np.float64, np.float32):
        y = F.softmax(Tensor(x.astype(dtype)), axis=axis).numpy()
        assert y.dtype == dtype and np.all(y >= 0)
        np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-6 if dtype == np.float32 else 1e-13)
        ly = F.log_softmax(Tensor(x.astype(dtype)), axis=axis).numpy()
        np.testing.assert_allclose(np.exp(ly).sum(axis=axis), 1.0, rtol=1e-5 if dtype == np.float32 else 1e-13)


def test_softmax_closed_form_and_large_inputs():
    y = F.softmax(t64([[0.0, math.log(3.0)], [1000.0, 1000.0]], False)).numpy()
    np.testing.assert_allclose(y, [[0.25, 0.75], [0.5, 0.5]])
    ly = F.log_softmax(t64([[0.0, 0.0, 0.0, 0.0], [-1000.0, 0.0, 0.0, -1000.0]], False)).numpy()
    np.testing.assert_allclose(ly[0], -math.log(4))
    np.testing.assert_allclose(ly[1], [-1000.0 - math.log(2), -math.log(2), -math.log(2), -1000.0 - math.log(2)])


def test_cross_entropy_confident_correct_prediction_is_zero():
    logits = t64([[100.0, 0.0, 0.0], [0.0, 0.0, 100.0]])
    loss = F.cross_entropy(logits, np.array([0, 2]))
    assert loss.item() == pytest.approx(0.0, abs=1e-40)
    loss.backward()
    np.testing.assert_allclose(logits.grad, 0.0, atol=1e-40)


@pytest.mark.parametrize("C", [1, 2, 5, 50])
def test_cross_entropy_uniform_logits_is_log_C(C):
    logits = t64(np.full((3, C), 0.7))
    loss = F.cross_entropy(logits, np.array([0, C - 1, C // 2]))
    assert loss.item() == pytest.approx(math.log(C), rel=1e-14, abs=1e-15)
    loss.backward()  # (softmax - onehot) / N
    expect = np.full((3, C), 1.0 / C)
    expect[[0, 1, 2], [0, C - 1, C // 2]] -= 1.0
    np.testing.assert_allclose(logits.grad, expect / 3, atol=1e-15)


def test_cross_entropy_ignore_index_is_excluded_from_mean():
    logits = t64([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]])
    loss = F.cross_entropy(logits, np.array([0, 1, -100]))
    assert loss.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-14)
    loss.backward()
    np.testing.assert_array_equal(logits.grad[2], [0.0, 0.0])
    all_ignored = F.cross_entropy(t64([[1.0, 2.0]]), np.array([7]), ignore_index=7)
    assert all_ignored.item() == 0.0


def test_cross_entropy_errors():
    logits = t64(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"cross_entropy: targets of shape \(2, 1\) do not match logits of shape \(2, 3\)"):
        F.cross_entropy(logits, np.array([[0], [1]]))
    with pytest.raises(TypeError, match="cross_entropy: targets must be integers"):
        F.cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(IndexError, match=r"cross_entropy: a target is outside \[0, 3\)"):
        F.cross_entropy(logits, np.array([0, 3]))


@given(data=st.data())
def test_layer_norm_output_has_mean_zero_variance_one(data):
    lead = data.draw(shapes(max_dims=2, max_size=6))
    C = data.draw(st.integers(2, 8))
    x = data.draw(distinct_array(lead + (C,))) * data.draw(st.sampled_from([1.0, 10.0]))
    y = F.layer_norm(t64(x, False), eps=0.0).numpy()
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-12)
    w, b = np.arange(1.0, C + 1), np.full(C, 0.5)
    yw = F.layer_norm(t64(x, False), t64(w, False), t64(b, False), eps=0.0).numpy()
    np.testing.assert_allclose(yw, y * w + b, rtol=1e-12, atol=1e-12)


def test_layer_norm_weight_shape_error():
    with pytest.raises(ValueError, match=r"layer_norm: weight of shape \(3\) does not match"):
        F.layer_norm(t64(np.ones((2, 4))), t64(np.ones(3)))


def test_embedding_repeated_ids_accumulate():
    w = t64(np.arange(8.0).reshape(4, 2))
    out = F.embedding(np.array([[1, 1], [3, 1]]), w)
    np.testing.assert_array_equal(out.numpy(), [[[2, 3], [2, 3]], [[6, 7], [2, 3]]])
    out.backward(np.ones((2, 2, 2)))
    np.testing.assert_array_equal(w.grad, [[0, 0], [3, 3], [0, 0], [1, 1]])


def test_embedding_errors():
    w = t64(np.zeros((4, 2)))
    with pytest.raises(IndexError, match=r"embedding: ids must lie in \[0, 4\), got values in \[0, 4\]"):
        F.embedding(np.array([0, 4]), w)
    with pytest.raises(IndexError, match="embedding"):
        F.embedding(np.array([-1]), w)
    with pytest.raises(TypeError, match="embedding: ids must be integers"):
        F.embedding(np.array([0.0]), w)


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_gradient_is_mask_over_keep_probability(p):
    x = t64(np.linspace(1.0, 2.0, 400).reshape(20, 20))  # no zeros: a zero output means dropped
    y = F.dropout(x, p, generator=np.random.default_rng(123))
    out = y.numpy()
    kept = out != 0
    np.testing.assert_allclose(out[kept], x.numpy()[kept] / (1 - p), rtol=1e-15)
    assert abs(kept.mean() - (1 - p)) < 0.1  # roughly the right fraction is kept
    y.sum().backward()
    np.testing.assert_allclose(x.grad, kept / (1 - p), rtol=1e-15)
    y2 = F.dropout(x, p, generator=np.random.default_rng(123))
    np.testing.assert_array_equal(y2.numpy(), out)  # the same generator seed gives the same mask


def test_dropout_identity_when_p_zero_or_eval():
    x = t64([1.0, 2.0, 3.0])
    assert F.dropout(x, 0.0) is x
    assert F.dropout(x, 0.5, training=False) is x
    with pytest.raises(ValueError, match=r"dropout: p must be in \[0, 1\)"):
        F.dropout(x, 1.0)


def test_dropout_float32_stays_float32():
    x = Tensor(np.ones((4, 4), np.float32), requires_grad=True)
    y = F.dropout(x, 0.5, generator=np.random.default_rng(0))
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


# ------------------------------------------------------------------ linear
def test_linear_closed_form_and_errors():
    x, w, b = t64([[1.0, 2.0]]), t64([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), t64([0.5, 0.0, -1.0])
    y = F.linear(x, w, b)
    np.testing.assert_array_equal(y.numpy(), [[1.5, 2.0, 2.0]])
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [[2.0, 2.0]])
    np.testing.assert_array_equal(w.grad, [[1.0, 2.0]] * 3)
    np.testing.assert_array_equal(b.grad, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"linear: input of shape \(1, 2\) has 2 features, weight of shape \(3, 3\)"):
        F.linear(x, t64(np.ones((3, 3))))


def test_fused_ops_float32_stay_float32():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True)
    w = Tensor(np.ones(4, np.float32), requires_grad=True)
    b = Tensor(np.zeros(4, np.float32), requires_grad=True)
    W = Tensor(rng.standard_normal((5, 4)).astype(np.float32), requires_grad=True)
    outs = [F.softmax(x), F.log_softmax(x), F.layer_norm(x, w, b), F.linear(x, W),
            F.cross_entropy(x, np.array([0, 1, 3])), F.embedding(np.array([0, 2]), W)]
    for o in outs:
        assert o.dtype == np.float32
        o.sum().backward()
    for t in (x, w, b, W):
        assert t.grad.dtype == np.float32
