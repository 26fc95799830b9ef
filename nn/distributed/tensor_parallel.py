"""Tensor parallelism (Megatron-LM: Shoeybi et al., 2019): one layer's matrices split over the
ranks of a tp group, so each rank holds and multiplies 1/tp of them.

The two conjugate operators, each an autograd Function:

    f = copy_to_tp(x):     forward  y = x                  (x replicated on every rank)
                           backward dx = sum over ranks of dy  (all-reduce)
    g = reduce_from_tp(x): forward  y = sum over ranks of x   (all-reduce)
                           backward dx = dy                  (identity)

A column-parallel Linear (rank t holds the rows W_t of W, i.e. output features) starts with f;
a row-parallel Linear (rank t holds the columns W_t of W, i.e. input features) ends with g:

    x -> f -> [x @ W1_t.T + b1_t] -> GELU -> [h_t @ W2_t.T] -> g -> + b2      (an MLP)

so the pair costs one all-reduce forward (g) and one backward (f), whatever the width. In a GPT
block c_attn and mlp.c_fc are column-parallel (c_attn split per head: rank t holds the q, k
and v columns of heads t*H/tp .. (t+1)*H/tp - 1, so attention needs no communication),
attn.c_proj and mlp.c_proj row-parallel: two all-reduces per block forward, two backward.

The tied embedding / output layer is split over the vocabulary (VocabParallelEmbedding: rank t
holds rows t*V/tp ..; vocab_parallel_cross_entropy): the logits stay sharded, the loss needs
the row maxima (one all-gather of B*T floats) and the sums of exponentials and target logits
(one all-reduce of 2*B*T floats).

Everything here is written against the array module of its inputs and a Communicator
(nn/distributed/comm.py) whose transports carry NumPy or CuPy buffers, so the same code runs
on the CPU and the GPU.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import tensor.functional as F
from nn.init import is_placeholder, placeholder
from nn.layers import Linear
from nn.module import Module, Parameter
from tensor.backend import array_module
from tensor.tensor import Function, Tensor, shape_str

__all__ = ["CopyToTP", "ReduceFromTP", "copy_to_tp", "reduce_from_tp", "ColumnParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "VocabParallelCrossEntropy", "vocab_parallel_cross_entropy", "shard", "part_shape",
           "unshard", "gather_full", "CountingComm"]


def _allreduce(comm: Any, a: Any) -> Any:
    """a (any shape) summed over comm's ranks, as a new array of a's shape and dtype. Half
    types (float16, bfloat16) travel and add up in float32."""
    xp = array_module(a)
    buf = a.astype(np.float32) if a.dtype.itemsize < 4 else a.copy()
    buf = xp.ascontiguousarray(buf).reshape(-1)
    comm.allreduce(buf, op="sum")
    return buf.reshape(a.shape).astype(a.dtype, copy=False)


# ---------------------------------------------------------------- f and g
class CopyToTP(Function):
    """f: identity forward, all-reduce backward. x replicated (...) -> the same x (...)."""
    # y = x on every rank, and rank r's part of the loss depends on y through its own shard: dL/dx = sum_r dL_r/dy
    def forward(self, x, comm=None):
        self.comm = comm
        return x

    def backward(self, g):
        return (_allreduce(self.comm, g),)


class ReduceFromTP(Function):
    """g: all-reduce forward, identity backward. Partial sums x_r (...) -> their sum (...)."""
    # y = sum_r x_r: dy/dx_r = 1, so dL/dx_r = dL/dy (already the same on every rank)
    def forward(self, x, comm=None):
        self.comm = comm
        return _allreduce(comm, x)

    def backward(self, g):
        return (g,)


def copy_to_tp(x: Tensor, comm: Any) -> Tensor:
    """f: x (...) replicated -> x (...); its gradient is summed over comm's ranks."""
    return CopyToTP.apply(x, comm=comm)


def reduce_from_tp(x: Tensor, comm: Any) -> Tensor:
    """g: this rank's partial x (...) -> the sum over comm's ranks (...)."""
    return ReduceFromTP.apply(x, comm=comm)


