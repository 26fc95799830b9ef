"""ZeRO stage 1: the optimizer state sharded across the ranks (Rajbhandari et al., 2020)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from nn.distributed.data_parallel import World
from tensor import backend


class ZeRO1:
    """ZeRO stage 1: the optimizer state is sharded across the ranks.

    Each parameter group is viewed as one flat vector of n elements, cut into N equal
    shards of S = ceil(n / N) (the last padded with zeros). Rank r owns shard r: the
    optimizer moments for its slice of the parameters, so optimizer memory per rank is 1/N.
    (The slice itself is copied from the model's parameters at every step, so they stay the
    one source of truth.)

        step():  reduce-scatter the gradients  -> rank r holds the summed grads of shard r
                 divide by N (the average), clip by the global norm (one small allreduce)
                 update shard r with the inner optimizer (AdamW, ...)
                 all-gather the shards         -> every rank holds all updated parameters

    With the same inner optimizer this gives the same weights as plain data parallelism
    (allreduce + full update) up to float32 round-off in the gradient sums.

    The flat buffers, the shard and its moments live on the parameters' device, and the
    reduce-scatter and all-gather go through the world's Communicator: on the GPU by its
    device transport (NCCL or CUDA-aware MPI), never through host copies unless the
    transport is "mpi-host"; on the CPU by host MPI.

    groups: like an optimizer's parameter groups ({"params": [...], "weight_decay": ...});
    make_inner(groups) builds the inner optimizer over the shard parameters.
    model_parallel (these parameters are one part of the model, nn.distributed.model_parallel.
    ModelParallel): the squared norm weighted per parameter and summed over the model's parts.
    """

    def __init__(self, world: World, groups: list[dict], make_inner: Callable[[list[dict]], Any],
                 model_parallel: Any = None) -> None:
        from nn.module import Parameter
        self.world, self.model_parallel = world, model_parallel
        self.groups = [dict(g, params=list(g["params"])) for g in groups]
        N, r = world.size, world.rank
        self.layout = []  # per group: (params, n, shard size S, shard Parameter, flat buffer (S*N,))
        self.norm_segments: list = []  # per group: (lo, hi, weight) of this shard (model parallel only)
        inner_groups = []
        for g in self.groups:
            ps = g["params"]
            n = sum(p.size for p in ps)
            S = -(-n // N)
            xp = backend.array_module(ps[0].data) if ps else np
            flat = xp.zeros(S * N, dtype=np.float32)
            self._gather_params(ps, flat)
            shard = Parameter(flat[r * S:(r + 1) * S].copy())
            self.layout.append((ps, n, S, shard, flat))
            self.norm_segments.append(self._segments(ps, r * S, (r + 1) * S))
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [shard]})
        self.inner = make_inner(inner_groups)

    def _segments(self, ps: list, lo: int, hi: int) -> list | None:
        """With model_parallel (the model split over other ranks too) and parameters weighted:
        the (start, end, weight) pieces of this rank's shard [lo, hi), one per parameter it overlaps,
        so that the squared norm counts each parameter once over all ranks. None otherwise."""
        if self.model_parallel is None or not self.model_parallel.weighted:
            return None
        out, offset = [], 0
        for p in ps:
            a, b = max(offset, lo), min(offset + p.size, hi)
            if a < b:
                out.append((a - lo, b - lo, self.model_parallel.weight(p)))
            offset += p.size
        return out

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self) -> None:
        for ps, _, _, shard, _ in self.layout:
            shard.grad = None
            for p in ps:
                p.grad = None

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (the moments of its shard)."""
        return sum(v.nbytes for st in self.inner.state.values() for v in st.values() if hasattr(v, "nbytes"))

    @staticmethod
    def _gather_params(ps: list, flat: Any) -> None:
        """flat[:n] <- the parameters' values, in order (the padding stays as it is)."""
        offset = 0
        for p in ps:
            flat[offset:offset + p.size] = p.data.reshape(-1)
            offset += p.size

    def step(self, max_norm: float = 0.0) -> float:
        """Reduce-scatter, clip, update the own shard, all-gather. Returns the global grad norm
        (a float: one synchronisation per step)."""
        N, r = self.world.size, self.world.rank
        sq = None
        for (ps, n, S, shard, flat), segments in zip(self.layout, self.norm_segments):
            flat[...] = 0
            offset = 0
            for p in ps:
                if p.grad is not None:
                    flat[offset:offset + p.size] = p.grad.reshape(-1)
                offset += p.size
            mine = self._reduce_scatter(flat, S)
            mine *= 1.0 / N
            shard.grad = mine
            if segments is None:
                part = mine.dot(mine).astype(np.float64).reshape(1)  # this rank's share of the squared norm
            else:  # each piece weighted (replicated parameters counted once over the model-parallel ranks)
                part = sum((w * mine[a:b].dot(mine[a:b]) for a, b, w in segments), mine[:0].sum())
                part = part.astype(np.float64).reshape(1)
            sq = part if sq is None else sq + part
        if sq is None:
            return 0.0
        if self.world.size > 1:  # the sum of the shards' squares
            sq = self.world.comm.allreduce(sq, op="sum")
        if self.model_parallel is not None:  # and over the ranks that hold other parts of the model
            sq = self.model_parallel.sum_of_squares(sq)
        norm = float(np.sqrt(float(sq[0])))
        if not np.isfinite(norm):
            return norm
        if max_norm > 0 and norm > max_norm:
            for *_, shard, _ in self.layout:
                shard.grad *= max_norm / (norm + 1e-6)
        for ps, n, S, shard, flat in self.layout:  # the parameters are the truth (e.g. just loaded from a checkpoint)
            self._gather_params(ps, flat)
            shard.data[...] = flat[r * S:(r + 1) * S]
        self.inner.step()
        for ps, n, S, shard, flat in self.layout:
            self._all_gather(shard.data, flat)
            offset = 0
            for p in ps:
                p.data = flat[offset:offset + p.size].reshape(p.shape).astype(p.dtype)  # a copy
                p._version += 1
                offset += p.size
        return norm

    def _reduce_scatter(self, full: Any, S: int) -> Any:
        """full (S*N,) -> (S,), this rank's block summed over the ranks."""
        if self.world.size == 1:
            return full.copy()
        out = backend.array_module(full).empty(S, dtype=full.dtype)
        return self.world.comm.reduce_scatter(full, out)

    def _all_gather(self, shard: Any, out: Any) -> Any:
        """shard (S,) -> out (S*N,) holding every rank's shard in rank order."""
        if self.world.size == 1:
            out[...] = shard
            return out
        return self.world.comm.all_gather(backend.array_module(shard).ascontiguousarray(shard), out)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """A collective (every rank must call it): the moments gathered into full flat host
        arrays, so a checkpoint does not depend on the number of ranks."""
        sd = self.inner.state_dict()
        arrays = {}
        for name, arr in sd["arrays"].items():  # "state.<group>.<moment>" -> whole-group flat array
            _, S, _ = self._shard_of(int(name.split(".")[1]))
            shard = np.ascontiguousarray(backend.to_numpy(arr), dtype=np.float32).reshape(-1)
            arrays["zero." + name] = self._all_gather(shard, np.empty(S * self.world.size, dtype=np.float32))
        return {"meta": {"zero1": True, "inner": sd["meta"]}, "arrays": arrays}

    def load_state_dict(self, sd: dict) -> None:
        if not sd["meta"].get("zero1"):
            raise ValueError("ZeRO1.load_state_dict: this optimizer state was not saved by ZeRO1")
        r = self.world.rank
        arrays = {}
        for name, arr in sd["arrays"].items():
            inner_name = name[len("zero."):]
            _, S, n = self._shard_of(int(inner_name.split(".")[1]))
            flat = np.zeros(S * self.world.size, dtype=np.float32)
            flat[:n] = np.asarray(arr).reshape(-1)[:n]
            arrays[inner_name] = flat[r * S:(r + 1) * S].copy()
        self.inner.load_state_dict({"meta": sd["meta"]["inner"], "arrays": arrays})

    def _shard_of(self, index: int) -> tuple:
        ps, n, S, shard, _ = self.layout[index]
        return shard, S, n
