"""Tour 7: one MLP split over several processes (tensor parallelism, Megatron-LM).

    OMP_NUM_THREADS=1 mpiexec -n 2 python examples/07_tensor_parallel.py

The MLP of a GPT block, y = GELU(x @ W1.T + b1) @ W2.T + b2 (width C -> H -> C), split over
the tp ranks of the job the Megatron way:

  * W1, b1 by rows (output features): rank t computes its own H/tp hidden units
    (ColumnParallelLinear). It needs the whole input x, which every rank holds: the operator
    f in front of it is the identity going forward; going backward it adds up (all-reduce) the
    gradients dx the ranks computed from their hidden units.
  * W2 by columns (input features): rank t multiplies its H/tp hidden units by its columns of
    W2, a partial sum of y (RowParallelLinear). The operator g adds the partial sums (all-reduce)
    going forward and passes the gradient through going backward; b2 is added once, after it.

GELU acts on each hidden unit alone, so nothing is communicated between the two layers: one
all-reduce forward, one backward, whatever H. The script checks the split MLP against the whole
one (which every rank also builds, from the same seed) and counts the collectives.
Without mpiexec it runs as one process (tp 1: f and g do nothing).

It prints (rank 0 only):

    tensor parallel over 2 ranks: W1 (64, 16) -> (32, 16) on each rank, W2 (16, 64) -> (16, 32)
    forward:  max |y_split - y| = ...
    backward: max |dx_split - dx| = ..., max |dW1_split - dW1 rows| = ..., max |dW2_split - dW2 columns| = ...
    collectives: forward {'allreduce': 1}, backward {'allreduce': 1}
    bytes per all-reduce: 512 = batch 8 x width 16 x 4 bytes
"""
from __future__ import annotations

import argparse

import numpy as np

from nn.distributed import Communicator
from nn.distributed.tensor_parallel import ColumnParallelLinear, CountingComm, RowParallelLinear, shard
from nn.layers import Linear
from tensor.tensor import Tensor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    C, H, B = args.width, 4 * args.width, args.batch
    comm = CountingComm(Communicator())  # every rank of the job: one tp group
    tp, t = comm.size, comm.rank

    rng = np.random.default_rng(0)  # the same seed on every rank: the same whole MLP and the same x
    fc, proj = Linear(C, H, rng=rng), Linear(H, C, rng=rng)
    x = rng.standard_normal((B, C)).astype(np.float32)
    wy = rng.standard_normal((B, C)).astype(np.float32)  # loss = sum(y * wy): dL/dy = wy

    x_full = Tensor(x, requires_grad=True)  # the whole MLP
    y = proj(fc(x_full).gelu())
    (y * Tensor(wy)).sum().backward()

    col = ColumnParallelLinear.from_linear(fc, comm)   # this rank's rows of W1 and b1
    row = RowParallelLinear.from_linear(proj, comm)    # this rank's columns of W2; b2 whole
    x_split = Tensor(x, requires_grad=True)
    comm.reset()
    y_split = row(col(x_split).gelu())                 # f, local GEMM, GELU, local GEMM, g, + b2
    forward = dict(comm.calls)
    comm.reset()
    (y_split * Tensor(wy)).sum().backward()
    backward = dict(comm.calls)

    gaps = [float(np.abs(x_split.grad - x_full.grad).max()),
            float(np.abs(col.weight.grad - shard(fc.weight.grad, "rows", t, tp)).max()),
            float(np.abs(row.weight.grad - shard(proj.weight.grad, "cols", t, tp)).max())]
    if t == 0:
        print(f"tensor parallel over {tp} rank{'s' if tp > 1 else ''}: W1 {fc.weight.shape} -> {col.weight.shape} on "
              f"each rank, W2 {proj.weight.shape} -> {row.weight.shape}")
        print(f"forward:  max |y_split - y| = {float(np.abs(y_split.data - y.data).max()):.1e}")
        print(f"backward: max |dx_split - dx| = {gaps[0]:.1e}, max |dW1_split - dW1 rows| = {gaps[1]:.1e}, "
              f"max |dW2_split - dW2 columns| = {gaps[2]:.1e}")
        print(f"collectives: forward {forward}, backward {backward}")
        print(f"bytes per all-reduce: {comm.nbytes.get('allreduce', B * C * 4)} = batch {B} x width {C} x 4 bytes")


if __name__ == "__main__":
    main()
