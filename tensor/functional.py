"""Fused ops: each is ONE node in the graph with its own backward (not composed from
primitives), which saves memory and Python overhead.

Each Function below is the reference: the textbook formula in array code written once against
`xp` (NumPy or CuPy), its derivative stated in one comment line. Faster code for the same
formula lives beneath, as subclasses chosen by tensor/dispatch.py (`pick`): CPU NumPy tricks in
tensor/cpu/, CUDA kernels in tensor/cuda/. The public functions at the bottom choose.

Half-precision inputs (float16/bfloat16) are computed in float32 where range matters (softmax,
layer-norm statistics, losses) and cast back.

Array helpers for nn/ (public, documented below): `to_f32`, `uniform`, `gemm`, `sum_rows`, `sum_last`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tensor import backend
from tensor.backend import array_module
from tensor.cpu import reductions as cpu_reductions
from tensor.dispatch import fast_paths_enabled, pick
from tensor.ops.elementwise import Gelu
from tensor.ops.indexing import scatter_add_rows
from tensor.tensor import Function, Tensor, shape_str


# ------------------------------------------------------------------ array helpers
def to_f32(x: Any) -> Any:
    """float16/bfloat16 -> float32 for accumulation; other dtypes (float32, float64, ints) unchanged."""
    return x.astype(np.float32) if x.dtype.itemsize < 4 and x.dtype.kind != "i" else x


def uniform(generator: Any, shape: tuple, like: Any) -> Any:
    """U[0, 1) samples of `shape` on `like`'s device. A NumPy Generator also serves GPU tensors: there one
    draw from it seeds a counter-based generator on the device (tensor/cuda/sampling.py: device_uniform;
    drawing every number on the host and copying it cost more than the rest of a training step), so masks
    follow the Generator's checkpointable stream on either device (the GPU's masks are not the CPU's)."""
    xp = array_module(like)
    if generator is None:
        return xp.random.random(shape)
    if xp is not np and isinstance(generator, np.random.Generator):
        from tensor.cuda.sampling import device_uniform
        return device_uniform(int(generator.integers(0, 2 ** 63, dtype=np.int64)), shape)
    u = generator.random(shape, dtype=np.float32)
    return xp.asarray(u) if array_module(u) is not xp else u


def gemm(a: Any, b: Any) -> Any:
    """a (n, k) @ b (k, m) -> (n, m) in a's dtype. NumPy has no float16 GEMM (a scalar loop, ~80x
    slower) and ml_dtypes' bfloat16 GEMM returns float32: on the CPU both multiply in float32 and
    round the result back, which is what a GPU's half-precision GEMM does too (float32
    accumulation). A few rows times a transposed weight take tensor/cpu/reductions.py's layout.
    On the GPU, float arrays of one dtype go through cuBLAS (tensor/cuda/cublas.py), so that a
    float32 product follows backend.set_tf32 as every other GEMM does."""
    if array_module(a) is not np:
        from tensor.cuda import cublas
        if a.dtype == b.dtype and cublas.usable(a, b):
            return cublas.matmul(a, b)
        return a @ b
    if a.dtype.itemsize < 4 and a.dtype.kind != "i":
        return (a.astype(np.float32) @ b.astype(np.float32)).astype(a.dtype)
    if fast_paths_enabled() and cpu_reductions.gemm_supports(a, b):
        return cpu_reductions.gemm(a, b)
    return a @ b


def sum_rows(x: Any, out_dtype: Any = None) -> Any:
    """Sum over every axis but the last: (..., C) -> (C,), accumulated in float32 or wider,
    returned in out_dtype (default x's dtype). Fast paths: a GEMV on the CPU
    (tensor/cpu/reductions.py), one column-sum kernel on the GPU (tensor/cuda/colsum.py)."""
    x2 = x.reshape(-1, x.shape[-1])
    out_dtype = x2.dtype if out_dtype is None else np.dtype(out_dtype)
    if fast_paths_enabled():
        if array_module(x2) is np:
            if cpu_reductions.sum_rows_supports(x2):
                return cpu_reductions.sum_rows(x2, out_dtype)
        else:
            from tensor.cuda import colsum, common
            if common.usable(x2) and backend.dtype_name(out_dtype) in common.FLOATS:
                return colsum.column_sums(x2, out_dtype)
    s = x2.sum(axis=0, dtype=np.promote_types(out_dtype, np.float32))
    return s if s.dtype == out_dtype else s.astype(out_dtype)


