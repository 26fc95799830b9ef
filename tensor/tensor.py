"""The autograd core: `Function` (one op, forward and backward side by side),
`Tensor` (an array plus the op that made it); the reverse-mode engine is in tensor/autograd.py.

How it works, in four lines:
  * `SomeOp.apply(*inputs)` runs `forward` on the raw arrays and, in grad mode,
    remembers the op instance as the output's `_ctx` (the "tape" is the graph).
  * `loss.backward()` orders the graph topologically (iteratively: no recursion),
  * then visits it in reverse, calling each op's `backward(grad_out)`, which
    returns one gradient per input; gradients reaching a leaf accumulate in `.grad`.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from tensor import autograd, backend
from tensor.autograd import enable_grad, is_grad_enabled, no_grad, run_backward, shape_str, unbroadcast  # noqa: F401

# ----------------------------------------------------------------- Function
class Function:
    """Base class of every differentiable op.

    A subclass writes `forward(self, *arrays, **attrs) -> array` and
    `backward(self, grad) -> tuple` (one gradient or None per input), and keeps
    what backward needs with `self.save_for_backward(...)`. `self.needs_grad[i]`
    tells backward which inputs want a gradient, so it can skip the rest.

    The graph: `fn.inputs[i]` is input i as the graph sees it: a leaf Tensor, a constant,
    or, for a tensor computed by another op, that op (its Function). Holding the op rather
    than the tensor means an intermediate result is freed as soon as nothing but the
    graph refers to it, unless some op saved it for backward.
    """

    differentiable = True
    # an op that can fold the gradient already waiting for its first input into its own result (one pass
    # instead of its backward and then the engine's add) sets this and takes it as `backward(grad, acc=...)`,
    # returning input 0's gradient plus acc (LayerNorm on the GPU: x is the residual stream, whose other
    # gradient, from the residual add, arrives first)
    adds_to_first_grad = False
    # per-op state, set on the instance when the op runs (class-level defaults keep creating an
    # op cheap: apply() runs for every op of every step)
    saved: tuple | None = ()
    inputs: tuple = ()
    needs_grad: tuple = ()
    versions: tuple = ()
    out_shape: tuple = ()
    out_dtype: Any = None
    out_ref: Any = None

    # subclasses override these two
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, grad: Any) -> tuple:
        raise NotImplementedError

    def save_for_backward(self, *arrays: Any) -> None:
        self.saved = arrays

    @property
    def name(self) -> str:
        """The op's name: its reference Function's, also when a fast path runs it (a subclass
        defined in tensor/cpu/ or tensor/cuda/, chosen by tensor/dispatch.py)."""
        cls = type(self)
        while cls.__module__.startswith(("tensor.cpu.", "tensor.cuda.")):
            cls = cls.__base__
        return cls.__name__

    @classmethod
    def apply(cls, *inputs: Any, **kwargs: Any) -> "Tensor":
        """Run the op on Tensors (or constants) and record it in grad mode."""
        fn = cls()
        arrays = []
        needs = []  # which inputs want a gradient (collected here: one pass over the inputs)
        first = None
        for t in inputs:
            if isinstance(t, Tensor):
                if first is None:
                    first = t
                elif type(t.data) is not type(first.data):
                    raise RuntimeError(f"{fn.name}: inputs are on different devices "
                                       f"({first.device} and {t.device}); move them with .to()")
                arrays.append(t.data)
                needs.append(t.requires_grad)
            else:
                arrays.append(t)
                needs.append(False)
        try:
            data = fn.forward(*arrays, **kwargs)
        except ValueError as e:  # NumPy's broadcast error names neither the op nor which operand
            if "could not be broadcast" not in str(e):
                raise
            raise ValueError(f"{fn.name}: shapes {', '.join(shape_str(a) for a in arrays if hasattr(a, 'shape'))} "
                             f"do not broadcast together") from e
        if isinstance(data, np.generic):  # NumPy returns scalars from full reductions and 0-d ufuncs
            data = np.asarray(data)
        out = Tensor._make(data, False)
        if autograd.grad_enabled and cls.differentiable and any(needs):
            fn.inputs = tuple(t._ctx if isinstance(t, Tensor) and t._ctx is not None else t for t in inputs)
            fn.needs_grad = tuple(needs)
            fn.out_shape, fn.out_dtype = data.shape, data.dtype
            if fn.saved:  # to detect in-place changes later; weak references keep nothing alive
                fn.versions = tuple((weakref.ref(t), t._version) if isinstance(t, Tensor) else None for t in inputs)
                fn.out_ref = weakref.ref(out)
            out.requires_grad = True
            out._ctx = fn
        return out

    def check_versions(self) -> None:
        """Refuse to backprop if data this op saved was changed in place since."""
        if not self.saved:
            return
        for i, rv in enumerate(self.versions):
            t = rv[0]() if rv is not None else None
            if t is not None and t._version != rv[1]:
                raise RuntimeError(
                    f"{self.name}.backward: input {i} of shape {shape_str(t)} was modified in place "
                    f"after it was used (version {t._version}, expected {rv[1]}); the graph still needs it")
        out = self.out_ref() if self.out_ref is not None else None
        if out is not None and out._version != 0:
            raise RuntimeError(f"{self.name}.backward: its output of shape {shape_str(out)} was "
                               f"modified in place after it was computed; the graph still needs it")

    def release(self) -> None:
        """Drop saved buffers after backward (unless retain_graph=True)."""
        if self.saved:
            self.saved = None


# ----------------------------------------------------------------- Tensor
class Tensor:
    """An n-dimensional array (NumPy or CuPy) that records how it was computed.

    Tensor(data, requires_grad=False, dtype=None, device=None). Python numbers
    and lists become float32 (ints stay integer); NumPy arrays keep their dtype.
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_version", "__weakref__")
    __array_priority__ = 100  # make `ndarray * Tensor` call Tensor.__rmul__

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None,
                 device: str | None = None) -> None:
        self.data = backend.as_array(data.data if isinstance(data, Tensor) else data, dtype, device)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx: Function | None = None
        self._version = 0
        if requires_grad and self.data.dtype.kind not in "fc" and not _is_low_float(self.data.dtype):
            raise TypeError(f"Tensor: only floating tensors can require grad, got dtype {self.data.dtype}")

    @classmethod
    def wrap(cls, data: Any) -> "Tensor":
        """A NumPy/CuPy array as a constant Tensor as it is: no copy, no dtype or device checks (for hot
        paths that already hold an array of the right backend, e.g. a KV cache's view)."""
        return cls._make(data, False)

    @classmethod
    def _make(cls, data: Any, requires_grad: bool) -> "Tensor":
        t = object.__new__(cls)
        t.data, t.grad, t.requires_grad, t._ctx, t._version = data, None, requires_grad, None, 0
        return t

    # ------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def T(self) -> "Tensor":
        return self.permute(*reversed(range(self.ndim)))

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        body = np.array2string(backend.to_numpy(self.data), precision=4, threshold=20,
                               edgeitems=3, prefix="Tensor(")
        extra = f", dtype={self.dtype}"
        if self.device != "cpu":
            extra += f", device='{self.device}'"
        if self._ctx is not None:
            extra += f", grad_fn={self._ctx.name}"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"Tensor({body}{extra})"

    # ------------------------------------------------------------ conversion
    def numpy(self) -> np.ndarray:
        """A host NumPy copy of the data (no graph)."""
        return np.array(backend.to_numpy(self.data), copy=True)

    def item(self) -> Any:
        if self.data.size != 1:
            raise ValueError(f"item(): only one-element tensors convert to a Python number, got shape {self.shape}")
        return self.data.item()

    def tolist(self) -> Any:
        return backend.to_numpy(self.data).tolist()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph (shares memory)."""
        return Tensor._make(self.data, False)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if not self.is_leaf and not flag:
            raise RuntimeError("requires_grad_(False) on a non-leaf tensor; use detach()")
        self.requires_grad = flag
        return self

    def to(self, device: str) -> "Tensor":
        """A copy on `device` ('cpu' or 'cuda'); differentiable."""
        backend.check_device(device)
        if device == self.device:
            return self
        from tensor.ops.movement import ToDevice
        return ToDevice.apply(self, device=device)

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def cuda(self) -> "Tensor":
        return self.to("cuda")

    def astype(self, dtype: Any) -> "Tensor":
        """A cast (differentiable; the gradient is cast back)."""
        from tensor.ops.movement import Cast
        if np.dtype(dtype) == self.dtype:
            return self
        return Cast.apply(self, dtype=dtype)

    def float(self) -> "Tensor":
        return self.astype(np.float32)

    def double(self) -> "Tensor":
        return self.astype(np.float64)

    # ------------------------------------------------------------ in place
    def _check_inplace(self, what: str) -> None:
        if self.requires_grad and autograd.grad_enabled:
            raise RuntimeError(f"{what}: in-place change of a tensor of shape {self.shape} that requires "
                               "grad would not be recorded; use an out-of-place op or `with no_grad():`")

    def _inplace_operand(self, other: Any) -> Any:
        return other.data if isinstance(other, Tensor) else other

    def add_(self, other: Any, alpha: float = 1.0) -> "Tensor":
        self._check_inplace("add_")
        o = self._inplace_operand(other)
        self.data += o if alpha == 1.0 else alpha * o
        self._version += 1
        return self

    def sub_(self, other: Any) -> "Tensor":
        return self.add_(other, alpha=-1.0)

    def mul_(self, other: Any) -> "Tensor":
        self._check_inplace("mul_")
        self.data *= self._inplace_operand(other)
        self._version += 1
        return self

    def copy_(self, other: Any) -> "Tensor":
        self._check_inplace("copy_")
        src = self._inplace_operand(other)
        if tuple(getattr(src, "shape", ())) not in ((), self.shape):
            raise ValueError(f"copy_: source of shape {shape_str(src)} does not match tensor of shape {self.shape}")
        self.data[...] = src
        self._version += 1
        return self

    def zero_(self) -> "Tensor":
        return self.fill_(0)

    def fill_(self, value: float) -> "Tensor":
        self._check_inplace("fill_")
        self.data.fill(value)
        self._version += 1
        return self

    def __setitem__(self, index: Any, value: Any) -> None:
        self._check_inplace("__setitem__")
        self.data[_index_arrays(index)] = self._inplace_operand(value)
        self._version += 1

    # ------------------------------------------------------------ autograd
    def backward(self, gradient: Any = None, retain_graph: bool = False) -> None:
        """Backpropagate from this tensor into every leaf that requires grad (tensor/autograd.py).

        `gradient` (dL/dself, same shape) may be omitted only for a one-element tensor.
        Gradients accumulate into `.grad`; saved buffers are freed unless retain_graph.
        """
        autograd.backward(self, gradient, retain_graph)

    # ------------------------------------------------------------ ops (methods)
    # arithmetic, defined in tensor/ops/elementwise.py
    # an add of two dtypes (a 16-bit branch into a float32 residual stream) may take a fast path (one
    # kernel, no cast: tensor/dispatch.py); any other add costs only the dtype comparison
    def __add__(self, o):
        o = _const(o, self)
        if type(o) is Tensor and o.data.dtype != self.data.dtype:
            return pick(E.Add, self.data, o.data).apply(self, o)
        return E.Add.apply(self, o)

    def __radd__(self, o): return E.Add.apply(_const(o, self), self)  # o: a constant (a Tensor took __add__)
    def __sub__(self, o): return E.Sub.apply(self, _const(o, self))
    def __rsub__(self, o): return E.Sub.apply(_const(o, self), self)
    def __mul__(self, o): return E.Mul.apply(self, _const(o, self))
    def __rmul__(self, o): return E.Mul.apply(_const(o, self), self)
    def __truediv__(self, o): return E.Div.apply(self, _const(o, self))
    def __rtruediv__(self, o): return E.Div.apply(_const(o, self), self)
    def __pow__(self, o): return E.Pow.apply(self, _const(o, self))
    def __rpow__(self, o): return E.Pow.apply(_const(o, self), self)
    def __neg__(self): return E.Neg.apply(self)
    def __matmul__(self, o): return M.MatMul.apply(self, _const(o, self))
    def __rmatmul__(self, o): return M.MatMul.apply(_const(o, self), self)

    def exp(self) -> "Tensor": return E.Exp.apply(self)
    def log(self) -> "Tensor": return E.Log.apply(self)
    def sqrt(self) -> "Tensor": return E.Sqrt.apply(self)
    def tanh(self) -> "Tensor": return E.Tanh.apply(self)
    def sigmoid(self) -> "Tensor": return E.Sigmoid.apply(self)
    def relu(self) -> "Tensor": return E.Relu.apply(self)
    def gelu(self) -> "Tensor": return pick(E.Gelu, self.data).apply(self)  # or its fast path (tensor/dispatch.py)
    def abs(self) -> "Tensor": return E.Abs.apply(self)
    def __abs__(self) -> "Tensor": return E.Abs.apply(self)

    def maximum(self, o: Any) -> "Tensor": return E.Maximum.apply(self, _const(o, self))
    def minimum(self, o: Any) -> "Tensor": return E.Minimum.apply(self, _const(o, self))

    def clip(self, lo: float | None = None, hi: float | None = None) -> "Tensor":
        return E.Clip.apply(self, lo=lo, hi=hi)

    def matmul(self, o: Any) -> "Tensor": return self @ o

    # comparisons: boolean tensors, no gradient
    def __eq__(self, o): return E.Compare.apply(self, _const(o, self), op="eq")  # type: ignore[override]
    def __ne__(self, o): return E.Compare.apply(self, _const(o, self), op="ne")  # type: ignore[override]
    def __lt__(self, o): return E.Compare.apply(self, _const(o, self), op="lt")
    def __le__(self, o): return E.Compare.apply(self, _const(o, self), op="le")
    def __gt__(self, o): return E.Compare.apply(self, _const(o, self), op="gt")
    def __ge__(self, o): return E.Compare.apply(self, _const(o, self), op="ge")
    __hash__ = object.__hash__

    # reductions, tensor/ops/reduce.py
    def sum(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return R.Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return R.Mean.apply(self, axis=axis, keepdims=keepdims)

    def max(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return R.Max.apply(self, axis=axis, keepdims=keepdims)

    def min(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return -R.Max.apply(-self, axis=axis, keepdims=keepdims)

    def var(self, axis: Any = None, keepdims: bool = False, ddof: int = 0) -> "Tensor":
        return R.Var.apply(self, axis=axis, keepdims=keepdims, ddof=ddof)

    def logsumexp(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return R.LogSumExp.apply(self, axis=axis, keepdims=keepdims)

    def argmax(self, axis: int | None = None, keepdims: bool = False) -> "Tensor":
        return R.ArgMax.apply(self, axis=axis, keepdims=keepdims)

    # movement, tensor/ops/movement.py
    def reshape(self, *shape: Any) -> "Tensor":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return V.Reshape.apply(self, shape=tuple(shape))

    def view(self, *shape: Any) -> "Tensor":
        return self.reshape(*shape)

    def flatten(self) -> "Tensor":
        return self.reshape(-1)

    def permute(self, *axes: Any) -> "Tensor":
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return V.Permute.apply(self, axes=tuple(axes))

    def transpose(self, *axes: Any) -> "Tensor":
        """transpose() reverses all axes; transpose(a, b) swaps two (PyTorch style)."""
        if len(axes) == 2:
            return self.swapaxes(*axes)
        if not axes:
            return self.T
        return self.permute(*axes)

    def swapaxes(self, a: int, b: int) -> "Tensor":
        axes = list(range(self.ndim))
        axes[a], axes[b] = axes[b], axes[a]
        return V.Permute.apply(self, axes=tuple(axes))

    def broadcast_to(self, shape: tuple) -> "Tensor":
        return V.BroadcastTo.apply(self, shape=tuple(shape))

    def expand(self, *shape: Any) -> "Tensor":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self.broadcast_to(tuple(shape))

    def squeeze(self, axis: Any = None) -> "Tensor":
        return V.squeeze(self, axis)

    def unsqueeze(self, axis: int) -> "Tensor":
        return V.unsqueeze(self, axis)

    def split(self, sections: Any, axis: int = 0) -> list["Tensor"]:
        return V.split(self, sections, axis)

    def __getitem__(self, index: Any) -> "Tensor":
        return I.GetItem.apply(self, index=_index_arrays(index))

    def masked_fill(self, mask: Any, value: float) -> "Tensor":
        return I.where(mask, value, self)

    def contiguous(self) -> "Tensor":
        return self


def _is_low_float(dtype: Any) -> bool:
    return getattr(dtype, "name", str(dtype)) in ("bfloat16", "float16")


def _const(x: Any, like: Tensor) -> Any:
    """Turn the other operand of an op into something forward can take.

    Tensors pass through. Python and NumPy scalars become Python numbers, so NumPy's
    weak-scalar rule keeps float32 math float32. Arrays become constant Tensors on
    `like`'s device (their dtype promotes by NumPy's rules).
    """
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.generic) or (hasattr(x, "ndim") and x.ndim == 0):
        return x.item()  # before the float check: np.float64 is a float subclass but not a weak scalar
    if isinstance(x, (int, float, bool)):
        return x
    arr = x if hasattr(x, "shape") else np.asarray(x)
    if arr.dtype == np.float64 and not hasattr(x, "shape"):
        arr = arr.astype(like.dtype if like.dtype.kind == "f" else np.float32)
    return Tensor._make(backend.to_device(arr, like.device), False)


def _index_arrays(index: Any) -> Any:
    """Replace Tensors inside an index by their arrays."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


# op families are imported last: they subclass Function defined above
from tensor.dispatch import pick  # noqa: E402
from tensor.ops import elementwise as E  # noqa: E402
from tensor.ops import indexing as I  # noqa: E402
from tensor.ops import matmul as M  # noqa: E402
from tensor.ops import movement as V  # noqa: E402
from tensor.ops import reduce as R  # noqa: E402
