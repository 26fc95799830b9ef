"""Movement ops: they rearrange elements without arithmetic, so each backward
rearranges the gradient the opposite way."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tensor import backend
from tensor.backend import array_module
from tensor.tensor import Function, Tensor, shape_str, unbroadcast


class Reshape(Function):
    # backward: reshape the gradient back
    def forward(self, x, shape=()):
        self.in_shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {shape_str(x)} "
                             f"({x.size} elements) into {tuple(shape)}") from None

    def backward(self, g):
        return (g.reshape(self.in_shape),)


class Permute(Function):
    # backward: permute by the inverse permutation
    def forward(self, x, axes=()):
        if sorted(a % max(x.ndim, 1) for a in axes) != list(range(x.ndim)):
            raise ValueError(f"permute: axes {axes} are not a permutation of the {x.ndim} axes of {shape_str(x)}")
        self.axes = tuple(a % x.ndim for a in axes)
        return x.transpose(self.axes)

    def backward(self, g):
        return (g.transpose(np.argsort(self.axes)),)


class BroadcastTo(Function):
    # backward: sum over the broadcast axes
    def forward(self, x, shape=()):
        self.in_shape = x.shape
        try:
            return array_module(x).broadcast_to(x, shape)
        except ValueError:
            raise ValueError(f"broadcast_to: cannot broadcast shape {shape_str(x)} to {tuple(shape)}") from None

    def backward(self, g):
        return (unbroadcast(g, self.in_shape),)


class Concatenate(Function):
    # backward: split the gradient at the input boundaries
    def forward(self, *xs, axis=0):
        ref = xs[0]
        for x in xs[1:]:
            if x.ndim != ref.ndim or any(a != b for i, (a, b) in enumerate(zip(x.shape, ref.shape))
                                         if i != axis % ref.ndim):
                raise ValueError(f"concatenate: shapes {[shape_str(v) for v in xs]} differ outside axis {axis}")
        self.axis = axis % ref.ndim
        self.bounds = np.cumsum([x.shape[self.axis] for x in xs])[:-1].tolist()
        return array_module(ref).concatenate(xs, axis=self.axis)

    def backward(self, g):
        return tuple(array_module(g).split(g, self.bounds, axis=self.axis))


class Stack(Function):
    # backward: take each input's slice of the gradient
    def forward(self, *xs, axis=0):
        if len({x.shape for x in xs}) != 1:
            raise ValueError(f"stack: all shapes must be equal, got {[shape_str(v) for v in xs]}")
        self.axis = axis % (xs[0].ndim + 1)
        return array_module(xs[0]).stack(xs, axis=self.axis)

    def backward(self, g):
        return tuple(g.take(i, axis=self.axis) for i in range(g.shape[self.axis]))


class Cast(Function):
    # backward: cast the gradient back to the input's dtype
    def forward(self, x, dtype=None):
        self.in_dtype = x.dtype
        return x.astype(dtype)

    def backward(self, g):
        return (g.astype(self.in_dtype),)


class ToDevice(Function):
    # backward: move the gradient back to the input's device
    def forward(self, x, device="cpu"):
        self.in_device = backend.device_of(x)
        return backend.to_device(x, device)

    def backward(self, g):
        return (backend.to_device(g, self.in_device),)


# ---------------------------------------------------------------- helpers built on the ops
def concatenate(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    if not tensors:
        raise ValueError("concatenate: needs at least one tensor")
    return Concatenate.apply(*tensors, axis=axis)


cat = concatenate


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join equal-shaped tensors along a new axis."""
    if not tensors:
        raise ValueError("stack: needs at least one tensor")
    return Stack.apply(*tensors, axis=axis)


def squeeze(x: Tensor, axis: Any = None) -> Tensor:
    """Drop size-1 axes (all of them, or the given ones)."""
    if axis is None:
        shape = tuple(n for n in x.shape if n != 1)
    else:
        axes = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
        bad = [a for a in axes if x.shape[a] != 1]
        if bad:
            raise ValueError(f"squeeze: axis {bad[0]} of shape {x.shape} has size {x.shape[bad[0]]}, not 1")
        shape = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    return x.reshape(shape)


def unsqueeze(x: Tensor, axis: int) -> Tensor:
    """Insert a size-1 axis at `axis`."""
    axis = axis % (x.ndim + 1)
    return x.reshape(x.shape[:axis] + (1,) + x.shape[axis:])


def split(x: Tensor, sections: Any, axis: int = 0) -> list[Tensor]:
    """Split into pieces: `sections` is a piece size (the last may be smaller, as in
    PyTorch) or a list of sizes summing to the axis length."""
    n = x.shape[axis]
    if isinstance(sections, int):
        if sections <= 0:
            raise ValueError(f"split: piece size must be positive, got {sections}")
        sizes = [min(sections, n - s) for s in range(0, n, sections)]
    else:
        sizes = list(sections)
        if sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} do not sum to {n}, the length of axis {axis} of {x.shape}")
    out, start = [], 0
    index: list[Any] = [slice(None)] * x.ndim
    for s in sizes:
        index[axis % x.ndim] = slice(start, start + s)
        out.append(x[tuple(index)])
        start += s
    return out
