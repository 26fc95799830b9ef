"""Linear on the GPU: the reference formulas (tensor/functional.py: Linear) with every product
straight through cuBLAS (tensor/cuda/cublas.py), a 16-bit product's float32 gradient written by
the GEMM itself. The bias rides in the GEMM's epilogue through cuBLASLt (tensor/cuda/cublaslt.py):
added to the accumulator in the forward, and its gradient (the column sums of g) taken by the
weight-gradient GEMM in the backward. Where cuBLASLt declines a case, the bias is added by one
kernel in float (tensor/cuda/layout.py: bias_add) and its gradient is a column-sum kernel
(functional.sum_rows).

LinearGeluCUDA: gelu(x W^T + b) (an MLP's c_fc and GELU, F.linear_gelu). When no gradient is
recorded (decoding), one GEMM with the bias and GELU in cuBLASLt's epilogue (GELU_BIAS): it keeps
no pre-activation. With gradients it is the product and the GELU kernel as before, in one node.
(The training form in the epilogues, GELU_AUX_BIAS forward and DGELU_BGRAD backward, is not done.)"""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor import autograd
from tensor.cuda import cublas, cublaslt
from tensor.cuda.common import usable
from tensor.cuda.gelu import gelu_backward, gelu_forward
from tensor.cuda.layout import bias_add
from tensor.functional import Linear, LinearGelu, gemm, sum_rows
from tensor.tensor import Function


def matmul(a: Any, b: Any, out_dtype: Any = None) -> Any:
    """a @ b (2-D, one dtype) -> out_dtype (default the inputs'): cuBLAS writing a 16-bit
    product's float32 result directly; `gemm` and a cast otherwise."""
    out_dtype = np.dtype(out_dtype or a.dtype)
    if a.dtype == b.dtype and cublas.usable(a, b) and (out_dtype == a.dtype or out_dtype == np.float32):
        return cublas.matmul(a, b, out_dtype=out_dtype)
    return gemm(a, b).astype(out_dtype, copy=False)


class LinearCUDA(Linear):
    """Linear through cuBLAS; saves x and W as the product sees them (as the reference)."""

    @staticmethod
    def supports(x: Any, weight: Any, bias: Any = None, compute_dtype: Any = None) -> bool:
        """CuPy float16/bfloat16/float32/float64 x and W (cuBLAS applies)."""
        return cublas.usable(x, weight)

    def forward(self, x, weight, bias=None, compute_dtype=None):
        x, weight = self.prepare(x, weight, bias, compute_dtype)
        shape = x.shape[:-1] + (weight.shape[0],)
        x2 = x.reshape(-1, x.shape[-1])
        if bias is not None and x2.dtype == weight.dtype:
            y = cublaslt.matmul_bias(x2, weight.T, bias, x2.dtype)
            if y is not None:
                return y.reshape(shape)
        y = matmul(x2, weight.T).reshape(shape)
        if bias is not None:
            if usable(y, bias):
                bias_add(y, bias)
            else:
                y += bias.astype(y.dtype, copy=False)
        return y

    def backward(self, g):
        x, w = self.saved
        dx_t, dw_t, db_t = self.dtypes
        g2 = g.reshape(-1, g.shape[-1])
        if g2.dtype != w.dtype:
            g2 = g2.astype(w.dtype)
        gx = matmul(g2, w, dx_t).reshape(x.shape[:-1] + (w.shape[1],)) if self.needs_grad[0] else None
        x2 = x.reshape(-1, x.shape[-1])
        if self.needs_grad[1] and self.has_bias and self.needs_grad[2]:
            fused = cublaslt.matmul_bgrad(g2.T, x2, dw_t, db_t)  # dW = g^T x and db = sum_rows(g), one GEMM
            if fused is not None:
                return gx, fused[0], fused[1]
        gw = matmul(g2.T, x2, dw_t) if self.needs_grad[1] else None
        gb = sum_rows(g2, db_t) if self.has_bias and self.needs_grad[2] else None
        return gx, gw, gb


class LinearGeluCUDA(LinearGelu):
    """gelu(x W^T + b). With no gradient to record (decoding): one cuBLASLt GEMM with the bias and
    the GELU in its epilogue, no GELU kernel, nothing kept. Otherwise (training): LinearCUDA, then
    the GELU kernel, z = x W^T + b kept for the backward (GELU kernel, then LinearCUDA's)."""

    @staticmethod
    def supports(x: Any, weight: Any, bias: Any = None, compute_dtype: Any = None) -> bool:
        """CuPy float16/bfloat16/float32 contiguous x, W (and b)."""
        return usable(x, weight, bias)

    def forward(self, x, weight, bias=None, compute_dtype=None):
        self.linear = LinearCUDA()
        if not autograd.grad_enabled:
            xc, w = self.linear.prepare(x, weight, bias, compute_dtype)
            x2 = xc.reshape(-1, xc.shape[-1])
            if bias is not None and x2.dtype == w.dtype:
                y = cublaslt.matmul_bias_gelu(x2, w.T, bias, x2.dtype)
                if y is not None:
                    return y.reshape(xc.shape[:-1] + (w.shape[0],))
        z = self.linear.forward(x, weight, bias, compute_dtype)
        self.save_for_backward(*self.linear.saved, z)
        return gelu_forward(z)

    def backward(self, g):
        z = self.saved[-1]
        if g.dtype != z.dtype or not g.flags.c_contiguous:  # the kernel takes g like z
            g = g.astype(z.dtype, order="C")
        self.linear.needs_grad = self.needs_grad
        return self.linear.backward(gelu_backward(z, g))

    def release(self) -> None:
        Function.release(self)
        self.linear.release()
