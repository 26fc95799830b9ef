"""Fused ops: each is ONE node in the graph with a hand-derived backward (not
composed from primitives), which saves memory and Python overhead.

Half-precision inputs (float16/bfloat16) are computed in float32 where range
matters (softmax, layer-norm statistics, losses) and cast back.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor import backend, kernels
from tensor.cuda import cublas
from tensor.backend import array_module
from tensor.ops.elementwise import BLOCK, over_blocks
from tensor.ops.indexing import scatter_add_rows
from tensor.tensor import Function, Tensor, shape_str


def _f32(x: Any) -> Any:
    """float16/bfloat16 -> float32 for accumulation; other dtypes unchanged."""
    return x.astype(np.float32) if x.dtype.itemsize < 4 and x.dtype.kind != "i" else x


def uniform(generator: Any, shape: tuple, like: Any) -> Any:
    """U[0, 1) samples on `like`'s device. A NumPy Generator also serves GPU tensors (drawn on
    the host, then copied), so dropout masks follow one checkpointable stream on any device."""
    xp = array_module(like)
    if generator is None:
        return xp.random.random(shape)
    u = generator.random(shape, dtype=np.float32)
    return xp.asarray(u) if array_module(u) is not xp else u


def gemm(a: Any, b: Any) -> Any:
    """a @ b for 2-D arrays, in a's dtype. NumPy has no float16 GEMM (a scalar loop, ~80x slower)
    and ml_dtypes' bfloat16 GEMM returns float32: on the CPU both multiply in float32 and round
    the result back, which is what a GPU's half-precision GEMM does too (float32 accumulation)."""
    if array_module(a) is not np:
        return a @ b
    if a.dtype.itemsize < 4 and a.dtype.kind != "i":
        return (a.astype(np.float32) @ b.astype(np.float32)).astype(a.dtype)
    if 1 < a.shape[0] <= 32 and b.flags.f_contiguous:
        # few rows times a transposed weight (decoding): OpenBLAS is ~2x faster on the
        # transposed product W @ a.T than on a @ W.T for these shapes (benchmarks/RESULTS.md)
        return np.ascontiguousarray((b.T @ a.T).T)
    return a @ b


def sum_rows(x: Any, out_dtype: Any = None) -> Any:
    """Sum over every axis but the last: (..., C) -> (C,), accumulated in float32 or wider,
    returned in out_dtype (default x's dtype).

    On the GPU one fused column-sum kernel (tensor/kernels.py): CuPy's reduction along a long
    leading axis measured ~10x slower (bias and LayerNorm gradients, 16384 rows)."""
    x2 = x.reshape(-1, x.shape[-1])
    out_dtype = x2.dtype if out_dtype is None else np.dtype(out_dtype)
    if kernels.usable(x2) and backend.dtype_name(out_dtype) in kernels.FLOATS:
        return kernels.column_sums(x2, out_dtype)
    if array_module(x2) is np and x2.dtype in (np.float32, np.float64) and x2.shape[0] > 1:
        # CPU: ones @ x, a GEMV, 2-4x faster than NumPy's reduction down the rows ((768, 128): 18 -> 5 us)
        s = np.ones(x2.shape[0], dtype=x2.dtype) @ x2
        return s if s.dtype == out_dtype else s.astype(out_dtype)
    s = x2.sum(axis=0, dtype=np.promote_types(out_dtype, np.float32))
    return s if s.dtype == out_dtype else s.astype(out_dtype)


def sum_last(x: Any) -> Any:
    """Sum over the last axis, keepdims: (..., C) -> (..., 1), as a matrix-vector product with ones.

    NumPy's own reduction along a short last axis pays a fixed cost per row (~25 us for (768, 128)
    float32, vs ~6 us for the GEMV); for a few rows (decoding) the plain reduction is cheaper."""
    if x.size < 32 * x.shape[-1]:
        return x.sum(axis=-1, keepdims=True)
    xp = array_module(x)
    return (x @ xp.ones(x.shape[-1], dtype=x.dtype))[..., None]


def _softmax(x: Any, axis: int) -> Any:
    xp = array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


class Softmax(Function):
    """y = exp(x) / sum(exp(x)) along `axis`."""
    # dx = y * (g - sum(g * y, axis))
    def forward(self, x, axis=-1):
        self.axis = axis
        y = _softmax(_f32(x), axis).astype(x.dtype, copy=False)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        y = self.saved[0]
        return (y * (g - (g * y).sum(axis=self.axis, keepdims=True)),)


