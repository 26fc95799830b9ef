"""Reductions over `axis` (None, int or tuple of ints) with `keepdims`.

Backward of a reduction puts the reduced axes back (size 1) and broadcasts the
gradient over them.
"""
from __future__ import annotations

from typing import Any

from tensor.backend import array_module
from tensor.tensor import Function


def normalize_axis(axis: Any, ndim: int, op: str) -> tuple:
    """axis (None, int, or tuple) -> sorted tuple of non-negative axes; errors name the op."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"{op}: axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim if ndim else 0)
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: repeated axis in {axis}")
    return tuple(sorted(out))


def expand_reduced(g: Any, shape: tuple, axes: tuple, keepdims: bool) -> Any:
    """Broadcast a reduced gradient back to the input's `shape`."""
    if not keepdims and axes:
        g = g.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return array_module(g).broadcast_to(g, shape)


class Sum(Function):
    # d sum(x)/dx_i = 1
    def forward(self, x, axis=None, keepdims=False):
        self.shape, self.axes, self.keepdims = x.shape, normalize_axis(axis, x.ndim, "sum"), keepdims
        return x.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        return (expand_reduced(g, self.shape, self.axes, self.keepdims),)


class Mean(Function):
    # d mean(x)/dx_i = 1/n
    def forward(self, x, axis=None, keepdims=False):
        self.shape, self.axes, self.keepdims = x.shape, normalize_axis(axis, x.ndim, "mean"), keepdims
        self.n = 1
        for a in self.axes:
            self.n *= x.shape[a]
        return x.mean(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        return (expand_reduced(g / self.n, self.shape, self.axes, self.keepdims),)


class Max(Function):
    """Maximum over axes. Ties share the gradient equally: if k elements all equal
    the maximum, each receives 1/k of it (so the total is preserved)."""
    # d max(x)/dx_i = [x_i == max] / (number of ties)
    def forward(self, x, axis=None, keepdims=False):
        self.axes, self.keepdims = normalize_axis(axis, x.ndim, "max"), keepdims
        if x.size == 0:
            raise ValueError(f"max: cannot reduce an empty tensor of shape {x.shape}")
        m = x.max(axis=self.axes, keepdims=True)
        self.save_for_backward(x == m)
        return m if keepdims else m.reshape(tuple(n for i, n in enumerate(x.shape) if i not in self.axes))

    def backward(self, g):
        winners = self.saved[0]
        w = winners.astype(g.dtype)
        w /= w.sum(axis=self.axes, keepdims=True)
        if not self.keepdims:
            g = g.reshape(tuple(1 if i in self.axes else n for i, n in enumerate(w.shape)))
        return (w * g,)


class Var(Function):
    """Variance over axes, divided by (n - ddof)."""
    # d var(x)/dx_i = 2 (x_i - mean) / (n - ddof)
    def forward(self, x, axis=None, keepdims=False, ddof=0):
        self.axes, self.keepdims, self.shape = normalize_axis(axis, x.ndim, "var"), keepdims, x.shape
        n = 1
        for a in self.axes:
            n *= x.shape[a]
        if n - ddof <= 0:
            raise ValueError(f"var: {n} elements with ddof={ddof} leave no degrees of freedom")
        self.denom = n - ddof
        centered = x - x.mean(axis=self.axes, keepdims=True)
        self.save_for_backward(centered)
        return (centered * centered).sum(axis=self.axes, keepdims=keepdims) / self.denom

    def backward(self, g):
        centered = self.saved[0]
        g = expand_reduced(g, self.shape, self.axes, self.keepdims)
        return (g * centered * (2.0 / self.denom),)


class LogSumExp(Function):
    """log(sum(exp(x))) over axes, computed stably by subtracting the max."""
    # d lse(x)/dx_i = softmax(x)_i
    def forward(self, x, axis=None, keepdims=False):
        xp = array_module(x)
        self.axes, self.keepdims, self.shape = normalize_axis(axis, x.ndim, "logsumexp"), keepdims, x.shape
        m = x.max(axis=self.axes, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0)
        out = xp.log(xp.exp(x - m).sum(axis=self.axes, keepdims=True)) + m
        self.save_for_backward(x, out)
        return out if keepdims else out.reshape(tuple(n for i, n in enumerate(x.shape) if i not in self.axes))

    def backward(self, g):
        x, out = self.saved
        xp = array_module(x)
        g = expand_reduced(g, self.shape, self.axes, self.keepdims)
        return (g * xp.exp(x - out),)


class ArgMax(Function):
    """Index of the maximum along `axis` (the first on ties); no gradient."""
    differentiable = False

    def forward(self, x, axis=None, keepdims=False):
        xp = array_module(x)
        out = xp.argmax(x, axis=axis)
        if keepdims:
            out = xp.expand_dims(out, axis) if axis is not None else out.reshape((1,) * x.ndim)
        return out

    def backward(self, g):  # pragma: no cover
        raise RuntimeError("argmax has no gradient")
