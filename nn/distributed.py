"""Data parallelism over MPI (mpi4py).

Every rank holds the whole model. Each step, every rank computes gradients on its own
slice of the global batch, then the gradients are averaged with `Allreduce`, so every
rank applies the same update and the weights stay identical:

    grad = (1/N) * sum over ranks of grad_rank

Gradients travel in a few large, flat, contiguous buffers ("buckets", `bucket_mb` each),
never as pickled per-parameter messages: one Allreduce per bucket.

Without mpi4py, or as a single process, `init()` returns a `World` of size 1 whose
methods do nothing, so the same training code runs unchanged.

GPU training (one rank per GPU, `world.use_cuda()` picks GPU local_rank % count) moves
gradients by the first transport that applies:
  * "nccl": NCCL through `cupy.cuda.nccl`, device buffers, when every local rank has a GPU
    of its own (NCCL refuses two ranks on one GPU). NCCL_NVLS_ENABLE=0 is set.
  * "mpi-cuda-aware": device buffers handed to MPI, when TINYGRAD_LM_CUDA_AWARE_MPI=1 says
    the MPI library is CUDA-aware (there is no portable way to ask it).
  * "mpi-host": staged through host memory (always works, e.g. two ranks sharing one GPU).
`world.transport` says which one is in use.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Sequence

import numpy as np

from tensor import backend

MPI_EXTRA_HELP = "MPI support needs mpi4py and an MPI library: pip install 'tinygrad-lm[mpi]'"


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(MPI_EXTRA_HELP) from e
    return MPI


def launched_under_mpi() -> bool:
    """True when an MPI launcher started this process with more than one rank."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS"):
        v = os.environ.get(var)
        if v is not None and v.isdigit() and int(v) > 1:
            return True
    return False


class World:
    """A single process: rank 0 of 1. All collective operations are no-ops."""

    rank, size, local_rank = 0, 1, 0
    collective_timeout = 0.0  # seconds; 0: collectives may wait forever

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_parameters(self, params: Sequence[Any]) -> None:
        pass

    def allreduce_grads(self, params: Sequence[Any]) -> None:
        pass

    def allreduce_mean(self, value: float) -> float:
        return float(value)

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        sys.exit(code)