def sum_last(x: Any) -> Any:
    """Sum over the last axis, keepdims: (..., C) -> (..., 1), in x's dtype; a GEMV with ones for
    many rows (tensor/cpu/reductions.py)."""
    if fast_paths_enabled() and cpu_reductions.sum_last_supports(x):
        return cpu_reductions.sum_last(x)
    return x.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------ the reference Functions
def _softmax(x: Any, axis: int) -> Any:
    xp = array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


class Softmax(Function):
    """y = exp(x) / sum(exp(x)) along `axis`; same shape as x."""
    # dx = y * (g - sum(g * y, axis))
    def forward(self, x, axis=-1):
        self.axis = axis
        y = _softmax(to_f32(x), axis).astype(x.dtype, copy=False)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        y = self.saved[0]
        return (y * (g - (g * y).sum(axis=self.axis, keepdims=True)),)


class LogSoftmax(Function):
    """y = x - logsumexp(x) along `axis`; same shape as x."""
    # dx = g - softmax(x) * sum(g, axis)
    def forward(self, x, axis=-1):
        xp = array_module(x)
        self.axis = axis
        x32 = to_f32(x)
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
        t, valid = self.prepare(logits, targets, ignore_index)
        xp = array_module(logits)
        x = to_f32(logits).reshape(-1, logits.shape[-1])
        t_safe = xp.where(valid, t, 0)
        shifted = x - x.max(axis=1, keepdims=True)
        sumexp = xp.exp(shifted).sum(axis=1, keepdims=True)
        nll = xp.log(sumexp[:, 0]) - shifted[xp.arange(x.shape[0]), t_safe]
        self.save_for_backward(shifted, sumexp, t_safe, valid)
        return ((nll * valid).sum() / xp.maximum(self.n_valid, 1)).astype(self.out_dtype)

    def backward(self, g):
        shifted, sumexp, t_safe, valid = self.saved
        xp = array_module(shifted)
        p = xp.exp(shifted)
        p /= sumexp                                           # softmax
        p[xp.arange(p.shape[0]), t_safe] -= 1.0               # - onehot
        p *= (valid * (g / xp.maximum(self.n_valid, 1))).astype(p.dtype)[:, None]
        return p.reshape(self.in_shape).astype(self.in_dtype, copy=False), None

    def prepare(self, logits: Any, targets: Any, ignore_index: int) -> tuple[Any, Any]:
        """Check the arguments and record what every path shares (in_shape, in_dtype, out_dtype,
        ignore_index, n_valid) -> (targets (N,), valid (N,) bool)."""
        xp = array_module(logits)
        C = logits.shape[-1]
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy: targets of shape {shape_str(targets)} do not match logits of shape "
                             f"{shape_str(logits)} (expected {logits.shape[:-1]})")
        if targets.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
        t = targets.reshape(-1)
        valid = t != ignore_index
        # range check on the host only: on the GPU it would cost a synchronisation every step
        # (GPT.forward checks its targets on the host before they move to the device)
        if xp is np and bool(((t < 0) | (t >= C))[valid].any()):
            raise IndexError(f"cross_entropy: a target is outside [0, {C}) (ignore_index={ignore_index})")
        self.n_valid = int(valid.sum()) if xp is np else valid.sum()
        self.in_shape, self.in_dtype, self.ignore_index = logits.shape, logits.dtype, ignore_index
        self.out_dtype = np.float32 if logits.dtype.itemsize < 4 else logits.dtype
        return t, valid


