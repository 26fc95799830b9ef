"""Run under `mpiexec -n 2` by tests/test_mpi.py: the bucketed all-reduce, exact and in float16.

Rank r's gradient of parameter i is (r + 1) * base_i (base drawn from a shared seed), so
the average over N ranks is base_i * (N + 1) / 2, a closed form to compare with.
"""
from __future__ import annotations

import sys

import numpy as np

from nn import Parameter
from nn.distributed import MPIWorld


def main() -> int:
    reduce_dtype = None if sys.argv[1] == "float32" else sys.argv[1]
    world = MPIWorld(bucket_mb=0.001, reduce_dtype=reduce_dtype)  # tiny buckets: several of them
    rng = np.random.default_rng(0)
    shapes = [(17, 5), (300,), (3, 4, 5), (1,)]
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [Parameter(np.zeros(s, dtype=np.float32)) for s in shapes]
    for p, b in zip(params, base):
        p.grad = b * (world.rank + 1)
    world.allreduce_grads(params)
    tol = 1e-6 if reduce_dtype is None else 2e-3
    for p, b in zip(params, base):
        expected = b * (world.size + 1) / 2
        if not np.allclose(p.grad, expected, rtol=tol, atol=tol):
            print(f"rank {world.rank}: mismatch, max err {np.abs(p.grad - expected).max()}", flush=True)
            return 1
    if world.rank == 0:
        print(f"OK {reduce_dtype or 'float32'} buckets={len(world._buckets)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
