"""The reverse-mode engine beneath `Tensor.backward()`, and the grad mode.

  * grad mode: `with no_grad():` records no graph (the only global state besides the default device);
  * `run_backward(root, gradient)`: orders the graph topologically (iteratively: graphs thousands
    of nodes deep must work), then visits it in reverse, calling each op's `backward(grad_out)`,
    which returns one gradient per input; gradients reaching a leaf accumulate in its `.grad`
    (an op with `adds_to_first_grad` is also handed the sum so far for its first input, to add in);
  * `unbroadcast`: the rule every backward uses to sum a gradient back to its input's shape.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from tensor import backend

# ----------------------------------------------------------------- grad mode
grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside `with no_grad():` no graph is recorded (inference, optimizer steps)."""
    global grad_enabled
    prev, grad_enabled = grad_enabled, False
    try:
        yield
    finally:
        grad_enabled = prev


@contextlib.contextmanager
def enable_grad() -> Iterator[None]:
    global grad_enabled
    prev, grad_enabled = grad_enabled, True
    try:
        yield
    finally:
        grad_enabled = prev


def is_grad_enabled() -> bool:
    return grad_enabled


# ----------------------------------------------------------------- helpers
def unbroadcast(grad: Any, shape: tuple) -> Any:
    """Sum `grad` over the axes that broadcasting added or stretched, back to `shape`.

    If y = broadcast(x) then dL/dx = sum of dL/dy over every copy of x.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def shape_str(x: Any) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")" if hasattr(x, "shape") else type(x).__name__


def topological_order(root: Any) -> list:
    """Graph nodes (ops, and leaf tensors that need grad), each after all its inputs (iterative DFS)."""
    from tensor.tensor import Function
    order: list = []
    visited: set[int] = set()
    stack: list = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if isinstance(node, Function):
            for inp, need in zip(node.inputs, node.needs_grad):
                if need and id(inp) not in visited:
                    stack.append((inp, False))
    return order


def run_backward(root: Any, gradient: Any, retain_graph: bool = False) -> None:
    """Backpropagate `gradient` (dL/d root's output) from `root` (the op that made the output, or a
    leaf Tensor) into every leaf that requires grad; free saved buffers unless retain_graph."""
    from tensor.tensor import Function, Tensor  # (the engine walks both kinds of node)
    xp = backend.array_module(gradient)
    # nodes are ops (Functions) and leaf tensors; a non-leaf tensor is represented by its op
    grads: dict[int, Any] = {id(root): gradient}
    shared = {id(gradient)}  # arrays a leaf's .grad must not alias (the caller's, another leaf's)
    for node in reversed(topological_order(root)):
        g = grads.pop(id(node), None)
        if g is None:
            continue
        if isinstance(node, Tensor):  # a leaf: accumulate
            t = node
            if g.dtype != t.data.dtype:
                g = g.astype(t.data.dtype)
            elif t.grad is None and (g.base is not None or id(g) in shared or isinstance(g, np.generic)):
                g = xp.array(g)  # an owned, writable array: optimizers and clipping update .grad in place
            t.grad = g if t.grad is None else t.grad + g
            shared.add(id(t.grad))
            continue
        fn = node
        if fn.saved is None:
            raise RuntimeError(f"{fn.name}.backward: the graph was already freed by an earlier "
                               "backward(); call backward(retain_graph=True) the first time to "
                               "backpropagate through it twice")
        fn.check_versions()
        acc = grads.pop(id(fn.inputs[0]), None) if fn.adds_to_first_grad and fn.needs_grad[0] else None
        in_grads = fn.backward(g) if acc is None else fn.backward(g, acc=acc)  # acc: the sum so far for input 0
        if not retain_graph:
            fn.release()
        for inp, ig, need in zip(fn.inputs, in_grads, fn.needs_grad):
            if need and ig is not None:
                dtype = inp.out_dtype if isinstance(inp, Function) else inp.data.dtype
                if ig.dtype != dtype:  # e.g. an fp32 residual grad flowing into an fp16 branch
                    ig = ig.astype(dtype)
                k = id(inp)
                prev = grads.get(k)
                grads[k] = ig if prev is None else prev + ig


def backward(out: Any, gradient: Any = None, retain_graph: bool = False) -> None:
    """Tensor.backward: check the seed gradient (implicit only for a one-element output), then
    run_backward from the op that made `out`."""
    from tensor.tensor import Tensor
    if not out.requires_grad:
        raise RuntimeError(f"backward: tensor of shape {out.shape} does not require grad "
                           "(no input had requires_grad=True, or it was made under no_grad)")
    xp = backend.array_module(out.data)
    if gradient is None:
        if out.data.size != 1:
            raise RuntimeError(f"backward: an implicit gradient needs a one-element output, got shape "
                               f"{out.shape}; pass gradient= of that shape")
        gradient = xp.ones_like(out.data)
    else:
        gradient = gradient.data if isinstance(gradient, Tensor) else xp.asarray(gradient, dtype=out.dtype)
        if gradient.shape != out.shape:
            raise RuntimeError(f"backward: gradient of shape {gradient.shape} does not match "
                               f"output of shape {out.shape}")
    run_backward(out._ctx if out._ctx is not None else out, gradient, retain_graph)