class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis.
    x (..., C), weight (C,) or None, bias (C,) or None -> y of x's shape, in out_dtype (default x's
    dtype; mixed precision asks for the compute dtype when y feeds a product, nn.amp). The
    statistics are float32 (or wider) whatever the dtypes; dx comes back in x's dtype."""
    # dxhat = g*w;  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat*xhat));  dw = sum(g*xhat), db = sum(g)
    def forward(self, x, weight=None, bias=None, eps=1e-5, out_dtype=None):
        self.prepare(x, weight, bias, out_dtype)
        xp = array_module(x)
        x32 = to_f32(x)
        xc = x32 - x32.mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
        xhat = xc * rstd
        y = xhat if weight is None else xhat * weight
        y = y if bias is None else y + bias
        self.save_for_backward(xhat, rstd, weight)
        return y.astype(self.out_dtype, copy=False)

    def backward(self, g):
        xhat, rstd, weight = self.saved
        g32 = to_f32(g)
        dxhat = g32 if weight is None else g32 * weight
        dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        lead = tuple(range(g.ndim - 1))  # every axis but the last
        dw = (g32 * xhat).sum(axis=lead).astype(weight.dtype, copy=False) if self.need_w else None
        db = g32.sum(axis=lead).astype(self.b_dtype, copy=False) if self.need_b else None
        return dx.astype(self.in_dtype, copy=False), dw, db

    def prepare(self, x: Any, weight: Any, bias: Any, out_dtype: Any = None) -> None:
        """Check the parameter shapes; record in_dtype, out_dtype, b_dtype and has_bias (every path
        shares them)."""
        C = x.shape[-1]
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.shape != (C,):
                raise ValueError(f"layer_norm: {name} of shape {shape_str(p)} does not match the last axis of x "
                                 f"{shape_str(x)} (expected ({C},))")
        self.has_bias, self.has_weight, self.in_dtype = bias is not None, weight is not None, x.dtype
        self.out_dtype = x.dtype if out_dtype is None else np.dtype(out_dtype)
        self.b_dtype = x.dtype if bias is None else bias.dtype

    @property
    def need_w(self) -> bool:
        return self.has_weight and self.needs_grad[1]

    @property
    def need_b(self) -> bool:
        return self.has_bias and self.needs_grad[2]


def check_ids(op: str, ids: Any, V: int) -> int:
    """Refuse non-integer ids, and on the host ids outside [0, V) (a device check would sync); -> V."""
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{op}: ids must be integers, got dtype {ids.dtype}")
    if ids.size and array_module(ids) is np and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise IndexError(f"{op}: ids must lie in [0, {V}), got values in [{int(ids.min())}, {int(ids.max())}]")
    return V


class Embedding(Function):
    """out = weight[ids]: ids int (...), weight (V, C) -> (..., C)."""
    # dweight[v] = sum of g over the positions where ids == v  (a scatter-add)
    def forward(self, ids, weight):
        V = check_ids("embedding", ids, weight.shape[0])
        self.save_for_backward(ids)
        self.V = V
        return weight[ids]

    def backward(self, g):
        ids = self.saved[0]
        C = g.shape[-1]
        return None, scatter_add_rows(ids.reshape(-1), g.reshape(-1, C), self.V)


