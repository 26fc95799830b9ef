"""Tour 1: one neuron, by hand and by autograd.

    o = tanh(x1*w1 + x2*w2 + b)

We compute o, call o.backward(), and compare every gradient with the chain rule
worked out by hand. (The numbers are those of Karpathy's micrograd lecture:
b is chosen so that o = tanh(0.8814) = 1/sqrt(2).)

    python examples/01_neuron.py [--dot neuron.dot]

It prints:

    n = x1*w1 + x2*w2 + b = 0.8814
    o = tanh(n)            = 0.7071
    do/dn = 1 - o^2        = 0.5000
    grad   autograd   by hand
    x1      -1.5000   -1.5000   (do/dn * w1)
    w1       1.0000    1.0000   (do/dn * x1)
    x2       0.5000    0.5000   (do/dn * w2)
    w2       0.0000    0.0000   (do/dn * x2)
    b        0.5000    0.5000   (do/dn * 1)
    all gradients match
"""
from __future__ import annotations

import argparse

import numpy as np

from tensor import Tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dot", metavar="FILE", help="also draw the computation graph: FILE's .dot always, and "
                    "FILE itself as .svg/.png/.pdf when Graphviz's `dot` is installed")
    args = ap.parse_args()

    def leaf(v: float) -> Tensor:  # float64 scalars that want gradients
        return Tensor(np.float64(v), requires_grad=True)

    x1, x2 = leaf(2.0), leaf(0.0)
    w1, w2 = leaf(-3.0), leaf(1.0)
    b = leaf(6.8813735870195432)

    n = x1 * w1 + x2 * w2 + b   # every op records itself: the graph is built as we go
    o = n.tanh()
    o.backward()                # walk the graph backwards, filling .grad of every leaf

    do_dn = 1.0 - o.item() ** 2  # the chain rule by hand: d tanh(n)/dn = 1 - tanh(n)^2
    by_hand = {"x1": (do_dn * w1.item(), "do/dn * w1"), "w1": (do_dn * x1.item(), "do/dn * x1"),
               "x2": (do_dn * w2.item(), "do/dn * w2"), "w2": (do_dn * x2.item(), "do/dn * x2"),
               "b": (do_dn, "do/dn * 1")}
    autograd = {"x1": x1, "w1": w1, "x2": x2, "w2": w2, "b": b}

    print(f"n = x1*w1 + x2*w2 + b = {n.item():.4f}")
    print(f"o = tanh(n)            = {o.item():.4f}")
    print(f"do/dn = 1 - o^2        = {do_dn:.4f}")
    print("grad   autograd   by hand")
    for name, t in autograd.items():
        hand, why = by_hand[name]
        print(f"{name:<4} {float(t.grad):10.4f} {hand:9.4f}   ({why})")
    ok = all(abs(float(autograd[k].grad) - v) < 1e-12 for k, (v, _) in by_hand.items())
    print("all gradients match" if ok else "MISMATCH")
    if args.dot:
        from tensor.viz import draw
        print(f"graph written to {draw(o, args.dot, names=autograd)}")


if __name__ == "__main__":
    main()
