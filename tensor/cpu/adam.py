"""The Adam update on the CPU, in cache-sized blocks with one scratch array.

The reference (nn/optim.py: `adam_reference`) writes each moment and the step as whole-array
expressions: every one of its ~13 NumPy passes streams p, g, m, v and a fresh temporary through
memory. Here the same passes, in the same order on the same values (so the result is equal bit
for bit), run block by block over flat views: a BLOCK of p, g, m, v and the scratch stays in L2
across all of them, the AdamW decay p *= 1 - lr*wd included, and the only temporary is one
BLOCK-sized scratch array. A parameter of at most BLOCK elements is one block.

Chosen by nn.optim.adam_step when fast paths are on (tensor/dispatch.py) and `supports` says yes.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tensor.cpu.blocks import BLOCK, over_blocks

__all__ = ["supports", "adam_step"]


def supports(p: Any, g: Any, m: Any, v: Any) -> bool:
    """True when p, g, m, v are NumPy arrays of one dtype and shape, C-contiguous (the blocks are
    slices of flat views) unless p has at most BLOCK elements (one block: the arrays themselves)."""
    for a in (g, m, v):
        if type(a) is not np.ndarray or a.dtype != p.dtype or a.shape != p.shape:
            return False
    return type(p) is np.ndarray and (p.size <= BLOCK or all(a.flags.c_contiguous for a in (p, g, m, v)))


def adam_step(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, beta1: float,
              beta2: float, eps: float, step: int, decay: float = 1.0) -> None:
    """In place, arrays of one shape (see `supports`): p *= decay; m, v <- the Adam moments of g;
    p -= lr * m_hat / (sqrt(v_hat) + eps) with the bias corrections of step `step` (>= 1)."""
    bias1, bias2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    sqrt_bias2, step_size = math.sqrt(bias2), lr / bias1

    def piece(pb: np.ndarray, gb: np.ndarray, mb: np.ndarray, vb: np.ndarray, tmp: np.ndarray) -> None:
        if decay != 1.0:
            pb *= decay                           # p = p - lr*wd*p (AdamW)
        np.multiply(gb, 1.0 - beta1, out=tmp)
        mb *= beta1
        mb += tmp                                 # m = beta1*m + (1-beta1)*g
        np.multiply(gb, gb, out=tmp)
        tmp *= 1.0 - beta2
        vb *= beta2
        vb += tmp                                 # v = beta2*v + (1-beta2)*g^2
        np.sqrt(vb, out=tmp)
        tmp /= sqrt_bias2
        tmp += eps                                # denom = sqrt(v_hat) + eps
        np.divide(mb, tmp, out=tmp)
        tmp *= step_size                          # lr * m_hat / denom
        pb -= tmp

    if p.size <= BLOCK:
        piece(p, g, m, v, np.empty_like(p))
        return
    flat = [a.reshape(-1) for a in (p, g, m, v)]  # views: the arrays are C-contiguous
    tmp = np.empty(BLOCK, dtype=p.dtype)
    over_blocks(lambda i, j: piece(*(a[i:j] for a in flat), tmp[:j - i]), p.size)
