"""Cache-sized blocks for elementwise chains on the CPU.

Each NumPy pass over a 1.5 MB array streams it from memory, while a 256 KB block stays in L2
across the passes (GELU's forward: 1.4x faster on (768, 512) float32). One block for small arrays.

Splitting the blocks over two Python threads (NumPy releases the GIL in each call) was measured
too: 1.3x faster for a GELU alone, but 1-3% slower inside a training step, where OpenBLAS's
worker thread spins on the second core between GEMMs (benchmarks/RESULTS.md).
"""
from __future__ import annotations

from typing import Callable

BLOCK = 65536  # elements (256 KB of float32)


def over_blocks(fn: Callable[[int, int], None], n: int, block: int = BLOCK) -> None:
    """fn(start, stop) for the consecutive pieces [start, stop) of `block` items (elements of a
    flat array, or rows) out of n, in order."""
    for i in range(0, n, block):
        fn(i, min(i + block, n))