# ---------------------------------------------------------------- how a full array is split
# kind  rank t's part of the full array
# rep   all of it (replicated)
# rows  rows t*n/tp .. (t+1)*n/tp - 1 (axis 0): column-parallel weight (out, in) and bias (out,)
# qkv   the rows block t of each third (q | k | v) of axis 0: c_attn, whole heads per rank
# cols  columns block t (last axis): row-parallel weight (out, in)
# vocab rows block t after padding axis 0 with zero rows to a multiple of tp: the tied wte/lm_head
KINDS = ("rep", "rows", "qkv", "cols", "vocab")


def padded(n: int, tp: int) -> int:
    """n rounded up to a multiple of tp."""
    return -(-n // tp) * tp


def part_shape(kind: str, shape: tuple, tp: int) -> tuple:
    """The shape of one rank's part of a full array of `shape` split as `kind` says over tp ranks."""
    if kind in ("rows", "qkv"):
        return (shape[0] // tp,) + tuple(shape[1:])
    if kind == "vocab":
        return (padded(shape[0], tp) // tp,) + tuple(shape[1:])
    if kind == "cols":
        return tuple(shape[:-1]) + (shape[-1] // tp,)
    return tuple(shape)


def shard(full: Any, kind: str, t: int, tp: int) -> Any:
    """Rank t's part (a copy) of the full array, split as `kind` says over tp ranks. A placeholder
    (nn.init.Placeholders: a weight not drawn yet) gives a placeholder of the part's shape."""
    if kind in KINDS and is_placeholder(full):
        return placeholder(part_shape(kind, full.shape, tp))
    xp = array_module(full)
    if kind == "rep":
        return full.copy()
    if kind == "vocab":  # this rank's rows, then its zero padding rows (the full array is never padded whole)
        n = padded(full.shape[0], tp) // tp
        part = xp.zeros((n,) + full.shape[1:], dtype=full.dtype)
        mine = full[t * n:(t + 1) * n]
        part[:mine.shape[0]] = mine
        return part
    if kind == "rows":
        return xp.split(full, tp, axis=0)[t].copy()
    if kind == "cols":
        return xp.split(full, tp, axis=-1)[t].copy()
    if kind == "qkv":
        return xp.concatenate([xp.split(part, tp, axis=0)[t] for part in xp.split(full, 3, axis=0)])
    raise ValueError(f"shard: kind must be one of {KINDS}, got {kind!r}")


def unshard(parts: Sequence[Any], kind: str, rows: int | None = None) -> Any:
    """The full array from every rank's part (in rank order), the inverse of shard. rows: the
    full number of rows of a "vocab" array (its padding is dropped)."""
    xp = array_module(parts[0])
    if kind == "rep":
        return parts[0]
    if kind == "rows":
        return xp.concatenate(parts)
    if kind == "vocab":
        return xp.concatenate(parts)[:rows]
    if kind == "cols":
        return xp.concatenate(parts, axis=-1)
    if kind == "qkv":
        thirds = [xp.split(p, 3, axis=0) for p in parts]
        return xp.concatenate([thirds[t][j] for j in range(3) for t in range(len(parts))])
    raise ValueError(f"unshard: kind must be one of {KINDS}, got {kind!r}")


def gather_full(comm: Any, part: Any, kind: str, rows: int | None = None) -> Any:
    """A collective over comm: every rank's part of one array (same shape on every rank) -> the
    full array (on every rank). "rep" parts are returned as they are, with no communication."""
    if kind == "rep" or comm.size == 1:
        return unshard([part], kind, rows)
    xp = array_module(part)
    flat = xp.ascontiguousarray(part).reshape(-1)
    out = xp.empty(flat.size * comm.size, dtype=flat.dtype)
    comm.all_gather(flat, out)
    return unshard([p.reshape(part.shape) for p in xp.split(out, comm.size)], kind, rows)


# ---------------------------------------------------------------- layers
class ColumnParallelLinear(Linear):
    """y_t = f(x) @ W_t.T + b_t. x (..., in) replicated -> (..., out/tp), this rank's output features.
    weight (out/tp, in), bias (out/tp,) or None. parts=3: W is c_attn's q | k | v, each split by heads."""

    def __init__(self, weight: Parameter, bias: Parameter | None, comm: Any, parts: int = 1) -> None:
        self.weight, self.bias, self.comm = weight, bias, comm
        self.out_features, self.in_features = weight.shape[0] * comm.size, weight.shape[1]
        self.shard_kinds = {"weight": "qkv" if parts == 3 else "rows", "bias": "qkv" if parts == 3 else "rows"}

    @classmethod
    def from_linear(cls, lin: Linear, comm: Any, parts: int = 1) -> "ColumnParallelLinear":
        """Rank comm.rank's share of a full Linear (its values copied)."""
        kind = "qkv" if parts == 3 else "rows"
        split = (lambda p: Parameter(shard(p.data, kind, comm.rank, comm.size)))
        out = cls(split(lin.weight), split(lin.bias) if lin.bias is not None else None, comm, parts)
        out.compute_dtype = lin.compute_dtype
        return out

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(copy_to_tp(x, self.comm), self.weight, self.bias, compute_dtype=self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features} / {self.comm.size}, bias={self.bias is not None}"


class RowParallelLinear(Linear):
    """y = g(x_t @ W_t.T) + b. x (..., in/tp), this rank's input features -> (..., out) replicated.
    weight (out, in/tp); bias (out,) replicated, added once after the reduction."""

    def __init__(self, weight: Parameter, bias: Parameter | None, comm: Any) -> None:
        self.weight, self.bias, self.comm = weight, bias, comm
        self.out_features, self.in_features = weight.shape[0], weight.shape[1] * comm.size
        self.shard_kinds = {"weight": "cols", "bias": "rep"}

    @classmethod
    def from_linear(cls, lin: Linear, comm: Any) -> "RowParallelLinear":
        """Rank comm.rank's share of a full Linear (its values copied)."""
        w = Parameter(shard(lin.weight.data, "cols", comm.rank, comm.size))
        out = cls(w, Parameter(lin.bias.data.copy()) if lin.bias is not None else None, comm)
        out.compute_dtype = lin.compute_dtype
        return out

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_tp(F.linear(x, self.weight, None, compute_dtype=self.compute_dtype), self.comm)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features} / {self.comm.size}, {self.out_features}, bias={self.bias is not None}"


class VocabParallelEmbedding(Module):
    """Rows of a (V, C) table split over the ranks: rank t holds rows start .. start + V_pad/tp - 1
    (V padded with zero rows to a multiple of tp). ids (...) -> g(this rank's rows, zeros for
    ids it does not hold) (..., C), replicated."""

    def __init__(self, weight: Parameter, comm: Any, num_embeddings: int) -> None:
        self.weight, self.comm, self.num_embeddings = weight, comm, num_embeddings
        self.start = comm.rank * weight.shape[0]
        self.shard_kinds = {"weight": "vocab"}

    @classmethod
    def from_embedding(cls, emb: Any, comm: Any) -> "VocabParallelEmbedding":
        return cls(Parameter(shard(emb.weight.data, "vocab", comm.rank, comm.size)), comm, emb.weight.shape[0])

    def forward(self, ids: Any) -> Tensor:
        ids = ids.data if isinstance(ids, Tensor) else ids
        xp = array_module(self.weight.data)
        local = xp.asarray(ids) - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(xp.where(mine, local, 0), self.weight) * mine[..., None].astype(self.weight.dtype)
        return reduce_from_tp(rows, self.comm)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} / {self.comm.size}, {self.weight.shape[1]}"


class VocabParallelCrossEntropy(Function):
    """Mean over targets != ignore_index of -log softmax(logits)[target], the logits split over the
    vocabulary: logits (..., V_pad/tp) this rank's columns (global columns start ..), targets int
    (...) -> scalar (float32, float64 for float64 logits), the same on every rank. Columns >= vocab (padding) are left out."""
    # loss_i = log(sum_v exp(z_iv - m_i)) - (z_i,target - m_i), m_i = max over all ranks' columns
    # dz_iv = (softmax(z)_iv - [v == target_i]) * valid_i / n_valid   (this rank's columns: no communication)
    def forward(self, logits, targets, comm=None, start=0, vocab=None, ignore_index=-100):
        xp = array_module(logits)
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"vocab_parallel_cross_entropy: targets of shape {shape_str(targets)} do not match "
                             f"logits of shape {shape_str(logits)} (expected {logits.shape[:-1]})")
        n = logits.shape[-1]
        acc = np.float64 if logits.dtype == np.float64 else np.float32  # half logits: float32 statistics
        x = logits.reshape(-1, n).astype(acc)                           # a copy
        N = x.shape[0]
        if vocab is not None and start + n > vocab:  # padding columns: probability 0
            x[:, max(vocab - start, 0):] = -np.inf
        local_max = xp.ascontiguousarray(x.max(axis=1))
        maxima = xp.empty(N * comm.size, dtype=acc)
        comm.all_gather(local_max, maxima)
        shifted = x - maxima.reshape(comm.size, N).max(axis=0)[:, None]
        e = xp.exp(shifted)
        t = targets.reshape(-1)
        valid = t != ignore_index
        local_t = t - start
        mine = valid & (local_t >= 0) & (local_t < n)
        local_t = xp.where(mine, local_t, 0)
        sums = xp.concatenate([e.sum(axis=1), xp.where(mine, shifted[xp.arange(N), local_t], 0.0)])
        comm.allreduce(sums, op="sum")                     # sum of exp, and the target's shifted logit
        nll = xp.log(sums[:N]) - sums[N:]
        self.n_valid = valid.sum()
        self.in_shape, self.in_dtype = logits.shape, logits.dtype
        self.save_for_backward(e, sums[:N], local_t, mine, valid)
        return ((nll * valid).sum() / xp.maximum(self.n_valid, 1)).astype(acc)

    def backward(self, g):
        e, sumexp, local_t, mine, valid = self.saved
        xp = array_module(e)
        p = e / sumexp[:, None]                              # softmax, this rank's columns
        p[xp.arange(p.shape[0]), local_t] -= mine            # - onehot, where the target is here
        p *= (valid * (g / xp.maximum(self.n_valid, 1))).astype(p.dtype)[:, None]
        return p.reshape(self.in_shape).astype(self.in_dtype, copy=False), None


def vocab_parallel_cross_entropy(logits: Tensor, targets: Any, comm: Any, start: int, vocab: int | None = None,
                                 ignore_index: int = -100) -> Tensor:
    """The mean cross-entropy of logits split over the vocabulary: logits (..., V_pad/tp), this
    rank's columns start .. start + V_pad/tp - 1; targets int (...) global ids -> scalar."""
    xp = array_module(logits.data)
    ids = targets.data if isinstance(targets, Tensor) else targets
    return VocabParallelCrossEntropy.apply(logits, xp.asarray(ids), comm=comm, start=start, vocab=vocab,
                                           ignore_index=ignore_index)


# ---------------------------------------------------------------- counting collectives
class CountingComm:
    """Wraps a Communicator and counts its collectives: calls[name] and nbytes[name] (bytes of
    the buffer each rank hands in), for every collective it has. Everything else is passed through."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.calls: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}

    def _count(self, name: str, buf: Any) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.nbytes[name] = self.nbytes.get(name, 0) + int(buf.nbytes)

    def reset(self) -> None:
        self.calls, self.nbytes = {}, {}

    def allreduce(self, buf: Any, op: str = "sum", wire_dtype: Any = None) -> Any:
        self._count("allreduce", buf)
        return self.comm.allreduce(buf, op=op, wire_dtype=wire_dtype)

    def all_gather(self, send: Any, recv: Any) -> Any:
        self._count("all_gather", send)
        return self.comm.all_gather(send, recv)

    def allreduce_scalar(self, value: float, op: str = "sum") -> float:
        self._count("allreduce_scalar", np.zeros(1))
        return self.comm.allreduce_scalar(value, op)

    OTHERS = ("broadcast", "reduce_scatter", "send", "recv", "barrier", "any", "all")

    def __getattr__(self, name: str) -> Any:
        """The other collectives, counted too (by calls; bytes of a first array argument)."""
        attr = getattr(self.comm, name)
        if name not in self.OTHERS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._count(name, args[0] if args and hasattr(args[0], "nbytes") else np.zeros(0))
            return attr(*args, **kwargs)
        return counted