class LogSoftmax(Function):
    """y = x - logsumexp(x) along `axis`."""
    # dx = g - softmax(x) * sum(g, axis)
    def forward(self, x, axis=-1):
        xp = array_module(x)
        self.axis = axis
        x32 = _f32(x)
        shifted = x32 - x32.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        y = y.astype(x.dtype, copy=False)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        y = self.saved[0]
        xp = array_module(y)
        return (g - xp.exp(y) * g.sum(axis=self.axis, keepdims=True),)


class CrossEntropy(Function):
    """Mean over targets != ignore_index of -log softmax(logits)[target].

    logits (..., C), targets int (...) -> scalar (float32 for half inputs).
    """
    # dlogits = (softmax(logits) - onehot(target)) * valid / n_valid
    def forward(self, logits, targets, ignore_index=-100):
        xp = array_module(logits)
        C = logits.shape[-1]
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy: targets of shape {shape_str(targets)} do not match logits of shape "
                             f"{shape_str(logits)} (expected {logits.shape[:-1]})")
        if targets.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
        x = _f32(logits).reshape(-1, C)
        t = targets.reshape(-1)
        valid = t != ignore_index
        # range check on the host only: on the GPU it would cost a synchronisation every step
        # (GPT.forward checks its targets on the host before they move to the device)
        if xp is np and bool(((t < 0) | (t >= C))[valid].any()):
            raise IndexError(f"cross_entropy: a target is outside [0, {C}) (ignore_index={ignore_index})")
        n_valid = int(valid.sum()) if xp is np else valid.sum()
        self.in_shape, self.in_dtype, self.ignore_index = logits.shape, logits.dtype, ignore_index
        out_dtype = np.float32 if logits.dtype.itemsize < 4 else logits.dtype
        if kernels.usable(logits):  # GPU: one kernel per pass (tensor/kernels.py), same formulas
            x = logits.reshape(-1, C)
            lse, nll = kernels.cross_entropy_forward(x, t, ignore_index)
            self.save_for_backward(x, t, lse, n_valid, None)
            return (nll.sum() / xp.maximum(n_valid, 1)).astype(out_dtype)
        t_safe = xp.where(valid, t, 0)
        shifted = x - x.max(axis=1, keepdims=True)
        sumexp = xp.exp(shifted).sum(axis=1, keepdims=True)
        rows = xp.arange(x.shape[0])
        nll = xp.log(sumexp[:, 0]) - shifted[rows, t_safe]
        loss = (nll * valid).sum() / xp.maximum(n_valid, 1)
        self.save_for_backward(shifted, sumexp, t_safe, valid, n_valid)
        return loss.astype(out_dtype)

    def backward(self, g):
        if self.saved[-1] is None:  # the fused GPU path
            x, t, lse, n_valid, _ = self.saved
            scale = g.astype(np.float32) / array_module(x).maximum(n_valid, 1)
            dx = kernels.cross_entropy_backward(x, t, lse, scale, self.ignore_index)
            return dx.reshape(self.in_shape).astype(self.in_dtype, copy=False), None
        shifted, sumexp, t_safe, valid, n_valid = self.saved
        xp = array_module(shifted)
        p = xp.exp(shifted)
        p /= sumexp
        p[xp.arange(p.shape[0]), t_safe] -= 1.0
        scale = g / xp.maximum(n_valid, 1)
        p *= (valid * scale).astype(p.dtype)[:, None]
        return p.reshape(self.in_shape).astype(self.in_dtype, copy=False), None


