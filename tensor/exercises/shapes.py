"""Small helpers the exercise files use in `make_inputs(draw, rng)`.

`draw` is Hypothesis's `data.draw`: it picks the *shapes* (small, and the smallest
first). `rng` is a NumPy Generator seeded by Hypothesis: it fills in the *values*
(drawing every float through Hypothesis would be slow and gives odd numbers).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError:  # the checker reports the missing `dev` extra itself
    st = None  # type: ignore[assignment]

Draw = Callable[[Any], Any]


def dim(draw: Draw, lo: int = 1, hi: int = 4) -> int:
    """One axis length in [lo, hi]."""
    return draw(st.integers(lo, hi))


def shape(draw: Draw, min_dims: int = 1, max_dims: int = 3, lo: int = 1, hi: int = 4) -> tuple[int, ...]:
    """A shape of min_dims..max_dims axes, each of length lo..hi."""
    n = draw(st.integers(min_dims, max_dims))
    return tuple(dim(draw, lo, hi) for _ in range(n))


def broadcastable_to(draw: Draw, target: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that NumPy broadcasts to `target`: drop some leading axes, set some others to 1."""
    drop = draw(st.integers(0, len(target)))
    kept = target[drop:]
    return tuple(1 if draw(st.booleans()) else n for n in kept)


def normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """float64 values from N(0, scale^2)."""
    return rng.standard_normal(shape) * scale


def uniform(rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    """float64 values from U(lo, hi)."""
    return rng.uniform(lo, hi, shape)


def away_from_zero(rng: np.random.Generator, shape: tuple[int, ...], lo: float = 0.5, hi: float = 2.0) -> np.ndarray:
    """float64 values with lo <= |x| <= hi and a random sign (safe divisors)."""
    return rng.uniform(lo, hi, shape) * rng.choice([-1.0, 1.0], shape)
