"""3-layer MLP training step, ours vs PyTorch CPU, in one run.

MLP 784-512-512-10, ReLU, cross-entropy, batch 256, float32; one step =
forward + backward + SGD update (written inline with plain array ops under no_grad).
Both frameworks start from the same weights and batch; the losses after a few
steps are compared to check that they compute the same thing.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_mlp.py [--threads 2]

Prints JSON: per-step ms (min and median of interleaved repeats) and
ratio = torch_time / our_time (>= 1.0 means we are at least as fast).
"""
from __future__ import annotations

import argparse

import numpy as np

from _common import emit, interleaved, machine_info, ms, set_threads

import tensor.functional as F  # noqa: E402
from tensor import Tensor, no_grad  # noqa: E402

B, WIDTHS, LR = 256, (784, 512, 512, 10), 0.01


REPEATS = 9


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        params.append(rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32))
        params.append(rng.uniform(-bound, bound, (fan_out,)).astype(np.float32))
    x = rng.standard_normal((B, WIDTHS[0])).astype(np.float32)
    y = rng.integers(0, WIDTHS[-1], B).astype(np.int64)
    return params, x, y


def ours(params, x, y):
    ps = [Tensor(p.copy(), requires_grad=True) for p in params]
    xt = Tensor(x)

    def step():
        h = F.linear(xt, ps[0], ps[1]).relu()
        h = F.linear(h, ps[2], ps[3]).relu()
        loss = F.cross_entropy(F.linear(h, ps[4], ps[5]), y)
        loss.backward()
        with no_grad():
            for p in ps:
                p.data -= LR * p.grad
                p.grad = None
        return loss
    return step


def peer(params, x, y):
    import torch
    ps = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fn = torch.nn.functional

    def step():
        h = fn.relu(fn.linear(xt, ps[0], ps[1]))
        h = fn.relu(fn.linear(h, ps[2], ps[3]))
        loss = fn.cross_entropy(fn.linear(h, ps[4], ps[5]), yt)
        loss.backward()
        with torch.no_grad():
            for p in ps:
                p -= LR * p.grad
                p.grad = None
        return loss
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds per framework, roughly")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="interleaved repeats (min and median over them)")
    args = ap.parse_args()
    import torch
    set_threads(args.threads)

    params, x, y = make_data()
    ours_step, peer_step = ours(params, x, y), peer(params, x, y)
    # same computation? compare the losses of the first 3 steps
    l_ours = [float(ours_step().item()) for _ in range(3)]
    l_peer = [float(peer_step().item()) for _ in range(3)]
    agree = bool(np.allclose(l_ours, l_peer, rtol=1e-4, atol=1e-5))

    t = interleaved({"ours": ours_step, "torch": peer_step}, min_time=args.min_time, repeats=args.repeats)
    emit({
        "benchmark": "mlp_train_step",
        "config": {"batch": B, "widths": WIDTHS, "activation": "relu", "loss": "cross_entropy",
                   "dtype": "float32", "optimizer": "inline SGD lr=0.01"},
        "machine": machine_info(args.threads),
        "losses_first_3_steps": {"ours": l_ours, "torch": l_peer, "agree": agree},
        "ours_ms": {"min": ms(t["ours"]["min_s"]), "median": ms(t["ours"]["median_s"])},
        "torch_ms": {"min": ms(t["torch"]["min_s"]), "median": ms(t["torch"]["median_s"])},
        "ratio_torch_over_ours": {"min": round(t["torch"]["min_s"] / t["ours"]["min_s"], 3),
                                  "median": round(t["torch"]["median_s"] / t["ours"]["median_s"], 3)},
        "goal_met": t["torch"]["median_s"] / t["ours"]["median_s"] >= 1.0,
        "torch_module": torch.__name__,
    })


if __name__ == "__main__":
    main()
