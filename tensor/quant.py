"""int8 weight-only quantization for inference: per-output-channel symmetric scales.

    q, s = quantize_int8(w)          w (out, in) float -> q (out, in) int8, s (out,) float32
    w_hat = dequantize_int8(q, s)    q * s[:, None], float32; |w - w_hat| <= s / 2 elementwise
    y = linear_int8(x, q, s, b)      x @ (q * s[:, None]).T + b           (LinearInt8)
    e = embedding_int8(ids, q, s)    q[ids] * s[ids, None]                (EmbeddingInt8)

Scales: s = max|w[row]| / 127 (a row of zeros gets s = 1 and q = 0), q = round(w / s) in
[-127, 127]: the rounding error is at most half a step, s / 2. The weights are 4x smaller
than float32 (plus one float32 per row).

Both ops are inference only: the int8 weights are frozen, and asking for a gradient through
them is an error. Fast paths (tensor/dispatch.py): tensor/cpu/quant.py (the scale moves out
of the product: (x @ q.T) * s), tensor/cuda/quant.py (dequantization inside a GEMV kernel for
decode-sized batches, dequantize + cuBLAS for longer inputs).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor.backend import array_module
from tensor.functional import check_ids
from tensor.dispatch import pick
from tensor.tensor import Function, Tensor, shape_str

QMAX = 127


def quantize_int8(w: Any) -> tuple[Any, Any]:
    """w (out, in) float (NumPy or CuPy) -> (q (out, in) int8, s (out,) float32), per-row absmax / 127."""
    if w.ndim != 2 or w.dtype.kind not in "fV":
        raise ValueError(f"quantize_int8: expected a 2-D float weight (out, in), got {w.dtype} {shape_str(w)}")
    xp = array_module(w)
    w32 = w.astype(np.float32)
    s = xp.abs(w32).max(axis=1) / QMAX
    s = xp.where(s > 0, s, 1.0).astype(np.float32)
    q = xp.clip(xp.rint(w32 / s[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, s


def dequantize_int8(q: Any, s: Any, dtype: Any = np.float32) -> Any:
    """q (out, in) int8, s (out,) -> q * s[:, None] (out, in), computed in float32 (float64 if asked)."""
    work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    w = q.astype(work) * s.astype(work)[:, None]
    return w if w.dtype == dtype else w.astype(dtype)


def _refuse_backward(op: str) -> RuntimeError:
    return RuntimeError(f"{op}: int8 weights are for inference only; no gradient flows through a quantized layer "
                        "(run it under `with no_grad():`, or train the float model and quantize afterwards)")


class LinearInt8(Function):
    """y = x @ (q * s[:, None]).T + b: x (..., in) float, q (out, in) int8, s (out,) float32,
    b (out,) or None -> (..., out) in x's dtype. Inference only."""
    # no derivative: the int8 weights are frozen (backward refuses)
    def forward(self, x, q, s, bias=None):
        self.check(x, q, s, bias)
        w = dequantize_int8(q, s, x.dtype)
        y = x.reshape(-1, x.shape[-1]) @ w.T
        if bias is not None:
            y += bias.astype(y.dtype, copy=False)
        return y.reshape(x.shape[:-1] + (q.shape[0],))

    def backward(self, g):
        raise _refuse_backward("linear_int8")

    @staticmethod
    def check(x: Any, q: Any, s: Any, bias: Any) -> None:
        """Shapes and dtypes: x (..., in) float, q (out, in) int8, s (out,), bias (out,) or None."""
        if q.dtype != np.int8 or q.ndim != 2:
            raise TypeError(f"linear_int8: weight must be (out, in) int8, got {q.dtype} {shape_str(q)}")
        if x.shape[-1] != q.shape[1]:
            raise ValueError(f"linear_int8: input of shape {shape_str(x)} has {x.shape[-1]} features, "
                             f"weight of shape {shape_str(q)} expects {q.shape[1]}")
        for name, a in (("scale", s), ("bias", bias)):
            if a is not None and a.shape != (q.shape[0],):
                raise ValueError(f"linear_int8: {name} of shape {shape_str(a)} does not match weight "
                                 f"{shape_str(q)} (expected ({q.shape[0]},))")


class EmbeddingInt8(Function):
    """out = q[ids] * s[ids, None]: ids int (...), q (V, C) int8, s (V,) float32 -> (..., C) float32.
    Inference only."""
    # no derivative: the int8 table is frozen (backward refuses)
    def forward(self, ids, q, s):
        check_ids("embedding_int8", ids, q.shape[0])
        return q[ids].astype(np.float32) * s[ids][..., None]

    def backward(self, g):
        raise _refuse_backward("embedding_int8")


def _arr(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def linear_int8(x: Tensor, q: Tensor, s: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ (q * s[:, None]).T + bias: x (..., in), q (out, in) int8, s (out,), bias (out,) -> (..., out)."""
    return pick(LinearInt8, _arr(x), _arr(q), _arr(s), _arr(bias)).apply(x, q, s, bias)


def embedding_int8(ids: Any, q: Tensor, s: Tensor) -> Tensor:
    """Rows of the int8 table q (V, C) picked by integer ids (...), times their scales -> (..., C) float32."""
    ids = _arr(ids)
    xp = array_module(_arr(q))
    if not hasattr(ids, "shape") or array_module(ids) is not xp:
        ids = xp.asarray(ids)
    return EmbeddingInt8.apply(ids, q, s)
