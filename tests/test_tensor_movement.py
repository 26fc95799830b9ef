"""Movement ops: reshape/view/flatten/squeeze/unsqueeze, permute/transpose/swapaxes/.T, broadcast_to/expand,
concatenate, stack, split, cast, to-device."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tensor
from tensor import Tensor, gradcheck
from tensor.ops.movement import Cast, ToDevice
from test_tensor_common import Case, arrays, grad_property, shapes, t64


def _primes(n: int) -> list:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


@st.composite
def reshape_target(draw, shape: tuple) -> tuple:
    """Another shape with the same number of elements (ones sprinkled in, maybe one -1)."""
    n = int(np.prod(shape, dtype=int))
    ndim = draw(st.integers(1 if n > 1 else 0, 3))
    dims = [1] * ndim
    for p in _primes(n):
        dims[draw(st.integers(0, ndim - 1))] *= p
    for _ in range(draw(st.integers(0, 1))):
        dims.insert(draw(st.integers(0, len(dims))), 1)
    if dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    return tuple(dims)


@st.composite
def reshape_case(draw) -> Case:
    shape = draw(shapes(max_dims=4))
    x = draw(arrays(shape))
    nd = len(shape)
    kind = draw(st.sampled_from(["reshape", "reshape(*)", "view", "flatten", "squeeze", "unsqueeze"]))
    if kind in ("reshape", "reshape(*)", "view"):
        target = draw(reshape_target(shape))
        if kind == "reshape":
            return Case(f"tensor{shape}.reshape({target})", lambda t: t.reshape(target), [x])
        if kind == "view":
            return Case(f"tensor{shape}.view(*{target})", lambda t: t.view(*target), [x])
        return Case(f"tensor{shape}.reshape(*{target})", lambda t: t.reshape(*target), [x])
    if kind == "flatten":
        return Case(f"tensor{shape}.flatten()", lambda t: t.flatten(), [x])
    if kind == "unsqueeze":
        ax = draw(st.integers(-nd - 1, nd))
        fn = draw(st.sampled_from(["method", "function"]))
        return Case(f"unsqueeze(tensor{shape}, {ax}) [{fn}]",
                    (lambda t: t.unsqueeze(ax)) if fn == "method" else (lambda t: tensor.unsqueeze(t, ax)), [x])
    ones = [i for i, n in enumerate(shape) if n == 1]
    choice = draw(st.sampled_from(["none", "int", "tuple"] if ones else ["none"]))
    if choice == "none":
        ax = None
    elif choice == "int":
        i = draw(st.sampled_from(ones))
        ax = draw(st.sampled_from([i, i - nd]))
    else:
        ax = tuple(draw(st.lists(st.sampled_from(ones), unique=True, min_size=1)))
    fn = draw(st.sampled_from(["method", "function"]))
    return Case(f"squeeze(tensor{shape}, {ax}) [{fn}]",
                (lambda t: t.squeeze(ax)) if fn == "method" else (lambda t: tensor.squeeze(t, ax)), [x])


@st.composite
def permute_case(draw) -> Case:
    shape = draw(shapes(min_dims=0, max_dims=4))
    x = draw(arrays(shape))
    nd = len(shape)
    kind = draw(st.sampled_from(["permute", "permute(*)", "transpose()", ".T"] + (["swapaxes", "transpose(a,b)"] if nd else [])))
    if kind.startswith("permute"):
        perm = draw(st.permutations(range(nd)))
        perm = tuple(draw(st.sampled_from([a, a - nd])) for a in perm)  # negative axes too
        if kind == "permute":
            return Case(f"tensor{shape}.permute({perm})", lambda t: t.permute(perm), [x])
        return Case(f"tensor{shape}.permute(*{perm})", lambda t: t.permute(*perm), [x])
    if kind == "transpose()":
        return Case(f"tensor{shape}.transpose()", lambda t: t.transpose(), [x])
    if kind == ".T":
        return Case(f"tensor{shape}.T", lambda t: t.T, [x])
    a, b = draw(st.integers(-nd, nd - 1)), draw(st.integers(-nd, nd - 1))
    if kind == "swapaxes":
        return Case(f"tensor{shape}.swapaxes({a}, {b})", lambda t: t.swapaxes(a, b), [x])
    return Case(f"tensor{shape}.transpose({a}, {b})", lambda t: t.transpose(a, b), [x])


@st.composite
def broadcast_case(draw) -> Case:
    shape = draw(shapes(max_dims=3))
    lead = draw(shapes(max_dims=2, max_size=4))
    target = lead + tuple(draw(st.integers(1, 3)) if n == 1 else n for n in shape)
    x = draw(arrays(shape))
    if draw(st.booleans()):
        return Case(f"tensor{shape}.broadcast_to({target})", lambda t: t.broadcast_to(target), [x])
    return Case(f"tensor{shape}.expand(*{target})", lambda t: t.expand(*target), [x])


@st.composite
def join_inputs(draw, same: bool) -> tuple:
    base = draw(shapes(min_dims=0 if same else 1, max_dims=3, max_size=8))
    k = draw(st.integers(1, 3))
    if same:
        shs = [base] * k
        axis = draw(st.integers(-len(base) - 1, len(base)))
    else:
        axis = draw(st.integers(-len(base), len(base) - 1))
        shs = [tuple(draw(st.integers(1, 3)) if i == axis % len(base) else n for i, n in enumerate(base))
               for _ in range(k)]
    xs = [draw(arrays(s)) for s in shs]
    rg = draw(st.lists(st.booleans(), min_size=k, max_size=k).filter(any))
    return xs, axis, rg


@st.composite
def concatenate_case(draw) -> Case:
    xs, axis, rg = draw(join_inputs(same=False))
    f = draw(st.sampled_from([tensor.concatenate, tensor.cat]))
    return Case(f"concatenate({[x.shape for x in xs]}, axis={axis}), requires_grad={rg}",
                lambda *ts: f(list(ts), axis=axis), xs, rg)


@st.composite
def stack_case(draw) -> Case:
    xs, axis, rg = draw(join_inputs(same=True))
    return Case(f"stack({[x.shape for x in xs]}, axis={axis}), requires_grad={rg}",
                lambda *ts: tensor.stack(list(ts), axis=axis), xs, rg)


@st.composite
def cast_case(draw) -> Case:
    shape = draw(shapes())
    x = draw(arrays(shape))
    # float64 -> longdouble -> float64 keeps full precision, so finite differences stay meaningful
    return Case(f"cast tensor{shape} float64 -> longdouble -> float64",
                lambda t: (t.astype(np.longdouble) * 3).astype(np.float64), [x], low_precision=False)


@st.composite
def to_device_case(draw) -> Case:
    shape = draw(shapes())
    return Case(f"ToDevice(tensor{shape}, 'cpu')", lambda t: ToDevice.apply(t, device="cpu") * 2, [draw(arrays(shape))])


GRAD_CASES = {
    "Reshape": reshape_case(),
    "Permute": permute_case(),
    "BroadcastTo": broadcast_case(),
    "Concatenate": concatenate_case(),
    "Stack": stack_case(),
    "Cast": cast_case(),
    "ToDevice": to_device_case(),
}
VALUE_TESTED: set = set()

test_gradients = grad_property(GRAD_CASES)


# ------------------------------------------------------------------ split (built on getitem)
@given(data=st.data())
def test_split_gradients(data):
    shape = data.draw(shapes(min_dims=1, max_dims=3))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    if data.draw(st.booleans()):
        sections = data.draw(st.integers(1, n + 1))
        sizes = [min(sections, n - s) for s in range(0, n, sections)]
    else:
        cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
        sizes = list(np.diff([0] + cuts + [n]))
        sections = sizes
    x = data.draw(arrays(shape))
    pieces = Tensor(x).split(sections, axis=axis)
    assert [p.shape[axis] for p in pieces] == sizes
    np.testing.assert_array_equal(np.concatenate([p.numpy() for p in pieces], axis=axis), x)
    weights = [float(i + 1) for i in range(len(sizes))]  # each piece counted with its own weight
    assert gradcheck(lambda t: tensor.concatenate([p * w for p, w in zip(tensor.split(t, sections, axis), weights)],
                                                  axis=axis), [t64(x)])


def test_split_errors():
    x = t64(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"split: sizes \[1, 2\] do not sum to 4"):
        x.split([1, 2])
    with pytest.raises(ValueError, match="split: piece size must be positive"):
        x.split(0)


# ------------------------------------------------------------------ values and errors
def test_movement_values():
    x = Tensor(np.arange(6.0).reshape(2, 3))
    assert x.T.shape == (3, 2) and x.T.tolist() == [[0, 3], [1, 4], [2, 5]]
    assert x.reshape(3, -1).shape == (3, 2)
    assert x.unsqueeze(0).shape == (1, 2, 3) and x.unsqueeze(-1).shape == (2, 3, 1)
    assert x.unsqueeze(1).squeeze().shape == (2, 3)
    assert tensor.stack([x, x], axis=-1).shape == (2, 3, 2)
    assert tensor.concatenate([x, x], axis=1).tolist() == [[0, 1, 2, 0, 1, 2], [3, 4, 5, 3, 4, 5]]
    assert x.broadcast_to((4, 2, 3)).shape == (4, 2, 3)


def test_broadcast_to_sums_gradient():
    x = t64([[1.0], [2.0]])
    x.broadcast_to((3, 2, 4)).sum().backward()
    np.testing.assert_array_equal(x.grad, [[12.0], [12.0]])


def test_movement_errors_name_op_and_shapes():
    x = t64(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"reshape: cannot reshape a tensor of shape \(2, 3\) \(6 elements\) into \(4, 2\)"):
        x.reshape(4, 2)
    with pytest.raises(ValueError, match=r"broadcast_to: cannot broadcast shape \(2, 3\) to \(2, 4\)"):
        x.broadcast_to((2, 4))
    with pytest.raises(ValueError, match="permute"):
        x.permute(0, 0)
    with pytest.raises(ValueError, match="concatenate"):
        tensor.concatenate([x, t64(np.ones((3, 3)))], axis=1)
    with pytest.raises(ValueError, match="stack"):
        tensor.stack([x, t64(np.ones((3, 2)))])
    with pytest.raises(ValueError, match="squeeze: axis 1"):
        x.squeeze(1)
    with pytest.raises(ValueError, match="concatenate: needs at least one"):
        tensor.concatenate([])


def test_cast_gradient_comes_back_in_input_dtype():
    x = t64([1.0, 2.0])
    y = x.astype(np.float32)
    assert y.dtype == np.float32
    (y * y).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, [2.0, 4.0])
    assert x.double() is x  # same dtype: no op
    assert x.float().dtype == np.float32
