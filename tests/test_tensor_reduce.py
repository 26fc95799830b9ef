"""Reductions: sum mean max (and min) var logsumexp over axis None / int / tuple with keepdims; argmax."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensor import Tensor
from test_tensor_common import Case, arrays, axes_for, distinct_array, floats, grad_property, shapes, t64


def _axis_size(shape: tuple, axis) -> int:
    if axis is None:
        return int(np.prod(shape, dtype=int))
    axes = (axis,) if isinstance(axis, int) else axis
    return int(np.prod([shape[a] for a in axes], dtype=int))


@st.composite
def reduce_case(draw, op: str) -> Case:
    shape = draw(shapes(min_dims=0, max_dims=3))
    axis = draw(axes_for(len(shape)))
    keepdims = draw(st.booleans())
    if op in ("Max",):
        x = draw(distinct_array(shape))  # no ties: max is differentiable there
        name = draw(st.sampled_from(["max", "min"]))
        fn = (lambda t: t.max(axis=axis, keepdims=keepdims)) if name == "max" else \
             (lambda t: t.min(axis=axis, keepdims=keepdims))
        return Case(f"{name}(tensor{shape}, axis={axis}, keepdims={keepdims})", fn, [x])
    x = draw(arrays(shape, floats(-3, 3)))
    if op == "Var":
        ddof = draw(st.sampled_from([0, 1])) if _axis_size(shape, axis) > 1 else 0
        return Case(f"var(tensor{shape}, axis={axis}, keepdims={keepdims}, ddof={ddof})",
                    lambda t: t.var(axis=axis, keepdims=keepdims, ddof=ddof), [x])
    method = {"Sum": "sum", "Mean": "mean", "LogSumExp": "logsumexp"}[op]
    return Case(f"{method}(tensor{shape}, axis={axis}, keepdims={keepdims})",
                lambda t: getattr(t, method)(axis=axis, keepdims=keepdims), [x])


GRAD_CASES = {op: reduce_case(op) for op in ("Sum", "Mean", "Max", "Var", "LogSumExp")}
VALUE_TESTED = {"ArgMax"}

test_gradients = grad_property(GRAD_CASES)


# ------------------------------------------------------------------ shapes of the result
@given(data=st.data(), method=st.sampled_from(["sum", "mean", "max", "min", "var", "logsumexp"]))
def test_reduction_shapes_follow_numpy(data, method):
    shape = data.draw(shapes(max_dims=4))
    axis = data.draw(axes_for(len(shape)))
    keepdims = data.draw(st.booleans())
    x = data.draw(arrays(shape))
    out = getattr(Tensor(x), method)(axis=axis, keepdims=keepdims)
    expect = getattr(np, method if method != "logsumexp" else "sum")(x, axis=axis, keepdims=keepdims)
    assert out.shape == np.shape(expect)


# ------------------------------------------------------------------ closed forms
def test_sum_mean_var_closed_form():
    x = t64([[1.0, 2.0, 3.0], [4.0, 6.0, 8.0]])
    np.testing.assert_allclose(x.sum(axis=1).numpy(), [6.0, 18.0])
    np.testing.assert_allclose(x.mean(axis=0).numpy(), [2.5, 4.0, 5.5])
    np.testing.assert_allclose(x.var(axis=1).numpy(), [2.0 / 3.0, 8.0 / 3.0])
    np.testing.assert_allclose(x.var(axis=1, ddof=1).numpy(), [1.0, 4.0])
    x.mean().backward()
    np.testing.assert_allclose(x.grad, np.full((2, 3), 1 / 6))


def test_logsumexp_closed_form_and_stability():
    x = t64([[0.0, 0.0, 0.0, 0.0], [1000.0, 1000.0, -1000.0, -np.inf]])
    out = x.logsumexp(axis=1)
    np.testing.assert_allclose(out.numpy(), [math.log(4), 1000.0 + math.log(2)])
    out.sum().backward()  # gradient = softmax of each row
    np.testing.assert_allclose(x.grad, [[0.25] * 4, [0.5, 0.5, 0.0, 0.0]], atol=1e-300)


def test_logsumexp_all_minus_inf_row_is_minus_inf():
    out = t64([[-np.inf, -np.inf]], False).logsumexp(axis=1)
    assert out.numpy()[0] == -np.inf


def test_var_rejects_no_degrees_of_freedom():
    with pytest.raises(ValueError, match="var"):
        t64([1.0]).var(ddof=1)


def test_reduce_axis_errors_name_op():
    with pytest.raises(ValueError, match="sum: axis 2 is out of range"):
        t64(np.ones((2, 2))).sum(axis=2)
    with pytest.raises(ValueError, match="mean: repeated axis"):
        t64(np.ones((2, 2))).mean(axis=(0, -2))


# ------------------------------------------------------------------ max ties (documented in ops/reduce.py Max)
def test_max_ties_share_gradient_equally():
    x = t64([[3.0, 1.0, 3.0, 3.0], [0.0, 2.0, 2.0, -1.0]])
    x.max(axis=1).backward(np.array([6.0, 1.0]))
    np.testing.assert_allclose(x.grad, [[2.0, 0.0, 2.0, 2.0], [0.0, 0.5, 0.5, 0.0]])


def test_max_ties_global_and_keepdims():
    x = t64(np.full((2, 3), 7.0))
    x.max(keepdims=True).sum().backward()
    np.testing.assert_allclose(x.grad, np.full((2, 3), 1 / 6))
    y = t64([[1.0, 5.0], [5.0, 2.0]])
    y.min(axis=0).sum().backward()  # min = -max(-x): ties handled the same way
    np.testing.assert_allclose(y.grad, [[1.0, 0.0], [0.0, 1.0]])


@given(data=st.data())
def test_max_ties_gradient_sums_to_upstream(data):
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(axes_for(len(shape)))
    x = data.draw(arrays(shape, st.integers(0, 2).map(float)))  # many ties
    t = t64(x)
    out = t.max(axis=axis, keepdims=True)
    out.backward(np.ones(out.shape))
    winners = x == x.max(axis=axis, keepdims=True)
    counts = winners.sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(t.grad, winners / counts)


# ------------------------------------------------------------------ argmax (no gradient)
@given(data=st.data())
def test_argmax_values(data):
    shape = data.draw(shapes(min_dims=1))
    x = data.draw(arrays(shape, st.integers(0, 3).map(float)))  # ties: the first index wins, as NumPy
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    keepdims = data.draw(st.booleans())
    out = Tensor(x, requires_grad=True).argmax(axis=axis, keepdims=keepdims)
    np.testing.assert_array_equal(out.numpy(), np.argmax(x, axis=axis, keepdims=keepdims))
    assert out.dtype.kind == "i" and not out.requires_grad and out._ctx is None


def test_argmax_first_of_ties():
    assert Tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]]).argmax(axis=1).tolist() == [1, 0]
