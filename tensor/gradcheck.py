"""Gradient checking: analytic gradients (backward) against central differences.

    gradcheck(fn, inputs) -> True, or raises GradcheckError naming the input, the
    worst element's index, and both values.

For a non-scalar output y = fn(*inputs) we check the scalar L = sum(y * v) for a
fixed random v, so every output element takes part:
    numeric dL/dx_i = (L(x_i + eps) - L(x_i - eps)) / (2 eps).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from tensor import backend
from tensor.tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """Analytic and numeric gradients disagree. Attributes: input_index, index, analytic, numeric."""

    def __init__(self, message: str, input_index: int = -1, index: tuple = (),
                 analytic: float = float("nan"), numeric: float = float("nan")) -> None:
        super().__init__(message)
        self.input_index, self.index, self.analytic, self.numeric = input_index, index, analytic, numeric


def numeric_grad(f: Callable[[], float], x: np.ndarray, eps: float) -> np.ndarray:
    """Central differences of the scalar f() with respect to every element of x (changed in place, restored)."""
    grad = np.zeros(x.shape, dtype=np.float64)
    flat = x.reshape(-1)  # a view: edits show through to x
    for i in range(flat.size):
        old = flat[i].item()
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        grad.reshape(-1)[i] = (up - down) / (2 * eps)
    return grad


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[Tensor], eps: float = 1e-6,
              atol: float = 1e-5, rtol: float = 1e-3, seed: int = 0) -> bool:
    """Compare the analytic gradient of `fn(*inputs)` with central differences, in float64.

    Every input that requires grad must be float64 (a clear error otherwise).
    Passes when |analytic - numeric| <= atol + rtol * |numeric| everywhere.
    """
    inputs = list(inputs)
    for i, t in enumerate(inputs):
        if isinstance(t, Tensor) and t.requires_grad and t.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} has dtype {t.dtype}; use float64 "
                            "(finite differences are meaningless in lower precision)")
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True")

    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    rng = np.random.default_rng(seed)
    v_host = rng.standard_normal(out.shape) if out.shape else np.float64(1.0)
    xp = backend.array_module(out.data)
    v = xp.asarray(v_host, dtype=out.dtype)
    for i in checked:
        inputs[i].grad = None
    out.backward(v)

    def loss() -> float:
        with no_grad():
            return float((backend.to_numpy(fn(*inputs).data) * v_host).sum())

    for i in checked:
        t = inputs[i]
        analytic = backend.to_numpy(t.grad) if t.grad is not None else np.zeros(t.shape)
        host = backend.to_numpy(t.data)
        if host is t.data:
            numeric = numeric_grad(loss, t.data, eps)
        else:  # a GPU tensor: perturb a host copy and copy it in each time
            def f_dev() -> float:
                t.data[...] = backend.to_device(host, t.device)
                return loss()
            numeric = numeric_grad(f_dev, host, eps)
            t.data[...] = backend.to_device(host, t.device)
        err = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
        err = np.where(np.isnan(err), np.inf, err)  # a NaN on either side is a failure, not a silent pass
        if err.size and err.max() > 0:
            worst = np.unravel_index(int(np.argmax(err)), err.shape)
            a, n = float(analytic[worst]), float(numeric[worst])
            raise GradcheckError(
                f"gradcheck: gradient of input {i} (shape {tuple(t.shape)}) is wrong at index {tuple(int(k) for k in worst)}: "
                f"analytic {a:.6g}, numeric {n:.6g} (|diff| {abs(a - n):.3g} > atol {atol} + rtol {rtol} * |numeric|)",
                input_index=i, index=tuple(int(k) for k in worst), analytic=a, numeric=n)
    return True
