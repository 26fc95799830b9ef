"""Python overhead per op: a tiny (4, 4) float32 op, forward and forward+backward,
ours vs the raw NumPy calls that do the same arithmetic vs PyTorch CPU, in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_op_overhead.py [--threads 2]

At this size the arithmetic is nearly free, so the times measure the framework:
  numpy_*      the NumPy calls of forward (and of backward: the input gradients)
  ours_*       Tensor op (+ y.backward(g) into leaves that require grad)
  torch_*      the same with torch tensors
  overhead_us  ours - numpy  (what our graph recording and backward engine cost)
Each fwd+bwd iteration also resets the leaves' .grad to None (in all three), as an
optimizer's zero_grad would. Times are per op in microseconds (min over repeats).
"""
from __future__ import annotations

import argparse

import numpy as np

from _common import emit, interleaved, machine_info, set_threads, us

from tensor import Tensor, no_grad  # noqa: E402

SHAPE = (4, 4)


REPEATS = 7


def cases():
    """name -> (ours_fn(a, b), torch_fn(a, b), numpy_fwd(a, b), numpy_fwd_bwd(a, b, g), unary, scalar_out)."""
    def np_mul(a, b, g):
        y = a * b
        return y, g * b, g * a

    def np_add(a, b, g):
        y = a + b
        return y, g, g  # the gradient passes through (no broadcasting here)

    def np_exp(a, b, g):
        y = np.exp(a)
        return y, g * y

    def np_sum(a, b, g):
        y = a.sum()
        return y, np.broadcast_to(g, a.shape)

    def np_matmul(a, b, g):
        y = a @ b
        return y, g @ b.T, a.T @ g

    return {
        "mul": (lambda a, b: a * b, lambda a, b: a * b, lambda a, b: a * b, np_mul, False, False),
        "add": (lambda a, b: a + b, lambda a, b: a + b, lambda a, b: a + b, np_add, False, False),
        "exp": (lambda a, b: a.exp(), lambda a, b: a.exp(), lambda a, b: np.exp(a), np_exp, True, False),
        "sum": (lambda a, b: a.sum(), lambda a, b: a.sum(), lambda a, b: a.sum(), np_sum, True, True),
        "matmul": (lambda a, b: a @ b, lambda a, b: a @ b, lambda a, b: a @ b, np_matmul, False, False),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.6, help="seconds per variant, roughly")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="interleaved repeats (min and median over them)")
    args = ap.parse_args()
    import torch
    set_threads(args.threads)

    rng = np.random.default_rng(0)
    a_np = rng.standard_normal(SHAPE).astype(np.float32)
    b_np = rng.standard_normal(SHAPE).astype(np.float32)
    results = {}
    for name, (f_ours, f_torch, np_fwd, np_fb, unary, scalar) in cases().items():
        g_np = np.float32(1.0) if scalar else np.ones(SHAPE, np.float32)
        a, b = Tensor(a_np.copy(), requires_grad=True), Tensor(b_np.copy(), requires_grad=True)
        ta, tb = torch.tensor(a_np, requires_grad=True), torch.tensor(b_np, requires_grad=True)
        tg = torch.tensor(g_np)
        leaves, tleaves = ((a,), (ta,)) if unary else ((a, b), (ta, tb))

        def ours_fb():
            for t in leaves:
                t.grad = None
            f_ours(a, b).backward(g_np)

        def torch_fb():
            for t in tleaves:
                t.grad = None
            f_torch(ta, tb).backward(tg)

        def ours_nograd():
            with no_grad():
                f_ours(a, b)

        def torch_nograd():
            with torch.no_grad():
                f_torch(ta, tb)

        t = interleaved({
            "numpy_fwd": lambda: np_fwd(a_np, b_np),
            "numpy_fwd_bwd": lambda: np_fb(a_np, b_np, g_np),
            "ours_fwd": lambda: f_ours(a, b),
            "ours_fwd_nograd": ours_nograd,
            "ours_fwd_bwd": ours_fb,
            "torch_fwd": lambda: f_torch(ta, tb),
            "torch_fwd_nograd": torch_nograd,
            "torch_fwd_bwd": torch_fb,
        }, min_time=args.min_time, repeats=args.repeats)
        r = {k: us(v["min_s"]) for k, v in t.items()}
        r["overhead_fwd_us"] = round(r["ours_fwd"] - r["numpy_fwd"], 2)
        r["overhead_fwd_bwd_us"] = round(r["ours_fwd_bwd"] - r["numpy_fwd_bwd"], 2)
        r["ratio_ours_over_numpy_fwd_bwd"] = round(r["ours_fwd_bwd"] / r["numpy_fwd_bwd"], 2)
        r["ratio_torch_over_ours_fwd"] = round(r["torch_fwd"] / r["ours_fwd"], 2)
        r["ratio_torch_over_ours_fwd_bwd"] = round(r["torch_fwd_bwd"] / r["ours_fwd_bwd"], 2)
        results[name] = r

    emit({
        "benchmark": "op_overhead",
        "config": {"shape": SHAPE, "dtype": "float32", "unit": "us per op (min over interleaved repeats)"},
        "machine": machine_info(args.threads),
        "ops": results,
    })


if __name__ == "__main__":
    main()
