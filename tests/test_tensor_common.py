"""Shared strategies and the generic gradient property for the tests/test_tensor_<family>.py files.

Each family file defines
    GRAD_CASES   = {op name: strategy drawing a `Case`}   for every differentiable op of the family
    VALUE_TESTED = {op name, ...}                          for its non-differentiable ops (value tests)
and `test_gradients = grad_property(GRAD_CASES)`. test_tensor_registry.py checks that together they
cover `tensor.all_ops()`, so a new op cannot slip in without a property test.

The property (`check_case`), for every drawn case:
  1. float64: the op really is in the recorded graph, and `tensor.gradcheck` (central differences)
     agrees with backward for every input; every input receives a gradient of its own shape and dtype.
  2. float32 or float16 (drawn): the same computation keeps that dtype in the forward and in every
     gradient, and its gradients agree (loosely) with the float64 ones just verified against finite
     differences.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensor import Function, Tensor, gradcheck, no_grad

MAX_ELEMS = 24  # per input: keeps 100 examples x every op fast


# ------------------------------------------------------------------ strategies
@st.composite
def shapes(draw, min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 3,
           max_size: int = MAX_ELEMS) -> tuple:
    """A shape with at most `max_size` elements."""
    nd = draw(st.integers(min_dims, max_dims))
    shape, size = [], 1
    for _ in range(nd):
        hi = max(min_side, min(max_side, max_size // size))
        s = draw(st.integers(min_side, hi))
        shape.append(s)
        size *= s
    return tuple(shape)


def floats(lo: float = -2.0, hi: float = 2.0) -> st.SearchStrategy:
    """Finite floats that float32 represents exactly (so float32 and float64 runs see the same inputs)."""
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32)


def away_from_zero(lo: float = 0.1, hi: float = 2.0) -> st.SearchStrategy:
    return st.one_of(floats(lo, hi), floats(-hi, -lo))


def lattice(offset: float = 0.0, k: int = 8, step: float = 0.25) -> st.SearchStrategy:
    """Values offset + i*step: two lattices with different offsets never meet (no ties, no kinks)."""
    return st.integers(-k, k).map(lambda i: offset + i * step)


def arrays(shape: tuple, elements: st.SearchStrategy | None = None) -> st.SearchStrategy:
    return hnp.arrays(np.float64, shape, elements=elements if elements is not None else floats())


@st.composite
def distinct_array(draw, shape: tuple, step: float = 0.25, offset: float = 0.125) -> np.ndarray:
    """All elements different (>= step apart): no ties for max, no kinks for relu/abs."""
    n = int(np.prod(shape, dtype=int))
    perm = np.array(draw(st.permutations(range(n))), dtype=np.float64)
    return ((perm - n // 2) * step + offset).reshape(shape)


@st.composite
def axes_for(draw, ndim: int, allow_none: bool = True) -> Any:
    """None, an int (possibly negative) or a tuple of distinct axes (possibly negative, possibly empty)."""
    kinds = ["int", "tuple"] if ndim else []
    if allow_none:
        kinds.append("none")
    if not kinds:
        return None
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    chosen = draw(st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim))
    return tuple(draw(st.sampled_from([a, a - ndim])) for a in chosen)


def scalar_operands(values: st.SearchStrategy) -> st.SearchStrategy:
    """A scalar operand in every form a user writes: Python float/int, NumPy float64/float32 scalars."""
    return st.one_of(
        values.map(float),
        values.filter(lambda v: float(v).is_integer()).map(int),
        values.map(np.float64),
        values.map(np.float32),
    )


# ------------------------------------------------------------------ cases
@dataclass
class Case:
    """fn(*tensors) -> Tensor, the float64 arrays those tensors are made of, and what to expect."""
    label: str
    fn: Callable[..., Tensor]
    arrays: Sequence[np.ndarray]
    requires_grad: Sequence[bool] | None = None  # default: every input
    low_precision: bool = True  # also run the float32/float16 check
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        shapes_ = ", ".join(str(a.shape) for a in self.arrays)
        return f"Case({self.label}; input shapes {shapes_}; arrays={[a.tolist() for a in self.arrays]})"


class Probe(Function):
    """Identity that checks the gradient flowing back into an input has the input's shape and dtype."""
    # d x/dx = 1
    def forward(self, x):
        self.shape, self.dtype = x.shape, x.dtype
        return x

    def backward(self, g):
        assert g.shape == self.shape, f"gradient of shape {g.shape} for an input of shape {self.shape}"
        assert g.dtype == self.dtype, f"gradient of dtype {g.dtype} for an input of dtype {self.dtype}"
        return (g,)


