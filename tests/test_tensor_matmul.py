"""matmul with NumPy semantics: 2-D, batched, broadcast batch dims, 1-D operands on either side."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensor import Tensor
from test_tensor_common import Case, arrays, grad_property, t64


@st.composite
def matmul_shapes(draw) -> tuple:
    n, k, m = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    batch = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=2))
    ba, bb = batch.input_shapes
    sa = (k,) if draw(st.integers(0, 4)) == 0 else ba + (n, k)
    sb = (k,) if draw(st.integers(0, 4)) == 0 else bb + (k, m)
    return sa, sb


@st.composite
def matmul_case(draw) -> Case:
    sa, sb = draw(matmul_shapes())
    a, b = draw(arrays(sa)), draw(arrays(sb))
    rg = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
    form = draw(st.sampled_from(["a @ b", "a.matmul(b)", "ndarray @ b", "a @ ndarray"]))
    if form == "a @ b":
        return Case(f"tensor{sa} @ tensor{sb}, requires_grad={rg}", lambda x, y: x @ y, [a, b], rg)
    if form == "a.matmul(b)":
        return Case(f"tensor{sa}.matmul(tensor{sb}), requires_grad={rg}", lambda x, y: x.matmul(y), [a, b], rg)
    if form == "ndarray @ b":
        return Case(f"ndarray{sa} @ tensor{sb}", lambda y: a.astype(y.dtype) @ y, [b])
    return Case(f"tensor{sa} @ ndarray{sb}", lambda x: x @ b.astype(x.dtype), [a])


GRAD_CASES = {"MatMul": matmul_case()}
VALUE_TESTED: set = set()

test_gradients = grad_property(GRAD_CASES)


@given(data=st.data())
def test_matmul_shapes_follow_numpy(data):
    sa, sb = data.draw(matmul_shapes())
    a, b = np.ones(sa), np.ones(sb)
    assert (Tensor(a) @ Tensor(b)).shape == np.matmul(a, b).shape


def test_matmul_closed_form():
    a = t64([[1.0, 2.0], [3.0, 4.0]])
    b = t64([[5.0], [6.0]])
    out = a @ b
    np.testing.assert_array_equal(out.numpy(), [[17.0], [39.0]])
    out.sum().backward()
    np.testing.assert_array_equal(a.grad, [[5.0, 6.0], [5.0, 6.0]])  # g @ b^T
    np.testing.assert_array_equal(b.grad, [[4.0], [6.0]])  # a^T @ g


def test_vector_dot_vector_is_scalar():
    a, b = t64([1.0, 2.0, 3.0]), t64([4.0, 5.0, 6.0])
    out = a @ b
    assert out.shape == () and out.item() == 32.0
    out.backward()
    np.testing.assert_array_equal(a.grad, [4.0, 5.0, 6.0])
    np.testing.assert_array_equal(b.grad, [1.0, 2.0, 3.0])


def test_matmul_misaligned_error_names_op_and_shapes():
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) do not align"):
        t64(np.ones((2, 3))) @ t64(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"matmul.*\(\).*\(3,?\)"):
        Tensor(np.float64(2.0)) @ t64(np.ones(3))


def test_matmul_float32_stays_float32():
    a = Tensor(np.ones((2, 3, 4), np.float32), requires_grad=True)
    w = Tensor(np.ones((4, 5), np.float32), requires_grad=True)
    (a @ w).sum().backward()
    assert a.grad.dtype == np.float32 and w.grad.dtype == np.float32 and w.grad.shape == (4, 5)
    np.testing.assert_array_equal(w.grad, np.full((4, 5), 6.0))
