"""Gradient utilities: global-norm gradient clipping.

The formula, on whole arrays (the reference, any device and dtype):

    norm = sqrt( sum over params p, elements i of grad_p[i]^2 )
    grad_p <- grad_p * min(1, max_norm / (norm + 1e-6))          (in place, every p)

On the GPU, float32 gradients take the multi-tensor kernels of tensor/cuda/clip.py instead
(3 launches in all rather than 2-3 per parameter), chosen with the switch every fast path
shares (tensor/dispatch.py: TINYGRAD_LM_FAST=0 or `reference_only()` forces the reference).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np

from tensor.backend import array_module
from tensor.tensor import Tensor

__all__ = ["clip_grad_norm_", "sum_of_squares"]


def sum_of_squares(g: Any) -> Any:
    """sum(g^2) = g . g as a 0-d array on g's device, accumulated in float32 (float64 for float64)."""
    acc = np.float64 if g.dtype == np.float64 else np.float32
    flat = g.reshape(-1).astype(acc, copy=False)
    return array_module(g).dot(flat, flat)


def _multi_tensor(gs: list) -> Any:
    """tensor.cuda.clip when its kernels take these gradients (float32 on the GPU), else None."""
    if type(gs[0]) is np.ndarray:
        return None
    from tensor.cuda import clip                  # imported on the first GPU call, not with nn
    return clip if clip.supports(*gs) else None


def clip_grad_norm_(params: Iterable[Tensor] | Tensor, max_norm: float,
                    error_if_nonfinite: bool = True, sync: bool = True,
                    reduce: Callable[[Any], Any] | None = None,
                    weight: Callable[[Tensor], float] | None = None) -> Any:
    """Scale all gradients together so that their global L2 norm is at most `max_norm`.

        norm = sqrt( sum over params p, elements i of grad_p[i]^2 )
        if norm > max_norm:  grad_p <- grad_p * max_norm / (norm + 1e-6)   (in place, every p)

    The sums of squares accumulate in float32 (float64 for float64 grads), whatever the grad
    dtype. Parameters without a grad are ignored. Returns the norm before clipping, a float.

    A non-finite norm (inf/nan in some grad) raises FloatingPointError naming the first
    offending parameter; with error_if_nonfinite=False the grads are left untouched instead
    and the non-finite norm is returned (the caller skips the step, as a loss scaler does).

    sync=False never waits for the device: the norm comes back as a 0-d array on the
    grads' device, the clipping factor min(1, max_norm / (norm + 1e-6)) is applied on the
    device (grads untouched when the norm is not finite) and no error is raised; the caller
    checks the norm when it synchronises anyway (a GPU training loop, at log steps).

    reduce (model parallelism: params is this rank's part of the model): maps this rank's sum
    of squares (a 0-d array) to the sum over all parts, so the norm is the whole model's.
    weight(p) (model parallelism): p's squares count w_p times (1 / the number of ranks that
    hold p whole, so that reduce counts it once).
    """
    if not max_norm >= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be >= 0, got {max_norm}")
    params = [params] if isinstance(params, Tensor) else list(params)
    grads = [(i, p.grad) for i, p in enumerate(params) if p.grad is not None]
    if not grads:
        return 0.0
    gs = [g for _, g in grads]
    ws = [1.0 if weight is None else weight(params[i]) for i, _ in grads]
    fast = _multi_tensor(gs) if all(w == 1.0 for w in ws) else None
    if fast is not None:
        total, tables = fast.sum_of_squares_multi(gs)
    else:
        total = None
        for g, w in zip(gs, ws):
            s = sum_of_squares(g) if w == 1.0 else sum_of_squares(g) * w
            total = s if total is None else total + s
    if reduce is not None:
        total = reduce(total)
    if not sync:
        dnorm = array_module(total).sqrt(total)
        if fast is not None:
            fast.clip_multi(tables, total, max_norm)
        else:
            xp = array_module(total)
            coef = xp.where(xp.isfinite(dnorm), xp.minimum(max_norm / (dnorm + 1e-6), 1.0), 1.0)
            for g in gs:
                g *= coef.astype(g.dtype)
        return dnorm
    norm = math.sqrt(float(total))                # one device -> host transfer
    if not math.isfinite(norm):
        if error_if_nonfinite:
            bad = next((i, g) for i, g in grads if not math.isfinite(float(sum_of_squares(g))))
            raise FloatingPointError(
                f"clip_grad_norm_: the total gradient norm is {norm} (non-finite); first offending "
                f"parameter: index {bad[0]}, shape {tuple(bad[1].shape)}. Gradients left unchanged. "
                "Pass error_if_nonfinite=False to get the norm back and skip the step yourself.")
        return norm
    if norm > max_norm:
        if fast is not None:
            fast.clip_multi(tables, total, max_norm)
        else:
            coef = max_norm / (norm + 1e-6)
            for g in gs:
                g *= coef
    return norm