class Dropout(Function):
    """Zero each element with probability p and scale the rest by 1/(1-p) (training only); same shape as x."""
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
    and the bias is added to it; each gradient comes back in its input's own dtype (float32 for
    the float32 master weights)."""
    # dx = g @ W,  dW = g^T x (over all rows),  db = sum of g over rows (column sums)
    def forward(self, x, weight, bias=None, compute_dtype=None):
        x, weight = self.prepare(x, weight, bias, compute_dtype)
        y = gemm(x.reshape(-1, x.shape[-1]), weight.T).reshape(x.shape[:-1] + (weight.shape[0],))
        if bias is not None:
            y += bias.astype(y.dtype, copy=False)
        return y

    def backward(self, g):
        x, w = self.saved
        dx_t, dw_t, db_t = self.dtypes
        g2 = g.reshape(-1, g.shape[-1]).astype(w.dtype, copy=False)
        gx = gemm(g2, w).astype(dx_t, copy=False).reshape(x.shape[:-1] + (w.shape[1],)) if self.needs_grad[0] else None
        gw = gemm(g2.T, x.reshape(-1, x.shape[-1])).astype(dw_t, copy=False) if self.needs_grad[1] else None
        gb = sum_rows(g2, db_t) if self.has_bias and self.needs_grad[2] else None
        return gx, gw, gb

    def prepare(self, x: Any, weight: Any, bias: Any, compute_dtype: Any) -> tuple[Any, Any]:
        """Check the shapes, record each input's dtype, cast x and W to compute_dtype and save
        them -> (x, W) as the product sees them."""
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input of shape {shape_str(x)} has {x.shape[-1]} features, "
                             f"weight of shape {shape_str(weight)} expects {weight.shape[1]}")
        self.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if compute_dtype is not None:  # (dtype checks first: a no-op astype still costs a CuPy call)
            x = x if x.dtype == compute_dtype else x.astype(compute_dtype)
            weight = weight if weight.dtype == compute_dtype else weight.astype(compute_dtype)
        self.save_for_backward(x, weight)
        self.has_bias = bias is not None
        return x, weight


class LinearGelu(Function):
    """gelu(x @ W.T + b): Linear, then GELU (tanh form), as one node; arguments and shapes as Linear's,
    x (..., in) -> (..., out). The reference is the two reference ops one after the other; a fast
    path may apply the GELU in the product's epilogue (tensor/cuda/linear.py: LinearGeluCUDA)."""
    # z = x W^T + b, y = gelu(z):  dz = gelu'(z) g (Gelu.backward), then Linear.backward(dz)
    def forward(self, x, weight, bias=None, compute_dtype=None):
        self.linear, self.gelu = Linear(), Gelu()
        y = self.gelu.forward(self.linear.forward(x, weight, bias, compute_dtype))
        self.save_for_backward(*self.linear.saved, *self.gelu.saved)  # (seen by the in-place checks)
        return y

    def backward(self, g):
        self.linear.needs_grad = self.needs_grad
        return self.linear.backward(self.gelu.backward(g)[0])

    def release(self) -> None:
        super().release()
        self.linear.release()
        self.gelu.release()


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
    ids = _ids_like(targets, logits)
    return pick(CrossEntropy, _arr(logits), ids).apply(logits, ids, ignore_index=ignore_index)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               out_dtype: Any = None) -> Tensor:
    """Normalize over the last axis, then scale and shift. x (..., C); weight, bias (C,) -> (..., C)
    in out_dtype (default x's dtype; statistics in float32 or wider either way)."""
    return pick(LayerNorm, _arr(x), _arr(weight), _arr(bias)).apply(x, weight, bias, eps=eps, out_dtype=out_dtype)


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
    return pick(Linear, _arr(x), _arr(weight), _arr(bias), compute_dtype=compute_dtype).apply(
        x, weight, bias, compute_dtype=compute_dtype)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None, compute_dtype: Any = None) -> Tensor:
    """gelu(linear(x, weight, bias)): x (..., in), weight (out, in), bias (out,) -> (..., out). One op
    where a fast path takes it (on the GPU; with no gradient to record, the GELU rides in the GEMM's
    epilogue), else the two ops, each through its own dispatch."""
    cls = pick(LinearGelu, _arr(x), _arr(weight), _arr(bias), compute_dtype=compute_dtype)
    if cls is LinearGelu:
        return gelu(linear(x, weight, bias, compute_dtype))
    return cls.apply(x, weight, bias, compute_dtype=compute_dtype)


def relu(x: Tensor) -> Tensor:
    """max(x, 0) elementwise; same shape as x."""
    return x.relu()


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation, elementwise; same shape as x (a fast path where one applies)."""
    return x.gelu()


def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + exp(-x)) elementwise; same shape as x."""
    return x.sigmoid()


def tanh(x: Tensor) -> Tensor:
    """tanh(x) elementwise; same shape as x."""
    return x.tanh()