class MPIWorld(World):
    """N ranks over an mpi4py communicator (COMM_WORLD by default).

    reduce_dtype: None (all-reduce in the gradients' dtype) or "float16" to halve the
    bytes on the wire (summed in float32 on arrival by a custom MPI op).
    """

    def __init__(self, comm: Any = None, bucket_mb: float = 25.0, reduce_dtype: str | None = None) -> None:
        self.MPI = _mpi()
        self.comm = comm if comm is not None else self.MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        if reduce_dtype not in (None, "float16"):
            raise ValueError(f"reduce_dtype must be None or 'float16', got {reduce_dtype!r}")
        self.reduce_dtype = reduce_dtype
        self.transport = "mpi-cuda-aware" if os.environ.get("TINYGRAD_LM_CUDA_AWARE_MPI") == "1" else "mpi-host"
        self.nccl: Any = None
        self._buckets: list[tuple[list[int], Any]] | None = None
        self._layout_key: tuple | None = None
        self._fp16_sum = None
        self.bytes_reduced = 0
        self.seconds_reducing = 0.0

    # ------------------------------------------------------------ buckets
    def _plan(self, params: Sequence[Any]) -> list[tuple[list[int], Any]]:
        """Group parameters (in order) into buckets of about bucket_bytes; one flat buffer each."""
        key = tuple((p.shape, str(p.dtype), p.device) for p in params)
        if self._buckets is not None and key == self._layout_key:
            return self._buckets
        buckets, current, nbytes = [], [], 0
        for i, p in enumerate(params):
            if current and (nbytes + p.data.nbytes > self.bucket_bytes or p.dtype != params[current[0]].dtype):
                buckets.append(current)
                current, nbytes = [], 0
            current.append(i)
            nbytes += p.data.nbytes
        if current:
            buckets.append(current)
        planned = []
        for idx in buckets:
            n = sum(params[i].size for i in idx)
            dev = params[idx[0]].device  # buckets live with the grads; staging (if any) is one copy each way
            xp = backend.array_module(backend.to_device(np.zeros(0), dev))
            planned.append((idx, xp.empty(n, dtype=params[idx[0]].dtype)))
        self._buckets, self._layout_key = planned, key
        return planned

    def allreduce_grads(self, params: Sequence[Any]) -> None:
        """Average every parameter's .grad over the ranks (a missing grad counts as zero).
        Afterwards each .grad is a view into its bucket, valid until the next call."""
        import time
        t0 = time.perf_counter()
        params = list(params)
        for idx, buf in self._plan(params):
            offset = 0
            for i in idx:  # pack
                p = params[i]
                n = p.size
                if p.grad is None:
                    buf[offset:offset + n] = 0
                else:
                    buf[offset:offset + n] = p.grad.reshape(-1)
                offset += n
            self._allreduce_inplace(buf)
            buf *= 1.0 / self.size
            offset = 0
            for i in idx:  # unpack: each grad becomes a view of the bucket (no copy)
                p = params[i]
                n = p.size
                p.grad = buf[offset:offset + n].reshape(p.shape)
                offset += n
            self.bytes_reduced += buf.nbytes
        self.seconds_reducing += time.perf_counter() - t0

    def use_cuda(self) -> str:
        """Select this rank's GPU (local rank mod the GPU count) and the gradient transport."""
        cp = backend.cupy_module()
        n_gpus = cp.cuda.runtime.getDeviceCount()
        cp.cuda.Device(self.local_rank % n_gpus).use()
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
        if self.local_size <= n_gpus and os.environ.get("TINYGRAD_LM_NCCL", "1") != "0":
            try:
                from cupy.cuda import nccl
                uid = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
                self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
                self.transport = "nccl"
            except Exception as e:  # no NCCL in this CuPy build: fall back to MPI
                sys.stderr.write(f"[rank {self.rank}] NCCL unavailable ({e}); using {self.transport}\n")
        self._buckets = None
        return self.transport

    def _nccl_dtype(self, dtype: Any) -> int:
        from cupy.cuda import nccl
        return {"float32": nccl.NCCL_FLOAT32, "float16": nccl.NCCL_FLOAT16, "float64": nccl.NCCL_FLOAT64}[dtype.name]

    def _allreduce_inplace(self, buf: Any) -> None:
        """Sum `buf` over the ranks in place, by this world's transport."""
        MPI = self.MPI
        on_gpu = backend.device_of(buf) == "cuda"
        if on_gpu and self.nccl is not None:
            from cupy.cuda import nccl
            work = buf.astype(np.float16) if self.reduce_dtype == "float16" else buf
            stream = backend.cupy_module().cuda.get_current_stream()
            self.nccl.allReduce(work.data.ptr, work.data.ptr, work.size, self._nccl_dtype(work.dtype), nccl.NCCL_SUM,
                                stream.ptr)
            if work is not buf:
                buf[...] = work
            return
        if on_gpu and (self.transport == "mpi-host" or self.reduce_dtype == "float16"):
            host = backend.device_to_host(buf)  # stage through the host: one copy each way per bucket
            self._allreduce_inplace(host)
            buf.set(host)
            return
        if self.reduce_dtype == "float16" and buf.dtype != np.float16:
            half = buf.astype(np.float16)
            self.comm.Allreduce(MPI.IN_PLACE, [half.view(np.uint16), MPI.UNSIGNED_SHORT], op=self._float16_sum())
            buf[...] = half
            return
        if on_gpu:  # a CUDA-aware MPI reads device memory: the kernels writing it must be done
            backend.cupy_module().cuda.get_current_stream().synchronize()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def _float16_sum(self) -> Any:
        """An MPI op that sums float16 payloads (sent as uint16) in float32."""
        if self._fp16_sum is None:
            def add(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
                a = np.frombuffer(inbuf, dtype=np.float16)
                b = np.frombuffer(inoutbuf, dtype=np.float16)
                b[...] = (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
            self._fp16_sum = self.MPI.Op.Create(add, commute=True)
        return self._fp16_sum

    # ------------------------------------------------------------ small collectives
    def broadcast_parameters(self, params: Sequence[Any]) -> None:
        """Copy rank 0's parameter values to every rank (one flat buffer per bucket)."""
        params = list(params)
        for idx, buf in self._plan(params):
            offset = 0
            for i in idx:
                n = params[i].size
                buf[offset:offset + n] = backend.to_device(params[i].data, backend.device_of(buf)).reshape(-1)
                offset += n
            if self.nccl is not None and backend.device_of(buf) == "cuda":
                self.nccl.bcast(buf.data.ptr, buf.size, self._nccl_dtype(buf.dtype), 0,
                                backend.cupy_module().cuda.get_current_stream().ptr)
            elif backend.device_of(buf) == "cuda" and self.transport == "mpi-host":
                host = backend.device_to_host(buf)
                self.comm.Bcast(host, root=0)
                buf.set(host)
            else:
                if backend.device_of(buf) == "cuda":
                    backend.cupy_module().cuda.get_current_stream().synchronize()
                self.comm.Bcast(buf, root=0)
            offset = 0
            for i in idx:
                p = params[i]
                n = p.size
                p.data = backend.to_device(buf[offset:offset + n], p.device).reshape(p.shape).copy()
                p._version += 1
                offset += n

    def allreduce_mean(self, value: float) -> float:
        return self.comm.allreduce(float(value), op=self.MPI.SUM) / self.size

    def any(self, flag: bool) -> bool:
        return bool(self.comm.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End the whole job (every rank) now."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def init(bucket_mb: float = 25.0, reduce_dtype: str | None = None, collective_timeout: float = 0.0) -> World:
    """The MPI world when an MPI launcher started several ranks, else a single-process World
    (mpi4py is not even imported then). Under mpiexec without mpi4py: an error naming the extra.
    collective_timeout: seconds after which a collective that has not finished aborts the job (0: never)."""
    if not launched_under_mpi():
        return World()
    world = MPIWorld(bucket_mb=bucket_mb, reduce_dtype=reduce_dtype)
    world.collective_timeout = float(collective_timeout)
    return world


def run_or_abort(world: World, fn: Callable[[], int]) -> int:
    """Run fn(); if it raises on any rank, print the error and abort the whole job
    (MPI_Abort) so no other rank hangs waiting in a collective."""
    try:
        return fn()
    except SystemExit:
        raise
    except BaseException as e:
        if world.size == 1:
            raise
        import time
        # one write, the error first: the launcher may drop output once the job aborts
        sys.stderr.write(f"[rank {world.rank}] fatal error: {type(e).__name__}: {e}; aborting all {world.size} ranks\n"
                         + "".join(traceback.format_exception(e)))
        sys.stderr.flush()
        time.sleep(0.5)  # let mpiexec forward it
        world.abort(1)
        return 1


class ZeRO1:
    """ZeRO stage 1: the optimizer state is sharded across the ranks.

    Each parameter group is viewed as one flat vector of n elements, cut into N equal
    shards (the last padded). Rank r owns shard r: the optimizer moments for its slice of
    the parameters, so optimizer memory per rank is 1/N. (The slice itself is copied from
    the model's parameters at every step, so they stay the one source of truth.)

        step():  reduce-scatter the gradients  -> rank r holds the summed grads of shard r
                 divide by N (the average), clip by the global norm (one small allreduce)
                 update shard r with the inner optimizer (AdamW, ...)
                 all-gather the shards         -> every rank holds all updated parameters

    With the same inner optimizer this gives the same weights as plain data parallelism
    (allreduce + full update) up to float32 round-off in the gradient sums.

    groups: like an optimizer's parameter groups ({"params": [...], "weight_decay": ...});
    make_inner(groups) builds the inner optimizer over the shard parameters.
    """

    def __init__(self, world: World, groups: list[dict], make_inner: Callable[[list[dict]], Any]) -> None:
        from nn.module import Parameter
        self.world = world
        self.groups = [dict(g, params=list(g["params"])) for g in groups]
        N, r = world.size, world.rank
        self.layout = []  # per group: (params, n, shard size)
        inner_groups = []
        for g in self.groups:
            ps = g["params"]
            n = sum(p.size for p in ps)
            S = -(-n // N)
            flat = np.zeros(S * N, dtype=np.float32)
            flat[:n] = np.concatenate([backend.to_numpy(p.data).reshape(-1) for p in ps]) if ps else []
            shard = Parameter(flat[r * S:(r + 1) * S].copy())
            self.layout.append((ps, n, S, shard))
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [shard]})
        self.inner = make_inner(inner_groups)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self) -> None:
        for ps, _, _, shard in self.layout:
            shard.grad = None
            for p in ps:
                p.grad = None

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (the moments of its shard)."""
        return sum(v.nbytes for st in self.inner.state.values() for v in st.values() if hasattr(v, "nbytes"))

    def step(self, max_norm: float = 0.0) -> float:
        """Reduce-scatter, clip, update the own shard, all-gather. Returns the global grad norm."""
        N = self.world.size
        sq = 0.0
        for ps, n, S, shard in self.layout:
            full = np.zeros(S * N, dtype=np.float32)
            offset = 0
            for p in ps:
                if p.grad is not None:
                    full[offset:offset + p.size] = backend.to_numpy(p.grad).reshape(-1)
                offset += p.size
            mine = self._reduce_scatter(full, S) / N
            shard.grad = mine
            sq += float(np.dot(mine, mine))
        norm = float(np.sqrt(self.world.allreduce_mean(sq) * N))  # sum of the shards' squares
        if not np.isfinite(norm):
            return norm
        if max_norm > 0 and norm > max_norm:
            for *_, shard in self.layout:
                shard.grad *= max_norm / (norm + 1e-6)
        r = self.world.rank
        for ps, n, S, shard in self.layout:  # the parameters are the truth (e.g. just loaded from a checkpoint)
            flat = np.zeros(S * N, dtype=np.float32)
            flat[:n] = np.concatenate([backend.to_numpy(p.data).reshape(-1) for p in ps]) if ps else []
            shard.data[...] = flat[r * S:(r + 1) * S]
        self.inner.step()
        for ps, n, S, shard in self.layout:
            full = self._all_gather(shard.data, S)
            offset = 0
            for p in ps:
                p.data = backend.to_device(full[offset:offset + p.size].reshape(p.shape).astype(p.dtype), p.device)
                p._version += 1
                offset += p.size
        return norm

    def _reduce_scatter(self, full: np.ndarray, S: int) -> np.ndarray:
        if self.world.size == 1:
            return full.copy()
        out = np.empty(S, dtype=full.dtype)
        self.world.comm.Reduce_scatter_block(full, out, op=self.world.MPI.SUM)
        return out

    def _all_gather(self, shard: np.ndarray, S: int) -> np.ndarray:
        if self.world.size == 1:
            return shard.copy()
        full = np.empty(S * self.world.size, dtype=shard.dtype)
        self.world.comm.Allgather(np.ascontiguousarray(shard), full)
        return full

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """A collective (every rank must call it): the moments gathered into full flat arrays,
        so a checkpoint does not depend on the number of ranks."""
        sd = self.inner.state_dict()
        arrays = {}
        for name, arr in sd["arrays"].items():  # "state.<group>.<moment>" -> whole-group flat array
            _, S, _ = self._shard_of(int(name.split(".")[1]))
            arrays["zero." + name] = self._all_gather(np.asarray(arr, dtype=np.float32).reshape(-1), S)
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
        ps, n, S, shard = self.layout[index]
        return shard, S, n