class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis.
    x (..., C), weight (C,) or None, bias (C,) or None."""
    # xhat = (x-mu)*rstd;  dxhat = g*w;  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat*xhat))
    # dw = sum(g*xhat), db = sum(g)  over all leading axes
    def forward(self, x, weight=None, bias=None, eps=1e-5):
        xp = array_module(x)
        C = x.shape[-1]
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.shape != (C,):
                raise ValueError(f"layer_norm: {name} of shape {shape_str(p)} does not match the last axis of x "
                                 f"{shape_str(x)} (expected ({C},))")
        self.has_bias, self.in_dtype = bias is not None, x.dtype
        same = all(p is None or p.dtype == x.dtype for p in (weight, bias))
        if same and kernels.usable(x, weight, bias):  # GPU: one fused kernel (tensor/kernels.py)
            y, mean, rstd = kernels.layer_norm_forward(x, weight, bias, eps)
            self.save_for_backward(x, mean, rstd, weight, "fused")
            return y
        # The CPU path: rows in pieces of ~BLOCK elements, every pass over a piece in the L2 cache
        # (ops/elementwise.py: over_blocks; backward on (4096, 384): 1.4x)
        x2 = _f32(x).reshape(-1, C)
        inv_c = 1.0 / C  # (sum * 1/C: ndarray.mean costs a Python-level wrapper per call)
        xhat, y = xp.empty_like(x2), xp.empty_like(x2)
        rstd = xp.empty((x2.shape[0], 1), dtype=x2.dtype)

        def piece(i: int, j: int) -> None:  # rows i..j
            xs, xh, ys, r = x2[i:j], xhat[i:j], y[i:j], rstd[i:j]
            xp.subtract(xs, sum_last(xs) * inv_c, out=xh)   # x - mu
            xp.multiply(xh, xh, out=ys)                      # the squares, in y's buffer
            var = sum_last(ys)
            var *= inv_c
            var += eps
            xp.sqrt(var, out=r)
            xp.divide(1.0, r, out=r)                         # rstd
            xh *= r                                          # xhat
            if weight is not None:
                xp.multiply(xh, weight, out=ys)
            else:
                ys[...] = xh
            if bias is not None:
                ys += bias
        over_blocks(piece, x2.shape[0], max(1, BLOCK // max(C, 1)))
        self.save_for_backward(xhat, rstd, weight)  # (rows, C) and (rows, 1)
        return y.reshape(x.shape).astype(x.dtype, copy=False)

    def backward(self, g):
        if len(self.saved) == 5:  # the fused GPU path
            x, mean, rstd, weight, _ = self.saved
            xp = array_module(x)
            g = xp.ascontiguousarray(g)
            need_w = weight is not None and self.needs_grad[1]
            dx, gxhat = kernels.layer_norm_backward(x, weight, g, mean, rstd, want_gxhat=need_w)
            dw = sum_rows(gxhat, weight.dtype) if need_w else None
            db = sum_rows(g) if self.has_bias and self.needs_grad[2] else None
            return dx, dw, db
        xhat, rstd, weight = self.saved
        C = g.shape[-1]
        g2, xh2, r2 = _f32(g).reshape(-1, C), xhat.reshape(-1, C), rstd.reshape(-1, 1)
        xp = array_module(g2)
        inv_c = 1.0 / C
        rows, block = g2.shape[0], max(1, BLOCK // max(C, 1))
        need_w = weight is not None and self.needs_grad[1]
        need_b = self.has_bias and self.needs_grad[2]
        nb = -(-rows // block)
        dws = xp.zeros((nb, C), dtype=g2.dtype) if need_w else None  # per-piece sums over rows,
        dbs = xp.zeros((nb, C), dtype=g2.dtype) if need_b else None  # added in a fixed order below
        w32 = None if weight is None else weight.astype(g2.dtype, copy=False)
        dx = xp.empty_like(g2)

        def piece(i: int, j: int) -> None:
            gs, xs, ds = g2[i:j], xh2[i:j], dx[i:j]
            tmp = gs * xs                                          # g * xhat
            if need_w:
                dws[i // block] = sum_rows(tmp)
            if need_b:
                dbs[i // block] = sum_rows(gs)
            if w32 is not None:
                xp.multiply(gs, w32, out=ds)                       # dxhat
                m2 = (tmp @ w32)[:, None] * inv_c                  # mean(dxhat * xhat)
            else:
                ds[...] = gs
                m2 = sum_last(tmp) * inv_c
            ds -= sum_last(ds) * inv_c                             # - mean(dxhat)
            xp.multiply(xs, m2, out=tmp)
            ds -= tmp                                              # - xhat * mean(dxhat * xhat)
            ds *= r2[i:j]
        over_blocks(piece, rows, block)
        dw = dws.sum(axis=0).astype(weight.dtype, copy=False) if need_w else None
        db = dbs.sum(axis=0).astype(g.dtype, copy=False) if need_b else None
        return dx.reshape(g.shape).astype(self.in_dtype, copy=False), dw, db


class Embedding(Function):
    """out = weight[ids]: ids int (...), weight (V, C) -> (..., C)."""
    # dweight[v] = sum of g over the positions where ids == v  (a scatter-add)
    def forward(self, ids, weight):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
        V = weight.shape[0]
        if ids.size and array_module(ids) is np and (int(ids.min()) < 0 or int(ids.max()) >= V):  # host only
            raise IndexError(f"embedding: ids must lie in [0, {V}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        self.save_for_backward(ids)
        self.V = V
        return weight[ids]

    def backward(self, g):
        ids = self.saved[0]
        C = g.shape[-1]
        return None, scatter_add_rows(ids.reshape(-1), g.reshape(-1, C), self.V)


class Dropout(Function):
    """Zero each element with probability p and scale the rest by 1/(1-p) (training only)."""
    # dx = g * mask / (1 - p)
    def forward(self, x, p=0.5, generator=None):
        keep = uniform(generator, x.shape, x) >= p
        mask = keep.astype(x.dtype) * (1.0 / (1.0 - p))
        self.save_for_backward(mask)
        return x * mask

    def backward(self, g):
        return (g * self.saved[0],)


class Linear(Function):
    """y = x @ W.T + b with x (..., in), W (out, in), b (out,) or None -> (..., out).

    compute_dtype (mixed precision, nn.amp): x and W are cast to it for the product, y is in it
    and the bias is added to it (in float on the GPU); each gradient comes back in its input's
    own dtype (float32 for the float32 master weights), on the GPU straight out of the GEMM."""
    # dx = g @ W,  dW = g^T x (over all rows),  db = sum of g over rows
    def forward(self, x, weight, bias=None, compute_dtype=None):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input of shape {shape_str(x)} has {x.shape[-1]} features, "
                             f"weight of shape {shape_str(weight)} expects {weight.shape[1]}")
        self.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if compute_dtype is not None:  # (dtype checks first: a no-op astype still costs a CuPy call)
            x = x if x.dtype == compute_dtype else x.astype(compute_dtype)
            weight = weight if weight.dtype == compute_dtype else weight.astype(compute_dtype)
        self.save_for_backward(x, weight)
        self.has_bias = bias is not None
        # one 2-D GEMM over all rows of every leading axis
        y = _mm(x.reshape(-1, x.shape[-1]), weight.T).reshape(x.shape[:-1] + (weight.shape[0],))
        if bias is not None:
            if kernels.usable(y, bias):  # GPU: one pass, any dtypes (CuPy's broadcast add is ~2x slower)
                kernels.bias_add(y, bias)
            elif bias.dtype == y.dtype:
                y += bias
            else:
                y += bias.astype(y.dtype)
        return y

    def backward(self, g):
        x, w = self.saved
        dx_t, dw_t, db_t = self.dtypes
        g2 = g.reshape(-1, g.shape[-1])
        if g2.dtype != w.dtype:
            g2 = g2.astype(w.dtype)
        gx = _mm(g2, w, dx_t).reshape(x.shape[:-1] + (w.shape[1],)) if self.needs_grad[0] else None
        gw = _mm(g2.T, x.reshape(-1, x.shape[-1]), dw_t) if self.needs_grad[1] else None
        gb = sum_rows(g2, db_t) if self.has_bias and self.needs_grad[2] else None
        return gx, gw, gb


def _mm(a: Any, b: Any, out_dtype: Any = None) -> Any:
    """a @ b (2-D, one dtype) -> out_dtype (default the inputs'): cuBLAS on the GPU, writing a
    16-bit product's float32 result directly; `gemm` (and a cast) otherwise."""
    out_dtype = np.dtype(out_dtype or a.dtype)
    if a.dtype == b.dtype and cublas.usable(a, b) and (out_dtype == a.dtype or out_dtype == np.float32):
        return cublas.matmul(a, b, out_dtype=out_dtype)
    return gemm(a, b).astype(out_dtype, copy=False)


# ------------------------------------------------------------------ public functions
def _arr(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def _ids_like(ids: Any, like: Tensor) -> Any:
    """Integer ids (a Tensor, array or list) as an array on `like`'s device."""
    ids = _arr(ids)
    if not hasattr(ids, "shape"):
        ids = np.asarray(ids)
    xp = array_module(like.data)
    return ids if array_module(ids) is xp else xp.asarray(ids)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Softmax along `axis`; same shape as x."""
    return Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Log-softmax along `axis`; same shape as x."""
    return LogSoftmax.apply(x, axis=axis)


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood. logits (..., C), targets int (...) -> scalar."""
    return CrossEntropy.apply(logits, _ids_like(targets, logits), ignore_index=ignore_index)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalize over the last axis, then scale and shift. x (..., C); weight, bias (C,)."""
    return LayerNorm.apply(x, weight, bias, eps=eps)


def embedding(ids: Any, weight: Tensor) -> Tensor:
    """Rows of `weight` (V, C) picked by integer `ids` (...) -> (..., C)."""
    return Embedding.apply(_ids_like(ids, weight), weight)


def dropout(x: Tensor, p: float = 0.5, training: bool = True, generator: Any = None) -> Tensor:
    """Inverted dropout. Identity when not training or p == 0. `generator` is a
    `numpy.random.Generator` (or CuPy's) for reproducible masks."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p=p, generator=generator)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, compute_dtype: Any = None) -> Tensor:
    """x @ weight.T + bias. x (..., in), weight (out, in), bias (out,) -> (..., out).
    compute_dtype: run the product in this (16-bit) dtype; gradients keep each input's dtype."""
    return Linear.apply(x, weight, bias, compute_dtype=compute_dtype)


def relu(x: Tensor) -> Tensor:
    return x.relu()


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation."""
    return x.gelu()


def sigmoid(x: Tensor) -> Tensor:
    return x.sigmoid()


def tanh(x: Tensor) -> Tensor:
    return x.tanh()
