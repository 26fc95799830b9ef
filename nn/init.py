"""Weight initialisation. Every function takes an explicit `rng` (a numpy Generator)
so that a model built from a seed is reproducible; nothing here keeps global state."""
from __future__ import annotations

import math
from typing import Any

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


def placeholder(shape: tuple) -> np.ndarray:
    """A float32 array of `shape` that takes no memory: a read-only zero-stride view of one 0."""
    return np.broadcast_to(np.float32(0), shape)


def is_placeholder(a: Any) -> bool:
    """Whether `a` is a `placeholder` (a weight not drawn or read yet)."""
    return (isinstance(a, np.ndarray) and a.ndim > 0 and a.size > 1 and not any(a.strides)
            and not a.flags.writeable)


class Placeholders:
    """Stands in for the NumPy Generator a model's constructor draws its initial weights from, when
    those weights come from somewhere else next (a file, or `replay` on one rank's share of them):
    each draw returns a float32 placeholder of the asked shape that takes no memory (a zero-stride
    read-only view of one 0), and is logged as (method, args, shape, placeholder) in `draws`.

    A parameter whose data is still a placeholder after construction holds the values of the
    draw that returned that placeholder; `replay` draws the same numbers from a real Generator."""

    def __init__(self) -> None:
        self.draws: list[tuple[str, tuple, tuple, np.ndarray]] = []

    def _draw(self, method: str, args: tuple, size: Any) -> np.ndarray:
        shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
        a = placeholder(shape)
        self.draws.append((method, args, shape, a))
        return a

    def standard_normal(self, size: Any) -> np.ndarray:
        return self._draw("standard_normal", (), size)

    def uniform(self, low: float, high: float, size: Any) -> np.ndarray:
        return self._draw("uniform", (low, high), size)

    def normal(self, loc: float, scale: float, size: Any) -> np.ndarray:
        return self._draw("normal", (loc, scale), size)

    def owners(self, named: Any) -> list[str | None]:
        """For each draw, the name of the parameter (among `named`'s (name, parameter) pairs) whose
        data is its placeholder, or None for a draw a later one overwrote."""
        by_id = {id(p.data): n for n, p in named}
        return [by_id.get(id(a)) for *_, a in self.draws]


CHUNK = 1 << 16  # values drawn at a time by `replay` (512 KiB of float64)


def replay(draws: list[tuple[str, tuple, tuple, np.ndarray]], owners: list[str | None], wanted: Any,
           rng: np.random.Generator) -> Any:
    """Draw what `Placeholders.draws` logged, in its order, from `rng`: yields (name, float32 array of
    the draw's shape) for each draw whose owner is in `wanted`, as the constructor would have filled
    that parameter; the others are drawn and dropped (uniform draws skipped in O(1) where the bit
    generator can advance). Draws go CHUNK values at a time: the memory of one float32 parameter."""
    for (method, args, shape, _), name in zip(draws, owners):
        n = int(np.prod(shape))
        keep = name is not None and name in wanted
        if not keep and method == "uniform" and hasattr(rng.bit_generator, "advance"):
            rng.bit_generator.advance(n)  # one 64-bit draw per uniform double (PCG64)
            continue
        out = np.empty(n, np.float32) if keep else None
        for lo in range(0, n, CHUNK):
            chunk = getattr(rng, method)(*args, size=min(CHUNK, n - lo))
            if keep:
                out[lo:lo + chunk.size] = chunk
        if keep:
            yield name, out.reshape(shape)
            del out  # (before the next one is drawn: one full parameter at a time)
