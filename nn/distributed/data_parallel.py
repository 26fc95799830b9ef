"""Data parallelism: every rank holds the whole model and averages its gradients.

Each step every rank computes gradients on its own slice of the global batch, then

    grad = (1/N) * sum over ranks of grad_rank

so every rank applies the same update and the weights stay identical. Gradients travel in a
few large flat buffers ("buckets", about `bucket_mb` each, one dtype each), one all-reduce
per bucket, never one message per parameter.

`World` is one process (rank 0 of 1, every collective a no-op), so the same training code
runs without MPI; `MPIWorld` is N ranks over a `Communicator`.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from nn.distributed.comm import Communicator
from tensor import backend


class World:
    """A single process: rank 0 of 1. All collective operations are no-ops."""

    rank, size, local_rank, local_size = 0, 1, 0, 1
    collective_timeout = 0.0  # seconds; 0: collectives may wait forever
    reduce_dtype: str | None = None
    transport: str | None = None
    comm: Communicator | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def use_cuda(self) -> str | None:
        return None

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
    """N ranks over a Communicator (all of MPI COMM_WORLD by default).

    comm: a Communicator, an mpi4py communicator, or None (COMM_WORLD).
    bucket_mb: the size of one gradient bucket.
    reduce_dtype: None (all-reduce in the gradients' dtype) or "float16" to halve the bytes on
    the wire (MPI sums them in float32 on arrival; NCCL in float16).
    collective_timeout: seconds after which a collective that has not finished aborts the job
    (0: never); see nn/distributed/watchdog.py.
    """

    def __init__(self, comm: Any = None, bucket_mb: float = 25.0, reduce_dtype: str | None = None,
                 collective_timeout: float = 0.0) -> None:
        self.comm = comm if isinstance(comm, Communicator) else Communicator(comm)
        self.MPI = self.comm.MPI
        self.rank, self.size = self.comm.rank, self.comm.size
        self.local_rank, self.local_size = self.comm.local_rank_size()
        if not bucket_mb > 0:
            raise ValueError(f"MPIWorld: bucket_mb must be > 0, got {bucket_mb}")
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self.reduce_dtype = reduce_dtype
        self.collective_timeout = collective_timeout
        if os.environ.get("TINYGRAD_LM_CUDA_AWARE_MPI") == "1":
            self.comm.use_transport("mpi-cuda-aware")
        self._buckets: list[tuple[list[int], Any]] | None = None
        self._layout_key: tuple | None = None
        self.bytes_reduced = 0
        self.seconds_reducing = 0.0

    @property
    def reduce_dtype(self) -> str | None:
        return self._reduce_dtype

    @reduce_dtype.setter
    def reduce_dtype(self, value: str | None) -> None:
        if value not in (None, "float16"):
            raise ValueError(f"reduce_dtype must be None or 'float16', got {value!r}")
        self._reduce_dtype = value

    @property
    def collective_timeout(self) -> float:  # type: ignore[override]
        return self.comm.timeout

    @collective_timeout.setter
    def collective_timeout(self, seconds: float) -> None:
        self.comm.timeout = seconds

    @property
    def transport(self) -> str:  # type: ignore[override]
        """How device gradients travel: "nccl", "mpi-cuda-aware" or "mpi-host"."""
        return self.comm.transport

    def use_cuda(self) -> str:
        """Select this rank's GPU (local rank mod the GPU count) and the device transport, the
        first that applies:
          "nccl"            every local rank has a GPU of its own (NCCL refuses two ranks on
                            one GPU) and TINYGRAD_LM_NCCL is not 0; NCCL_NVLS_ENABLE=0 is set
          "mpi-cuda-aware"  TINYGRAD_LM_CUDA_AWARE_MPI=1 says the MPI library is CUDA-aware
                            (there is no portable way to ask it)
          "mpi-host"        staged through host memory (always works)
        A collective: every rank calls it. Returns the transport's name."""
        cp = backend.cupy_module()
        n_gpus = cp.cuda.runtime.getDeviceCount()
        cp.cuda.Device(self.local_rank % n_gpus).use()
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
        if self.local_size <= n_gpus and os.environ.get("TINYGRAD_LM_NCCL", "1") != "0":
            try:
                self.comm.use_transport("nccl")
            except Exception as e:  # no NCCL in this CuPy build: fall back to MPI
                sys.stderr.write(f"[rank {self.rank}] NCCL unavailable ({e}); using {self.transport}\n")
        self._buckets = None
        return self.transport

    # ------------------------------------------------------------ buckets
    def _plan(self, params: Sequence[Any]) -> list[tuple[list[int], Any]]:
        """Group parameters (in order) into buckets of about bucket_bytes and one dtype; one flat
        buffer each, on the parameters' device. Cached while the parameters keep their layout."""
        key = tuple((p.shape, str(p.dtype), p.device) for p in params)
        if self._buckets is not None and key == self._layout_key:
            return self._buckets
        buckets: list[list[int]] = []
        current: list[int] = []
        nbytes = 0
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
            xp = backend.array_module(params[idx[0]].data)
            planned.append((idx, xp.empty(n, dtype=params[idx[0]].dtype)))
        self._buckets, self._layout_key = planned, key
        return planned

    def allreduce_grads(self, params: Sequence[Any]) -> None:
        """Average every parameter's .grad over the ranks (a missing grad counts as zero).
        Afterwards each .grad is a view into its bucket, valid until the next call."""
        t0 = time.perf_counter()
        params = list(params)
        wire = np.float16 if self.reduce_dtype == "float16" else None
        for idx, buf in self._plan(params):
            offset = 0
            for i in idx:  # pack
                p = params[i]
                if p.grad is None:
                    buf[offset:offset + p.size] = 0
                else:
                    buf[offset:offset + p.size] = p.grad.reshape(-1)
                offset += p.size
            self.comm.allreduce(buf, op="mean", wire_dtype=wire)
            offset = 0
            for i in idx:  # unpack: each grad becomes a view of the bucket (no copy)
                p = params[i]
                p.grad = buf[offset:offset + p.size].reshape(p.shape)
                offset += p.size
            self.bytes_reduced += buf.nbytes
        self.seconds_reducing += time.perf_counter() - t0

    def broadcast_parameters(self, params: Sequence[Any]) -> None:
        """Copy rank 0's parameter values to every rank (one flat buffer per bucket)."""
        params = list(params)
        for idx, buf in self._plan(params):
            offset = 0
            for i in idx:
                p = params[i]
                buf[offset:offset + p.size] = p.data.reshape(-1)
                offset += p.size
            self.comm.broadcast(buf, root=0)
            offset = 0
            for i in idx:
                p = params[i]
                p.data = buf[offset:offset + p.size].reshape(p.shape).copy()
                p._version += 1
                offset += p.size

    # ------------------------------------------------------------ small collectives
    def allreduce_mean(self, value: float) -> float:
        return self.comm.allreduce_scalar(float(value), "mean")

    def any(self, flag: bool) -> bool:
        return self.comm.any(flag)

    def barrier(self) -> None:
        self.comm.barrier()

    def abort(self, code: int = 1) -> None:
        """End the whole job (every rank) now."""
        self.comm.abort(code)
