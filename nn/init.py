"""Weight initialisation. Every function takes an explicit `rng` (a numpy Generator)
so that a model built from a seed is reproducible; nothing here keeps global state."""
from __future__ import annotations

import math

import numpy as np

from nn.module import Module, Parameter
from tensor import backend


def _fill(p: Parameter, host: np.ndarray) -> Parameter:
    p.data = backend.to_device(host.astype(p.dtype, copy=False), p.device)
    p._version += 1
    return p


def normal_(p: Parameter, mean: float = 0.0, std: float = 1.0, rng: np.random.Generator | None = None) -> Parameter:
    """Fill with samples of N(mean, std^2), in place."""
    rng = rng if rng is not None else np.random.default_rng()
    return _fill(p, rng.normal(mean, std, size=p.shape))


def uniform_(p: Parameter, low: float, high: float, rng: np.random.Generator | None = None) -> Parameter:
    rng = rng if rng is not None else np.random.default_rng()
    return _fill(p, rng.uniform(low, high, size=p.shape))


def zeros_(p: Parameter) -> Parameter:
    return _fill(p, np.zeros(p.shape))


def ones_(p: Parameter) -> Parameter:
    return _fill(p, np.ones(p.shape))


def gpt_init_(model: Module, n_layer: int, rng: np.random.Generator) -> None:
    """The GPT init rule (docs/DESIGN.md): weights N(0, 0.02); residual output projections
    (`*.c_proj.weight`) N(0, 0.02 / sqrt(2 n_layer)); biases 0; LayerNorm weights 1."""
    from nn.layers import Embedding, LayerNorm, Linear
    for _, m in model.named_modules():
        if isinstance(m, (Linear, Embedding)):
            normal_(m.weight, 0.0, 0.02, rng)
            if getattr(m, "bias", None) is not None:
                zeros_(m.bias)
        elif isinstance(m, LayerNorm):
            ones_(m.weight)
            if m.bias is not None:
                zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer), rng)
