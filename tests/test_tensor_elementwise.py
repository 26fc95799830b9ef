"""Elementwise ops: + - * / ** neg exp log sqrt tanh sigmoid relu gelu abs maximum minimum clip, comparisons."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensor.functional as F
from tensor import Tensor
from test_tensor_common import (Case, arrays, away_from_zero, floats, grad_property, lattice, shapes,
                                t64)

# ------------------------------------------------------------------ binary ops
BINARY = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Pow": lambda a, b: a ** b,
    "Maximum": lambda a, b: a.maximum(b),
    "Minimum": lambda a, b: a.minimum(b),
}
SYMBOL = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/", "Pow": "**", "Maximum": "maximum", "Minimum": "minimum"}


def scalar(values: st.SearchStrategy, ints: st.SearchStrategy) -> st.SearchStrategy:
    """A scalar operand as a user writes it: Python float or int, NumPy float64 or float32 scalar."""
    return st.one_of(values.map(float), ints, values.map(np.float64), values.map(np.float32))


@st.composite
def binary_case(draw, op: str, a_el, b_el, b_ints, scalar_first: bool = True) -> Case:
    fn = BINARY[op]
    forms = ["tensor,tensor", "tensor,scalar", "tensor,array"] + (["scalar,tensor"] if scalar_first else [])
    form = draw(st.sampled_from(forms))
    if form == "tensor,tensor":
        bs = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3))
        sa, sb = bs.input_shapes
        a, b = draw(arrays(sa, a_el)), draw(arrays(sb, b_el))
        rg = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
        return Case(f"tensor{sa} {SYMBOL[op]} tensor{sb}, requires_grad={rg}", fn, [a, b], rg)
    if form == "tensor,array":  # a constant ndarray of the tensor's dtype, broadcast
        bs = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3))
        sa, sb = bs.input_shapes
        a, c = draw(arrays(sa, a_el)), draw(arrays(sb, b_el))
        return Case(f"tensor{sa} {SYMBOL[op]} ndarray{sb}", lambda x: fn(x, c.astype(x.dtype)), [a])
    s = draw(scalar(b_el, b_ints)) if form == "tensor,scalar" else draw(scalar(a_el, b_ints))
    shape = draw(shapes())
    if form == "tensor,scalar":
        a = draw(arrays(shape, a_el))
        return Case(f"tensor{shape} {SYMBOL[op]} {type(s).__name__}({s})", lambda x: fn(x, s), [a])
    b = draw(arrays(shape, b_el))
    return Case(f"{type(s).__name__}({s}) {SYMBOL[op]} tensor{shape}", lambda x: fn(s, x), [b])


@st.composite
def pow_case(draw) -> Case:
    """a ** b: a positive for a tensor or fractional exponent; integer exponents also on negative bases."""
    if draw(st.booleans()):
        return draw(binary_case("Pow", floats(0.3, 2.0), floats(-2.0, 2.5), st.integers(1, 3)))  # int scalars: bases too
    shape = draw(shapes())
    a = draw(arrays(shape, away_from_zero(0.3, 2.0)))
    k = draw(st.sampled_from([2, 3, -1, -2, 2.0, np.float64(3.0), np.float32(2.0)]))
    return Case(f"tensor{shape} ** {type(k).__name__}({k})", lambda x: x ** k, [a])


# ------------------------------------------------------------------ unary ops
@st.composite
def unary_case(draw, op: str, variants: dict, el) -> Case:
    name = draw(st.sampled_from(sorted(variants)))
    shape = draw(shapes())
    return Case(f"{name} of tensor{shape}", variants[name], [draw(arrays(shape, el))])


@st.composite
def clip_case(draw) -> Case:
    shape = draw(shapes())
    x = draw(arrays(shape, lattice(0.125)))  # never on a bound (bounds lie on the lattice k/4)
    lo = draw(st.one_of(st.none(), lattice(0.0, k=4)))
    hi = draw(st.one_of(st.none(), lattice(0.0, k=4)))
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    as_np = draw(st.booleans())
    lo_, hi_ = (np.float64(lo) if as_np and lo is not None else lo), (np.float64(hi) if as_np and hi is not None else hi)
    return Case(f"clip(tensor{shape}, {lo_!r}, {hi_!r})", lambda t: t.clip(lo_, hi_), [x])


GRAD_CASES = {
    "Add": binary_case("Add", floats(), floats(), st.integers(-3, 3)),
    "Sub": binary_case("Sub", floats(), floats(), st.integers(-3, 3)),
    "Mul": binary_case("Mul", floats(), floats(), st.integers(-3, 3)),
    "Div": binary_case("Div", floats(), away_from_zero(0.5, 2.0), st.sampled_from([-2, -1, 1, 2, 3])),
    "Pow": pow_case(),
    "Maximum": binary_case("Maximum", lattice(0.0), lattice(0.125), st.integers(-2, 2), scalar_first=False),
    "Minimum": binary_case("Minimum", lattice(0.0), lattice(0.125), st.integers(-2, 2), scalar_first=False),
    "Neg": unary_case("Neg", {"-x": lambda x: -x}, floats()),
    "Exp": unary_case("Exp", {"x.exp()": lambda x: x.exp()}, floats(-3, 3)),
    "Log": unary_case("Log", {"x.log()": lambda x: x.log()}, floats(0.1, 4.0)),
    "Sqrt": unary_case("Sqrt", {"x.sqrt()": lambda x: x.sqrt()}, floats(0.1, 4.0)),
    "Tanh": unary_case("Tanh", {"x.tanh()": lambda x: x.tanh(), "F.tanh(x)": F.tanh}, floats(-3, 3)),
    "Sigmoid": unary_case("Sigmoid", {"x.sigmoid()": lambda x: x.sigmoid(), "F.sigmoid(x)": F.sigmoid},
                          floats(-5, 5)),
    "Relu": unary_case("Relu", {"x.relu()": lambda x: x.relu(), "F.relu(x)": F.relu}, away_from_zero(0.05, 2)),
    "Gelu": unary_case("Gelu", {"x.gelu()": lambda x: x.gelu(), "F.gelu(x)": F.gelu}, floats(-4, 4)),
    "Abs": unary_case("Abs", {"x.abs()": lambda x: x.abs(), "abs(x)": abs}, away_from_zero(0.05, 2)),
    "Clip": clip_case(),
}
VALUE_TESTED = {"Compare"}

test_gradients = grad_property(GRAD_CASES)


# ------------------------------------------------------------------ closed forms
def grad_at(fn, x: float) -> float:
    t = t64([x])
    fn(t).sum().backward()
    return float(t.grad[0])


def test_gelu_derivative_at_zero_is_one_half():
    assert grad_at(lambda t: t.gelu(), 0.0) == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("x", [-3.0, -1.0, -0.5, 0.5, 1.0, 2.0, 5.0])
def test_gelu_derivative_against_central_differences(x):
    h = 1e-5
    f = lambda v: float(t64([v], False).gelu().numpy()[0])  # noqa: E731
    assert grad_at(lambda t: t.gelu(), x) == pytest.approx((f(x + h) - f(x - h)) / (2 * h), rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("x,y", [(0.0, 0.0), (1.0, 0.8411919906082768), (-1.0, -0.15880800939172324)])
def test_gelu_values(x, y):  # 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) evaluated independently
    assert float(t64([x], False).gelu().numpy()[0]) == pytest.approx(y, rel=1e-12, abs=1e-15)


def test_sigmoid_derivative_at_zero_is_quarter():
    assert grad_at(lambda t: t.sigmoid(), 0.0) == pytest.approx(0.25, abs=1e-15)
    assert float(t64([0.0], False).sigmoid().numpy()[0]) == 0.5


def test_sigmoid_saturates_without_overflow():
    with np.errstate(all="raise"):
        y = t64([-1000.0, 1000.0], False).sigmoid().numpy()
    np.testing.assert_allclose(y, [0.0, 1.0], atol=1e-300)


@pytest.mark.parametrize("x", [0.5, 1.0, 2.0, math.e, 10.0])
def test_log_derivative_is_reciprocal(x):
    assert grad_at(lambda t: t.log(), x) == pytest.approx(1.0 / x, rel=1e-15)


@pytest.mark.parametrize("x", [0.25, 1.0, 4.0])
def test_sqrt_derivative(x):
    assert grad_at(lambda t: t.sqrt(), x) == pytest.approx(0.5 / math.sqrt(x), rel=1e-15)


def test_tanh_exp_derivatives_closed_form():
    assert grad_at(lambda t: t.tanh(), 0.0) == 1.0
    assert grad_at(lambda t: t.exp(), 1.0) == pytest.approx(math.e, rel=1e-15)
    assert grad_at(lambda t: t ** 3, 2.0) == pytest.approx(12.0, rel=1e-15)
    assert grad_at(lambda t: 2.0 ** t, 3.0) == pytest.approx(8 * math.log(2), rel=1e-15)
    assert grad_at(lambda t: 1.0 / t, 2.0) == pytest.approx(-0.25, rel=1e-15)


def test_relu_abs_gradient_at_zero_is_zero():  # the documented subgradient choice
    assert grad_at(lambda t: t.relu(), 0.0) == 0.0
    assert grad_at(lambda t: t.abs(), 0.0) == 0.0


def test_maximum_minimum_ties_split_gradient():
    a, b = t64([1.0, 2.0, 3.0]), t64([1.0, 1.0, 4.0])
    a.maximum(b).sum().backward()
    np.testing.assert_array_equal(a.grad, [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(b.grad, [0.5, 0.0, 1.0])
    a.grad = b.grad = None
    a.minimum(b).sum().backward()
    np.testing.assert_array_equal(a.grad, [0.5, 0.0, 1.0])
    np.testing.assert_array_equal(b.grad, [0.5, 1.0, 0.0])


def test_clip_rejects_inverted_bounds():
    with pytest.raises(ValueError, match="[Cc]lip"):
        t64([1.0]).clip(2.0, 1.0)


# ------------------------------------------------------------------ dtype: float32 stays float32
@pytest.mark.parametrize("s", [2.5, 2, np.float64(2.5), np.float32(2.5), np.int64(2), np.array(2.5)])
@pytest.mark.parametrize("op", ["+", "-", "*", "/", "**", "r+", "r-", "r*", "r/", "r**"])
def test_float32_with_any_scalar_stays_float32(op, s):
    x = Tensor(np.array([0.5, 1.0, 1.5], dtype=np.float32), requires_grad=True)
    fn = {"+": lambda: x + s, "-": lambda: x - s, "*": lambda: x * s, "/": lambda: x / s, "**": lambda: x ** s,
          "r+": lambda: s + x, "r-": lambda: s - x, "r*": lambda: s * x, "r/": lambda: s / x, "r**": lambda: s ** x}[op]
    y = fn()
    assert isinstance(y, Tensor) and y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32 and x.grad.shape == x.shape


def test_float32_unary_ops_stay_float32():
    x = Tensor(np.array([0.5, 1.0, 1.5], dtype=np.float32), requires_grad=True)
    for f in (lambda t: t.exp(), lambda t: t.log(), lambda t: t.sqrt(), lambda t: t.tanh(), lambda t: t.sigmoid(),
              lambda t: t.relu(), lambda t: t.gelu(), lambda t: abs(t), lambda t: -t, lambda t: t.clip(0.6, 1.2),
              lambda t: t.maximum(np.float64(1.0)), lambda t: t.minimum(1.0)):
        x.grad = None
        y = f(x)
        assert y.dtype == np.float32
        y.sum().backward()
        assert x.grad.dtype == np.float32


# ------------------------------------------------------------------ comparisons (no gradient)
CMP = {"eq": (lambda a, b: a == b, np.equal), "ne": (lambda a, b: a != b, np.not_equal),
       "lt": (lambda a, b: a < b, np.less), "le": (lambda a, b: a <= b, np.less_equal),
       "gt": (lambda a, b: a > b, np.greater), "ge": (lambda a, b: a >= b, np.greater_equal)}


@given(data=st.data(), op=st.sampled_from(sorted(CMP)))
def test_compare_values(data, op):
    bs = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3))
    a = data.draw(arrays(bs.input_shapes[0], lattice(0.0, k=2)))  # small lattice: many equal pairs
    b = data.draw(arrays(bs.input_shapes[1], lattice(0.0, k=2)))
    ours, ref = CMP[op]
    ta = Tensor(a, requires_grad=True)
    form = data.draw(st.sampled_from(["tensor", "scalar", "reflected"]))
    if form == "tensor":
        out, expect = ours(ta, Tensor(b)), ref(a, b)
    elif form == "scalar":
        s = float(b.reshape(-1)[0])
        out, expect = ours(ta, s), ref(a, s)
    else:  # scalar on the left: Python calls the reflected comparison on the tensor
        s = float(b.reshape(-1)[0])
        out, expect = ours(s, ta), ref(s, a)
    assert isinstance(out, Tensor) and out.dtype == np.bool_
    np.testing.assert_array_equal(out.numpy(), expect)
    assert not out.requires_grad and out._ctx is None  # comparisons are not recorded


def test_tensor_stays_hashable_with_elementwise_eq():
    t = t64([1.0])
    assert t in {t: 1}