def graph_ops(out: Tensor) -> set:
    """Names of the Functions recorded in the graph that produced `out`."""
    names, seen, stack = set(), set(), [out._ctx]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        names.add(fn.name)
        stack.extend(i for i in fn.inputs if isinstance(i, Function))  # an op's inputs made by ops are those ops
    return names


def _probed(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    return lambda *ts: fn(*[Probe.apply(t) for t in ts])


LOW_TOL = {np.float32: (1e-3, 1e-4), np.float16: (3e-2, 3e-2)}  # (rtol, atol relative to the largest gradient)


def check_case(op: str, case: Case, low: Any = np.float32) -> None:
    rg = tuple(case.requires_grad) if case.requires_grad is not None else (True,) * len(case.arrays)
    fn = _probed(case.fn)

    # float64: finite differences
    ins = [Tensor(np.array(a, dtype=np.float64), requires_grad=r) for a, r in zip(case.arrays, rg)]
    out = fn(*ins)
    assert op in graph_ops(out), f"{case.label} does not record {op} (graph: {sorted(graph_ops(out))})"
    assert out.dtype == np.float64, f"{case.label}: float64 inputs gave a {out.dtype} output"
    assert type(out.data) is np.ndarray, f"{case.label}: data is a {type(out.data).__name__}, not an ndarray"
    assert gradcheck(fn, ins)
    ref = [t.grad for t in ins]
    for t, r in zip(ins, rg):  # .grad: an owned, writable ndarray (optimizers update it in place)
        if r:
            assert type(t.grad) is np.ndarray and t.grad.flags.writeable and t.grad.base is None, case.label

    if not case.low_precision:
        return
    # float32 (or float16): dtype kept everywhere, gradients close to the verified float64 ones
    ins32 = [Tensor(np.array(a, dtype=low), requires_grad=r) for a, r in zip(case.arrays, rg)]
    out32 = fn(*ins32)
    expect = case.extra.get("out_dtype", {}).get(low, low)  # losses of half inputs are float32
    assert out32.dtype == expect, f"{case.label}: {np.dtype(low)} inputs gave a {out32.dtype} output"
    v = np.random.default_rng(0).standard_normal(out32.shape) if out32.shape else 1.0  # gradcheck's v
    out32.backward(np.asarray(v, dtype=out32.dtype))
    rtol, atol = LOW_TOL[low]
    for t, r, g64 in zip(ins32, rg, ref):
        if not r:
            continue
        assert t.grad is not None and t.grad.dtype == low and t.grad.shape == t.shape
        scale = max(1.0, float(np.abs(g64).max(initial=0.0)))
        np.testing.assert_allclose(t.grad.astype(np.float64), g64, rtol=rtol, atol=atol * scale, err_msg=case.label)


def grad_property(cases: dict) -> Callable:
    """The parametrized hypothesis test of one family: one test id per op."""
    @pytest.mark.parametrize("op", sorted(cases))
    @given(data=st.data())
    def test_gradients(op: str, data: st.DataObject) -> None:
        case = data.draw(cases[op], label="case")
        check_case(op, case, data.draw(st.sampled_from([np.float32, np.float16]), label="low precision dtype"))
    return test_gradients


def t64(a: Any, requires_grad: bool = True) -> Tensor:
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad)


def eval_no_grad(fn: Callable[[], Tensor]) -> np.ndarray:
    with no_grad():
        return fn().numpy()
