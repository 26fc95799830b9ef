"""Tour 3: write your own op, and let gradcheck prove its backward right (or wrong).

An op is a `Function` subclass: `forward` computes on raw arrays and saves what
backward needs; `backward(g)` turns g = dL/dy into one gradient per input. Here:

    softplus(x) = log(1 + exp(x)),   d softplus/dx = sigmoid(x) = 1 / (1 + exp(-x))

`gradcheck` compares the backward with central differences (float64) and either
returns True or raises GradcheckError naming the input, the worst index and both values.
A deliberately wrong backward (the derivative of exp instead of softplus) shows what
a failure looks like. Then the exercises take over: `python -m tensor.exercises list`.

    python examples/03_gradcheck_custom_op.py

It prints:

    softplus([-2, 0, 3]) = [0.1269 0.6931 3.0486]
    gradient (autograd)  = [0.1192 0.5    0.9526]
    sigmoid              = [0.1192 0.5    0.9526]
    gradcheck(Softplus): True
    gradcheck(BuggySoftplus) failed: input 0, index (1, 2): analytic 4.80394, numeric 1.02561
    the exercises: python -m tensor.exercises list
"""
from __future__ import annotations

import numpy as np

from tensor import Function, GradcheckError, Tensor, gradcheck


class Softplus(Function):
    """y = log(1 + exp(x)), computed without overflow as max(x, 0) + log1p(exp(-|x|))."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.save_for_backward(x)
        return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))

    def backward(self, g: np.ndarray) -> tuple:
        (x,) = self.saved
        return (g * 0.5 * (np.tanh(0.5 * x) + 1.0),)  # g * sigmoid(x), without overflow


class BuggySoftplus(Softplus):
    """The same forward with a wrong backward: exp(x) is not the derivative of softplus."""

    def backward(self, g: np.ndarray) -> tuple:
        (x,) = self.saved
        return (g * np.exp(x),)


def main() -> None:
    np.set_printoptions(precision=4)
    x = Tensor(np.array([-2.0, 0.0, 3.0]), requires_grad=True)
    y = Softplus.apply(x)
    y.sum().backward()
    print(f"softplus([-2, 0, 3]) = {y.numpy()}")
    print(f"gradient (autograd)  = {x.grad}")
    print(f"sigmoid              = {1 / (1 + np.exp(-x.numpy()))}")

    rng = np.random.default_rng(0)
    inputs = [Tensor(rng.standard_normal((3, 4)), requires_grad=True)]   # float64: gradcheck needs it
    print(f"gradcheck(Softplus): {gradcheck(Softplus.apply, inputs)}")
    try:
        gradcheck(BuggySoftplus.apply, inputs)
    except GradcheckError as e:
        print(f"gradcheck(BuggySoftplus) failed: input {e.input_index}, index {e.index}: "
              f"analytic {e.analytic:.6g}, numeric {e.numeric:.6g}")
    print("the exercises: python -m tensor.exercises list")


if __name__ == "__main__":
    main()
