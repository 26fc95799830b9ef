"""GELU on the GPU: the reference formula (tensor/ops/elementwise.py: Gelu) as one elementwise
kernel each way, computed in float32 whatever the storage dtype."""
from __future__ import annotations

import functools
from typing import Any

from tensor.cuda.common import cupy as _cp, usable
from tensor.ops.elementwise import Gelu


@functools.lru_cache(maxsize=None)
def _elementwise(name: str) -> Any:
    cp = _cp()
    k = 0.7978845608028654  # sqrt(2/pi)
    if name == "gelu_fwd":
        # y = 0.5 x (1 + tanh(u)), u = k (x + 0.044715 x^3); computed as x * sigmoid(2u), since
        # 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)): one fast exponential instead of tanhf
        return cp.ElementwiseKernel("T x", "T y", f"""
            float xf = (float)x; float u = {k}f * (xf + 0.044715f * xf * xf * xf);
            y = (T)(xf / (1.0f + __expf(-2.0f * u)));""", "tglm_gelu_fwd")
    if name == "gelu_bwd":
        # dx = g (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3*0.044715 x^2)), t = tanh(u); with
        # s = sigmoid(2u) = 0.5 (1 + t) and 1 - t^2 = 4 s (1 - s): dx = g (s + 2 x s (1 - s) k (1 + 3*0.044715 x^2))
        return cp.ElementwiseKernel("T x, T g", "T dx", f"""
            float xf = (float)x; float u = {k}f * (xf + 0.044715f * xf * xf * xf);
            float s = 1.0f / (1.0f + __expf(-2.0f * u));
            float d = s + 2.0f * xf * s * (1.0f - s) * {k}f * (1.0f + 3.0f * 0.044715f * xf * xf);
            dx = (T)((float)g * d);""", "tglm_gelu_bwd")
    raise KeyError(name)


def gelu_forward(x: Any) -> Any:
    """y = gelu(x), same shape and dtype."""
    return _elementwise("gelu_fwd")(x)


def gelu_backward(x: Any, g: Any) -> Any:
    """dx = g * gelu'(x), same shape and dtype as x."""
    return _elementwise("gelu_bwd")(x, g)


class GeluCUDA(Gelu):
    """GELU as one kernel each way; saves only the input."""

    @staticmethod
    def supports(a: Any) -> bool:
        """A contiguous CuPy float16/bfloat16/float32 array (tensor/cuda/common.py: usable)."""
        return usable(a)

    def forward(self, a):
        self.save_for_backward(a)
        return gelu_forward(a)

    def backward(self, g):
        x = self.saved[0]
        if g.dtype != x.dtype or not g.flags.c_contiguous:  # the kernel takes g like x (0-d stays 0-d)
            g = g.astype(x.dtype, order="C")
        return (gelu_backward(x, g),)
