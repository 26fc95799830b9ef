"""Indexing: x[index] (ints, slices, None, Ellipsis, integer arrays with repeats, boolean masks), where, masked_fill."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensor
from tensor import Tensor
from test_tensor_common import Case, arrays, floats, grad_property, shapes, t64


@st.composite
def basic_index(draw, shape: tuple) -> tuple:
    """ints (negative too), slices (any step sign), None and at most one Ellipsis."""
    items = []
    for n in shape:
        kind = draw(st.sampled_from(["int", "slice", "full"]))
        if kind == "int":
            items.append(draw(st.integers(-n, n - 1)))
        elif kind == "slice":
            start = draw(st.one_of(st.none(), st.integers(-n - 1, n + 1)))
            stop = draw(st.one_of(st.none(), st.integers(-n - 1, n + 1)))
            step = draw(st.sampled_from([None, 1, 2, -1, -2]))
            items.append(slice(start, stop, step))
        else:
            items.append(slice(None))
    if items and draw(st.booleans()):  # replace a run of items by Ellipsis
        i = draw(st.integers(0, len(items)))
        j = draw(st.integers(i, len(items)))
        items[i:j] = [Ellipsis]
    for _ in range(draw(st.integers(0, 2))):
        items.insert(draw(st.integers(0, len(items))), None)
    if len(items) > 1 and draw(st.booleans()):  # trailing items may be left out
        items = items[:draw(st.integers(1, len(items)))]
    return items[0] if len(items) == 1 and draw(st.booleans()) else tuple(items)


@st.composite
def int_array(draw, n: int, max_len: int = 5) -> np.ndarray:
    """Integer indices into an axis of length n, negative ones and repeats included."""
    shape = draw(shapes(min_dims=1, max_dims=2, max_side=3, max_size=max_len))
    return draw(hnp.arrays(np.int64, shape, elements=st.integers(-n, n - 1)))


@st.composite
def getitem_case(draw) -> Case:
    kind = draw(st.sampled_from(["basic", "rows", "rows-tensor", "rows-list", "two-arrays", "slice+array",
                                 "mask", "int+array"]))
    if kind == "basic":
        shape = draw(shapes(min_dims=0, max_dims=3))
        idx = draw(basic_index(shape))
    else:
        shape = draw(shapes(min_dims=2 if kind in ("two-arrays", "slice+array", "int+array") else 1, max_dims=3))
        if kind in ("rows", "rows-tensor", "rows-list"):
            idx = draw(int_array(shape[0]))
            if kind == "rows-tensor":
                idx = Tensor(idx)
            elif kind == "rows-list":
                idx = idx.reshape(-1).tolist()
        elif kind == "two-arrays":  # broadcast together, repeats allowed
            i0 = draw(int_array(shape[0], 3))
            i1 = draw(hnp.arrays(np.int64, draw(st.sampled_from([(), (1,), i0.shape[-1:]])),
                                 elements=st.integers(-shape[1], shape[1] - 1)))
            idx = (i0, i1)
        elif kind == "slice+array":
            idx = (slice(None, None, draw(st.sampled_from([1, -1]))), draw(int_array(shape[1])))
        elif kind == "int+array":
            idx = (draw(st.integers(-shape[0], shape[0] - 1)), Ellipsis, draw(int_array(shape[-1])))
        else:
            idx = draw(hnp.arrays(np.bool_, shape[:draw(st.integers(1, len(shape)))]))
    x = draw(arrays(shape))
    return Case(f"tensor{shape}[{idx!r}]", lambda t: t[idx], [x])


@st.composite
def where_case(draw) -> Case:
    bs = draw(hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, max_side=3))
    sc, sa, sb = bs.input_shapes
    cond = draw(hnp.arrays(np.bool_, sc))
    form = draw(st.sampled_from(["tensor,tensor", "tensor,scalar", "scalar,tensor", "masked_fill", "cond-tensor"]))
    a, b = draw(arrays(sa)), draw(arrays(sb))
    if form == "tensor,tensor":
        rg = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
        return Case(f"where(cond{sc}, tensor{sa}, tensor{sb}), requires_grad={rg}",
                    lambda x, y: tensor.where(cond, x, y), [a, b], rg)
    if form == "cond-tensor":
        return Case(f"where(Tensor(cond{sc}), tensor{sa}, tensor{sb})",
                    lambda x, y: tensor.where(Tensor(cond), x, y), [a, b])
    s = draw(st.sampled_from([1.5, -2, np.float64(0.25), np.float32(3.0)]))
    if form == "tensor,scalar":
        return Case(f"where(cond{sc}, tensor{sa}, {s!r})", lambda x: tensor.where(cond, x, s), [a])
    if form == "scalar,tensor":
        return Case(f"where(cond{sc}, {s!r}, tensor{sb})", lambda y: tensor.where(cond, s, y), [b])
    mask = draw(hnp.arrays(np.bool_, draw(hnp.broadcastable_shapes(sa, max_dims=len(sa)))))
    return Case(f"tensor{sa}.masked_fill(mask{mask.shape}, {s!r})", lambda x: x.masked_fill(mask, s), [a])


GRAD_CASES = {"GetItem": getitem_case(), "Where": where_case()}
VALUE_TESTED: set = set()

test_gradients = grad_property(GRAD_CASES)


@given(data=st.data())
def test_getitem_values_match_numpy(data):
    case = data.draw(getitem_case())
    x = case.arrays[0]
    out = case.fn(Tensor(x))
    idx = case.label  # for the message
    ref = case.fn(_NumpyProxy(x))
    np.testing.assert_array_equal(out.numpy(), ref, err_msg=idx)


class _NumpyProxy:
    """Indexes the raw array exactly as NumPy would (Tensors in the index become arrays)."""

    def __init__(self, x):
        self.x = x

    def __getitem__(self, idx):
        if isinstance(idx, Tensor):
            idx = idx.numpy()
        return self.x[idx]


def test_repeated_indices_accumulate():
    x = t64([10.0, 20.0, 30.0])
    x[np.array([0, 2, 0, 0, -1])].sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 0.0, 2.0])
    y = t64(np.zeros((2, 3)))
    y[np.array([1, 1]), np.array([0, 0])].sum().backward()
    np.testing.assert_array_equal(y.grad, [[0, 0, 0], [2, 0, 0]])
    z = t64(np.zeros((3, 2)))
    z[[2, 2, 2]].sum().backward()
    np.testing.assert_array_equal(z.grad, [[0, 0], [0, 0], [3, 3]])


def test_getitem_error_names_index_and_shape():
    with pytest.raises(IndexError, match=r"getitem: index .*5.* shape \(2, 3\)"):
        t64(np.ones((2, 3)))[5]


def test_where_and_masked_fill_values():
    x = t64([1.0, -2.0, 3.0])
    y = tensor.where(x > 0, x, 0.0)
    np.testing.assert_array_equal(y.numpy(), [1.0, 0.0, 3.0])
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0, 0.0, 1.0])
    m = t64([1.0, 2.0, 3.0]).masked_fill(np.array([True, False, True]), -np.inf)
    np.testing.assert_array_equal(m.numpy(), [-np.inf, 2.0, -np.inf])


def test_where_requires_boolean_condition():
    with pytest.raises(TypeError, match="where: condition must be boolean"):
        tensor.where(np.array([1, 0]), t64([1.0, 2.0]), 0.0)


def test_masked_fill_float32_stays_float32():
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    y = x.masked_fill(np.array([True, False, False]), np.float64(-1e9))
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32
