"""Elementwise ops. Binary ops broadcast like NumPy; their backward sums the
gradient back to each input's shape (`unbroadcast`)."""
from __future__ import annotations

import math
from typing import Any

from tensor.backend import array_module
from tensor.tensor import Function, unbroadcast


def _shape(x: Any) -> tuple:
    return getattr(x, "shape", ())


class Add(Function):
    # d(a+b)/da = 1, d(a+b)/db = 1
    def forward(self, a, b):
        self.sa, self.sb = _shape(a), _shape(b)
        return a + b

    def backward(self, g):
        return unbroadcast(g, self.sa), unbroadcast(g, self.sb)


class Sub(Function):
    # d(a-b)/da = 1, d(a-b)/db = -1
    def forward(self, a, b):
        self.sa, self.sb = _shape(a), _shape(b)
        return a - b

    def backward(self, g):
        return unbroadcast(g, self.sa), (unbroadcast(-g, self.sb) if self.needs_grad[1] else None)


class Mul(Function):
    # d(a*b)/da = b, d(a*b)/db = a
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g * b, _shape(a)) if self.needs_grad[0] else None
        gb = unbroadcast(g * a, _shape(b)) if self.needs_grad[1] else None
        return ga, gb


class Div(Function):
    # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g / b, _shape(a)) if self.needs_grad[0] else None
        gb = unbroadcast(-g * a / (b * b), _shape(b)) if self.needs_grad[1] else None
        return ga, gb


class Pow(Function):
    # d(a^b)/da = b*a^(b-1), d(a^b)/db = a^b * log(a)
    def forward(self, a, b):
        out = a ** b
        self.save_for_backward(a, b, out)
        return out

    def backward(self, g):
        a, b, out = self.saved
        ga = gb = None
        if self.needs_grad[0]:
            ga = unbroadcast(g * b * a ** (b - 1), _shape(a))
        if self.needs_grad[1]:
            xp = array_module(out)
            gb = unbroadcast(g * out * xp.log(xp.asarray(a, dtype=out.dtype)), _shape(b))  # a may be a Python scalar
        return ga, gb


class Neg(Function):
    # d(-a)/da = -1
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Exp(Function):
    # d exp(a)/da = exp(a)
    def forward(self, a):
        out = array_module(a).exp(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        return (g * self.saved[0],)


class Log(Function):
    # d log(a)/da = 1/a
    def forward(self, a):
        self.save_for_backward(a)
        return array_module(a).log(a)

    def backward(self, g):
        return (g / self.saved[0],)


class Sqrt(Function):
    # d sqrt(a)/da = 1/(2 sqrt(a))
    def forward(self, a):
        out = array_module(a).sqrt(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        return (g / (2.0 * self.saved[0]),)


class Tanh(Function):
    # d tanh(a)/da = 1 - tanh(a)^2
    def forward(self, a):
        out = array_module(a).tanh(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        t = self.saved[0]
        return (g * (1.0 - t * t),)


class Sigmoid(Function):
    # d s(a)/da = s(a) (1 - s(a))
    def forward(self, a):
        xp = array_module(a)
        out = 0.5 * (xp.tanh(0.5 * a) + 1.0)  # = 1/(1+exp(-a)), without overflow
        self.save_for_backward(out)
        return out

    def backward(self, g):
        s = self.saved[0]
        return (g * s * (1.0 - s),)


class Relu(Function):
    # d relu(a)/da = 1 where a > 0 else 0 (0 at a == 0)
    def forward(self, a):
        self.save_for_backward(a > 0)
        return array_module(a).maximum(a, 0)

    def backward(self, g):
        return (g * self.saved[0],)


GELU_K = math.sqrt(2.0 / math.pi)


class Gelu(Function):
    """GELU, tanh approximation: y = 0.5 a (1 + tanh(k (a + 0.044715 a^3))), k = sqrt(2/pi); same shape as a.
    Fast paths: tensor/cpu/gelu.py (cache-sized blocks), tensor/cuda/gelu.py (one kernel)."""
    # dy/da = 0.5 (1 + t) + 0.5 a (1 - t^2) k (1 + 3*0.044715 a^2),  t = tanh(k (a + 0.044715 a^3))
    def forward(self, a):
        t = array_module(a).tanh(GELU_K * (a + 0.044715 * a * a * a))
        self.save_for_backward(a, t)
        return (0.5 * a * (1.0 + t)).astype(a.dtype, copy=False)   # (CuPy's tanh of bfloat16 is float32)

    def backward(self, g):
        a, t = self.saved
        return (g * (0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * GELU_K * (1.0 + 3 * 0.044715 * a * a)),)


class Abs(Function):
    # d|a|/da = sign(a) (0 at a == 0)
    def forward(self, a):
        self.save_for_backward(a)
        return array_module(a).abs(a)

    def backward(self, g):
        return (g * array_module(g).sign(self.saved[0]),)


class Maximum(Function):
    """Elementwise max. Where a == b the gradient is split equally (1/2 each)."""
    # d max(a,b)/da = 1 where a > b, 1/2 where a == b, 0 elsewhere
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return array_module(a if hasattr(a, "shape") else b).maximum(a, b)

    def backward(self, g):
        a, b = self.saved
        wa = _tie_weights(a > b, a == b, g.dtype)
        ga = unbroadcast(g * wa, _shape(a)) if self.needs_grad[0] else None
        gb = unbroadcast(g * (1.0 - wa), _shape(b)) if self.needs_grad[1] else None
        return ga, gb


class Minimum(Function):
    """Elementwise min. Where a == b the gradient is split equally (1/2 each)."""
    # d min(a,b)/da = 1 where a < b, 1/2 where a == b, 0 elsewhere
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return array_module(a if hasattr(a, "shape") else b).minimum(a, b)

    def backward(self, g):
        a, b = self.saved
        wa = _tie_weights(a < b, a == b, g.dtype)
        ga = unbroadcast(g * wa, _shape(a)) if self.needs_grad[0] else None
        gb = unbroadcast(g * (1.0 - wa), _shape(b)) if self.needs_grad[1] else None
        return ga, gb


class Clip(Function):
    # d clip(a, lo, hi)/da = 1 where lo <= a <= hi else 0
    def forward(self, a, lo=None, hi=None):
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"Clip: lo={lo} is greater than hi={hi}")
        xp = array_module(a)
        inside = xp.ones(a.shape, dtype=bool)
        if lo is not None:
            inside &= a >= lo
        if hi is not None:
            inside &= a <= hi
        self.save_for_backward(inside)
        return xp.clip(a, lo, hi).astype(a.dtype, copy=False)

    def backward(self, g):
        return (g * self.saved[0],)


class Compare(Function):
    """a == b, !=, <, <=, >, >= : a boolean tensor, no gradient."""
    differentiable = False

    def forward(self, a, b, op="eq"):
        xp = array_module(a if hasattr(a, "shape") else b)
        ufuncs = {"eq": xp.equal, "ne": xp.not_equal, "lt": xp.less, "le": xp.less_equal,
                  "gt": xp.greater, "ge": xp.greater_equal}
        return xp.asarray(ufuncs[op](a, b))

    def backward(self, g):  # pragma: no cover - never called
        raise RuntimeError("comparisons have no gradient")



def _tie_weights(wins: Any, ties: Any, dtype: Any) -> Any:
    """1 where this side wins, 1/2 on ties, 0 elsewhere, in the gradient's dtype."""
    return wins.astype(dtype) + ties.astype(dtype) * 0.5
