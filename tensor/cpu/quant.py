"""int8 Linear on the CPU (tensor/quant.py: LinearInt8): the per-row scale moves out of the
product, x @ (q * s[:, None]).T = (x @ q.T) * s, so the weight needs one int8 -> float pass
(no multiply over the whole matrix) and the product runs in BLAS (functional.gemm, with its
few-row layout). NumPy has no int8 GEMM, so the weight must be converted every call: int8
saves memory on the CPU, not time (benchmarks/RESULTS.md, "Fast inference (issue 19)")."""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor.cpu.attention import gemm_dtype
from tensor.functional import gemm
from tensor.quant import LinearInt8


class LinearInt8CPU(LinearInt8):
    """(x @ q.T) * s + b, in float32 for 16-bit x (cast back), else in x's dtype."""

    backward = LinearInt8.backward  # inference only: the reference's refusal

    @staticmethod
    def supports(x: Any, q: Any, s: Any, bias: Any = None) -> bool:
        return type(x) is np.ndarray

    def forward(self, x, q, s, bias=None):
        self.check(x, q, s, bias)
        work = gemm_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).astype(work, copy=False)
        y = gemm(x2, q.astype(work).T)     # the one pass over the weight: int8 -> float
        y *= s.astype(work, copy=False)
        if bias is not None:
            y += bias.astype(work, copy=False)
        return y.astype(x.dtype, copy=False).reshape(x.shape[:-1] + (q.shape[0],))
