"""tensor.gradcheck itself: it passes on correct gradients and fails, precisely, on a wrong backward.
Also the README example."""
from __future__ import annotations

import numpy as np
import pytest

import tensor
from tensor import Function, GradcheckError, Tensor, gradcheck
from tensor.gradcheck import numeric_grad


class WrongSquare(Function):
    """y = x^2 with a deliberately wrong derivative 2x + [index == 3] (correct everywhere but element 3)."""
    # d x^2/dx = 2x  (backward below is wrong on purpose at flat index 3)
    def forward(self, x):
        self.save_for_backward(x)
        return x * x

    def backward(self, g):
        x = self.saved[0]
        wrong = 2 * x
        wrong.reshape(-1)[3] += 1.0
        return (g * wrong,)


class WrongScale(Function):
    """y = a * b whose backward is right for input 0 but gives input 1 the gradient g*b instead of g*a."""
    # d(ab)/da = b, d(ab)/db = a  -- backward returns b for both on purpose
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        return g * b, g * b


def test_gradcheck_passes_on_correct_gradients():
    x = Tensor(np.linspace(-1, 1, 6).reshape(2, 3), requires_grad=True)
    assert gradcheck(lambda t: (t * t).sum(axis=1), [x]) is True


def test_gradcheck_names_input_and_worst_index():
    x = Tensor(np.linspace(0.5, 2.0, 6).reshape(2, 3), requires_grad=True)
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda t: WrongSquare.apply(t), [x])
    e = info.value
    assert e.input_index == 0 and e.index == (1, 0)  # flat index 3 of a (2, 3) tensor
    xv = x.numpy()[1, 0]
    v = np.random.default_rng(0).standard_normal((2, 3))[1, 0]  # gradcheck checks sum(y * v), v from seed 0
    assert e.numeric == pytest.approx(2 * xv * v, rel=1e-6)
    assert e.analytic == pytest.approx((2 * xv + 1) * v, rel=1e-12)
    msg = str(e)
    assert "input 0" in msg and "(1, 0)" in msg and "analytic" in msg and "numeric" in msg and "(2, 3)" in msg
    assert isinstance(e, AssertionError)  # pytest shows it as a failed check


def test_gradcheck_blames_the_right_input():
    a = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    b = Tensor(np.array([4.0, 5.0, 6.0]), requires_grad=True)
    with pytest.raises(GradcheckError, match=r"gradient of input 1 \(shape \(3,\)\)") as info:
        gradcheck(lambda x, y: WrongScale.apply(x, y), [a, b])
    assert info.value.input_index == 1
    # the worst index is where |analytic - numeric| = |v_i| |b_i - a_i| (= 3 |v_i|) exceeds tolerance most
    v = np.random.default_rng(0).standard_normal(3)
    assert info.value.index == (int(np.argmax(np.abs(v) * 3.0 - 1e-3 * np.abs(v * a.numpy()))),)
    # input 0 alone is right
    assert gradcheck(lambda x: WrongScale.apply(x, Tensor(np.array([4.0, 5.0, 6.0]))), [a])


def test_gradcheck_requires_float64_and_some_grad():
    with pytest.raises(TypeError, match="gradcheck: input 0 has dtype float32; use float64"):
        gradcheck(lambda t: t * 2.0, [Tensor(np.ones(2, np.float32), requires_grad=True)])
    with pytest.raises(ValueError, match="no input has requires_grad=True"):
        gradcheck(lambda t: t * 2.0, [Tensor(np.ones(2))])
    with pytest.raises(TypeError, match="fn must return a Tensor"):
        gradcheck(lambda t: 1.0, [Tensor(np.ones(2), requires_grad=True)])


def test_numeric_grad_central_differences():
    x = np.array([1.0, 2.0, -3.0])
    g = numeric_grad(lambda: float((x ** 3).sum()), x, 1e-5)
    np.testing.assert_allclose(g, 3 * np.array([1.0, 4.0, 9.0]), rtol=1e-8)
    np.testing.assert_array_equal(x, [1.0, 2.0, -3.0])  # restored


def test_gradcheck_leaves_inputs_unchanged():
    x = Tensor(np.array([0.5, 1.5]), requires_grad=True)
    before = x.numpy()
    gradcheck(lambda t: t.exp(), [x])
    np.testing.assert_array_equal(x.numpy(), before)


def test_readme_example():
    import tensor.functional as F
    from tensor import Tensor, gradcheck, no_grad  # noqa: F401  (the README's imports)
    rng = np.random.default_rng(0)
    xv, wv = rng.standard_normal((4, 3)), rng.standard_normal((3, 5))
    x = Tensor(xv, requires_grad=True)
    w = Tensor(wv, requires_grad=True)
    targets = np.array([0, 2, 1, 4])
    loss = F.cross_entropy(x @ w, targets)
    loss.backward()
    for t, data in ((x, xv), (w, wv)):
        assert isinstance(t.grad, np.ndarray) and t.grad.shape == data.shape and t.grad.dtype == data.dtype
    # the loss by hand: mean over rows of logsumexp(z) - z[target]
    z = xv @ wv
    expect = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(4), targets])
    assert loss.item() == pytest.approx(expect, rel=1e-12)
    # and the gradients against central differences
    assert gradcheck(lambda a, b: F.cross_entropy(a @ b, targets), [x, w])
    # the same in float32 keeps float32
    x32 = Tensor(xv.astype(np.float32), requires_grad=True)
    w32 = Tensor(wv.astype(np.float32), requires_grad=True)
    F.cross_entropy(x32 @ w32, targets).backward()
    assert x32.grad.dtype == np.float32 and w32.grad.dtype == np.float32
    np.testing.assert_allclose(x32.grad, x.grad, rtol=1e-4, atol=1e-6)


class NanGrad(Function):
    """y = 2x whose backward returns NaN at element 1."""
    # d(2x)/dx = 2
    def forward(self, x):
        return 2.0 * x

    def backward(self, g):
        out = 2.0 * g
        out[1] = np.nan
        return (out,)


def test_gradcheck_fails_on_nan_gradient():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    with pytest.raises(GradcheckError, match="at index \\(1,\\)") as info:
        gradcheck(lambda t: NanGrad.apply(t), [x])
    assert np.isnan(info.value.analytic) and info.value.index == (1,)
    with pytest.raises(GradcheckError):  # NaN in the function itself: numeric is NaN
        gradcheck(lambda t: (t - 2.0).sqrt(), [x])
