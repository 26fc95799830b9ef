"""LayerNorm on the CPU: the reference formula (tensor/functional.py: LayerNorm) over rows in
pieces of ~BLOCK elements, so that every pass over a piece stays in the L2 cache
(tensor/cpu/blocks.py; backward on (4096, 384): 1.4x), with the row sums as GEMVs
(tensor/cpu/reductions.py) and the weight/bias gradients summed per piece, in a fixed order.
A few rows (decoding, <= FEW_ROWS) take one short pass instead: ~2x faster at batch 1 (13 LayerNorms
a token in the 6-layer model)."""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor.cpu.blocks import BLOCK, over_blocks
from tensor.functional import LayerNorm, sum_last, sum_rows, to_f32

FEW_ROWS = 32  # up to this many rows (decoding batches) skip the pieces: per-call overhead dominates


class LayerNormCPU(LayerNorm):
    """LayerNorm's formulas piece by piece; saves xhat (rows, C) and rstd (rows, 1)."""

    @staticmethod
    def supports(x: Any, weight: Any = None, bias: Any = None, **kwargs: Any) -> bool:
        """Every NumPy input (float16/bfloat16 compute in float32, as the reference does)."""
        return type(x) is np.ndarray

    def forward(self, x, weight=None, bias=None, eps=1e-5, out_dtype=None):
        self.prepare(x, weight, bias, out_dtype)
        C = x.shape[-1]
        x2 = to_f32(x).reshape(-1, C)
        inv_c = 1.0 / C  # (sum * 1/C: ndarray.mean costs a Python-level wrapper per call)
        if x2.shape[0] <= FEW_ROWS:  # decoding: a few rows in one go, the fewest NumPy calls, and
            xhat = x2 - sum_last(x2) * inv_c         # the same arithmetic as piece() below (so the
            var = sum_last(xhat * xhat)              # result does not depend on the path taken)
            var *= inv_c
            var += eps
            rstd = 1.0 / np.sqrt(var)
            xhat *= rstd
            y = xhat * weight if weight is not None else xhat.copy()
            if bias is not None:
                y += bias
            self.save_for_backward(xhat, rstd, weight)
            return y.reshape(x.shape).astype(self.out_dtype, copy=False)
        xhat, y = np.empty_like(x2), np.empty_like(x2)
        rstd = np.empty((x2.shape[0], 1), dtype=x2.dtype)

        def piece(i: int, j: int) -> None:  # rows i..j
            xs, xh, ys, r = x2[i:j], xhat[i:j], y[i:j], rstd[i:j]
            np.subtract(xs, sum_last(xs) * inv_c, out=xh)   # x - mu
            np.multiply(xh, xh, out=ys)                      # the squares, in y's buffer
            var = sum_last(ys)
            var *= inv_c
            var += eps
            np.sqrt(var, out=r)
            np.divide(1.0, r, out=r)                         # rstd
            xh *= r                                          # xhat
            if weight is not None:
                np.multiply(xh, weight, out=ys)
            else:
                ys[...] = xh
            if bias is not None:
                ys += bias
        over_blocks(piece, x2.shape[0], max(1, BLOCK // max(C, 1)))
        self.save_for_backward(xhat, rstd, weight)
        return y.reshape(x.shape).astype(self.out_dtype, copy=False)

    def backward(self, g):
        xhat, rstd, weight = self.saved
        C = g.shape[-1]
        g2 = to_f32(g).reshape(-1, C)
        inv_c = 1.0 / C
        rows, block = g2.shape[0], max(1, BLOCK // max(C, 1))
        need_w, need_b = self.need_w, self.need_b
        nb = -(-rows // block)
        dws = np.zeros((nb, C), dtype=g2.dtype) if need_w else None  # per-piece sums over rows,
        dbs = np.zeros((nb, C), dtype=g2.dtype) if need_b else None  # added in a fixed order below
        w32 = None if weight is None else weight.astype(g2.dtype, copy=False)
        dx = np.empty_like(g2)

        def piece(i: int, j: int) -> None:
            gs, xs, ds = g2[i:j], xhat[i:j], dx[i:j]
            tmp = gs * xs                                          # g * xhat
            if need_w:
                dws[i // block] = sum_rows(tmp)
            if need_b:
                dbs[i // block] = sum_rows(gs)
            if w32 is not None:
                np.multiply(gs, w32, out=ds)                       # dxhat
                m2 = (tmp @ w32)[:, None] * inv_c                  # mean(dxhat * xhat)
            else:
                ds[...] = gs
                m2 = sum_last(tmp) * inv_c
            ds -= sum_last(ds) * inv_c                             # - mean(dxhat)
            np.multiply(xs, m2, out=tmp)
            ds -= tmp                                              # - xhat * mean(dxhat * xhat)
            ds *= rstd[i:j]
        over_blocks(piece, rows, block)
        dw = dws.sum(axis=0).astype(weight.dtype, copy=False) if need_w else None
        db = dbs.sum(axis=0).astype(self.b_dtype, copy=False) if need_b else None
        return dx.reshape(g.shape).astype(self.in_dtype, copy=False), dw, db
