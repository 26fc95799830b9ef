"""The Communicator: a group of ranks and the collectives between them.

    comm = Communicator()                     # every rank of the job (MPI COMM_WORLD)
    comm.allreduce(buf, op="mean")            # in place, buf a flat contiguous array
    comm.broadcast(buf, root=0)
    comm.reduce_scatter(send, recv)           # send (size*n,) -> recv (n,): block `rank`, summed
    comm.all_gather(send, recv)               # send (n,) -> recv (size*n,): block r from rank r
    comm.send(buf, dest); comm.recv(buf, source)
    req = comm.isend(buf, dest); req = comm.irecv(buf, source); req.wait()   # non-blocking
    comm.barrier(); comm.any(flag); comm.all(flag); comm.allreduce_scalar(x)
    rows = comm.split(color=rank // 2)        # a sub-communicator per color, ranks ordered by key

Host (NumPy) buffers always go by MPI (the "mpi-host" transport, mpi4py's buffer methods,
never pickled objects). Device (CuPy) buffers go by the device transport, chosen once with
`use_transport("nccl" | "mpi-cuda-aware" | "mpi-host")`; until then they are staged through
the host. A sub-communicator from `split` gets the same kind of device transport over its
own ranks (for NCCL a new NCCL communicator), so a (dp, pp, tp) grid of groups is a few
splits of the world.

Every call goes through the watchdog (watchdog.py) when `timeout` > 0: a collective still
running `timeout` seconds after it started ends the whole job. Sub-communicators share
their parent's watchdog and timeout.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from nn.distributed.transports import TRANSPORTS, MPIHost, Transport, on_device
from nn.distributed.watchdog import Watchdog

MPI_EXTRA_HELP = "MPI support needs mpi4py and an MPI library: pip install 'tinygrad-lm[mpi]'"


def mpi_module() -> Any:
    """mpi4py's MPI, or an error naming the extra to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(MPI_EXTRA_HELP) from e
    return MPI


def _flat(op: str, name: str, buf: Any) -> None:
    if getattr(buf, "ndim", None) != 1 or not buf.flags.c_contiguous:
        raise ValueError(f"Communicator.{op}: {name} must be a flat contiguous array, got "
                         f"{type(buf).__name__} of shape {getattr(buf, 'shape', None)}"
                         f"{'' if getattr(buf, 'ndim', 0) != 1 else ' (not contiguous)'}")


class Communicator:
    """The ranks of one MPI communicator (COMM_WORLD by default) and their collectives.

    rank, size: this process's place in the group. transport: the device transport's name.
    timeout: the watchdog's seconds (0: collectives may wait for ever), shared by the
    communicators split from this one.
    """

    def __init__(self, mpi_comm: Any = None, device: Transport | None = None, watchdog: Watchdog | None = None,
                 timeout: float = 0.0) -> None:
        self.MPI = mpi_module()
        self.mpi = mpi_comm if mpi_comm is not None else self.MPI.COMM_WORLD
        self.rank, self.size = self.mpi.Get_rank(), self.mpi.Get_size()
        self.host = MPIHost(self.mpi)
        self.device: Transport = device if device is not None else self.host
        if watchdog is None:
            watchdog = Watchdog(self.MPI.COMM_WORLD.Get_rank(), self._abort_world, timeout)
        self.watchdog = watchdog

    @property
    def timeout(self) -> float:
        return self.watchdog.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        seconds = float(seconds)
        if not seconds >= 0:
            raise ValueError(f"collective_timeout must be >= 0 seconds (0: off), got {seconds}")
        self.watchdog.timeout = seconds

    @property
    def transport(self) -> str:
        return self.device.name

    def use_transport(self, name: str) -> str:
        """Move device buffers by `name` from now on (a collective: every rank calls it with the
        same name). Returns the name."""
        if name not in TRANSPORTS:
            raise ValueError(f"Communicator.use_transport: unknown transport {name!r}; expected one of "
                             f"{sorted(TRANSPORTS)}")
        entry = self.watchdog.begin(f"use_transport({name})")  # NCCL's set-up waits for every rank
        try:
            self.device = self.host if name == "mpi-host" else TRANSPORTS[name](self.mpi)
        finally:
            self.watchdog.end(entry)
        return name

    def split(self, color: int, key: int | None = None) -> "Communicator | None":
        """The sub-communicator of the ranks that passed the same color, ordered by key (default:
        this rank). A collective over this communicator. color < 0: this rank joins none (None)."""
        entry = self.watchdog.begin("split")
        try:
            sub = self.mpi.Split(color if color >= 0 else self.MPI.UNDEFINED, self.rank if key is None else key)
            if sub == self.MPI.COMM_NULL:
                return None
            device = None if self.device is self.host else self.device.split(sub)
        finally:
            self.watchdog.end(entry)
        return Communicator(sub, device=device, watchdog=self.watchdog)

    def local_rank_size(self) -> tuple[int, int]:
        """This rank's index among the ranks on its node, and their number."""
        local = self.mpi.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            return local.Get_rank(), local.Get_size()
        finally:
            local.Free()

    # ---------------------------------------------------------------- collectives
    def _transport(self, buf: Any) -> Transport:
        return self.device if on_device(buf) else self.host

    def _run(self, name: str, transport: Transport, method: str, *args: Any) -> None:
        """transport.method(*args) under the watchdog. A call that raised is no longer in flight."""
        entry = self.watchdog.begin(name)
        event = None
        try:
            getattr(transport, method)(*args)
            if entry is not None:
                event = transport.completion()
        finally:
            self.watchdog.end(entry, event)

    def allreduce(self, buf: Any, op: str = "sum", wire_dtype: Any = None) -> Any:
        """buf (n,) <- sum (op="sum") or mean (op="mean") over the ranks, in place; returns buf.
        wire_dtype (e.g. np.float16): the values travel, and are summed, in that dtype."""
        _flat("allreduce", "buf", buf)
        if op not in ("sum", "mean"):
            raise ValueError(f"Communicator.allreduce: op must be 'sum' or 'mean', got {op!r}")
        work = buf if wire_dtype is None or buf.dtype == wire_dtype else buf.astype(wire_dtype)
        self._run("allreduce", self._transport(buf), "allreduce_sum", work)
        if work is not buf:
            buf[...] = work
        if op == "mean":
            buf *= 1.0 / self.size
        return buf

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        """buf (n,) <- root's buf, in place; returns buf."""
        _flat("broadcast", "buf", buf)
        self._run("broadcast", self._transport(buf), "broadcast", buf, root)
        return buf

    def _pair(self, op: str, send: Any, recv: Any, send_per_recv: float) -> Transport:
        _flat(op, "send", send)
        _flat(op, "recv", recv)
        if send.size != recv.size * send_per_recv or send.dtype != recv.dtype or on_device(send) != on_device(recv):
            raise ValueError(f"Communicator.{op}: send {send.dtype}{send.shape} and recv {recv.dtype}{recv.shape} "
                             f"(on {'device' if on_device(send) else 'host'} and "
                             f"{'device' if on_device(recv) else 'host'}); expected one dtype, one device and "
                             f"send.size == {send_per_recv:g} x recv.size with {self.size} ranks")
        return self._transport(send)

    def reduce_scatter(self, send: Any, recv: Any, op: str = "sum") -> Any:
        """send (size*n,) -> recv (n,) <- sum (or mean) over ranks of send[rank*n:(rank+1)*n]; returns recv."""
        if op not in ("sum", "mean"):
            raise ValueError(f"Communicator.reduce_scatter: op must be 'sum' or 'mean', got {op!r}")
        self._run("reduce_scatter", self._pair("reduce_scatter", send, recv, self.size), "reduce_scatter_sum",
                  send, recv)
        if op == "mean":
            recv *= 1.0 / self.size
        return recv

    def all_gather(self, send: Any, recv: Any) -> Any:
        """send (n,) -> recv (size*n,), recv[r*n:(r+1)*n] <- rank r's send; returns recv."""
        self._run("all_gather", self._pair("all_gather", send, recv, 1 / self.size), "all_gather", send, recv)
        return recv

    def send(self, buf: Any, dest: int, tag: int = 0) -> None:
        """Send buf (n,) to rank dest of this communicator (matched by its recv)."""
        _flat("send", "buf", buf)
        self._run("send", self._transport(buf), "send", buf, dest, tag)

    def recv(self, buf: Any, source: int, tag: int = 0) -> Any:
        """buf (n,) <- what rank source sent; returns buf."""
        _flat("recv", "buf", buf)
        self._run("recv", self._transport(buf), "recv", buf, source, tag)
        return buf

    def isend(self, buf: Any, dest: int, tag: int = 0) -> "PendingRequest":
        """Start sending buf (n,) to rank dest; returns a request whose wait() finishes it. buf must
        not change until then. Device buffers are staged through the host unless the transport is
        CUDA-aware MPI (also under NCCL: see transports.NCCL)."""
        _flat("isend", "buf", buf)
        return PendingRequest(self.watchdog, "isend", self._transport(buf).isend(buf, dest, tag))

    def irecv(self, buf: Any, source: int, tag: int = 0) -> "PendingRequest":
        """Start receiving into buf (n,) from rank source; buf holds the message after wait()."""
        _flat("irecv", "buf", buf)
        return PendingRequest(self.watchdog, "irecv", self._transport(buf).irecv(buf, source, tag))

    def barrier(self) -> None:
        entry = self.watchdog.begin("barrier")
        try:
            self.mpi.Barrier()
        finally:
            self.watchdog.end(entry)

    def allreduce_scalar(self, value: float, op: str = "sum") -> float:
        """A Python float summed ("sum"), averaged ("mean"), or its "max" or "min", over the ranks."""
        ops = {"sum": self.MPI.SUM, "mean": self.MPI.SUM, "max": self.MPI.MAX, "min": self.MPI.MIN}
        if op not in ops:
            raise ValueError(f"Communicator.allreduce_scalar: op must be one of {sorted(ops)}, got {op!r}")
        buf = np.array([value], dtype=np.float64)
        entry = self.watchdog.begin(f"allreduce_scalar({op})")
        try:
            self.mpi.Allreduce(self.MPI.IN_PLACE, buf, op=ops[op])
        finally:
            self.watchdog.end(entry)
        return float(buf[0]) / (self.size if op == "mean" else 1)

    def any(self, flag: bool) -> bool:
        """True on every rank when flag is true on at least one."""
        return self.allreduce_scalar(float(bool(flag)), "max") > 0

    def all(self, flag: bool) -> bool:
        """True on every rank when flag is true on all of them."""
        return self.allreduce_scalar(float(bool(flag)), "min") > 0

    def abort(self, code: int = 1) -> None:
        """End the whole job (every rank of COMM_WORLD) now."""
        self._abort_world(code)

    def _abort_world(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # pragma: no cover - Abort does not return


class PendingRequest:
    """A non-blocking send/receive of a Communicator; wait() runs under the watchdog."""

    def __init__(self, watchdog: Watchdog, name: str, request: Any) -> None:
        self.watchdog, self.name, self.request = watchdog, name, request

    def wait(self) -> None:
        entry = self.watchdog.begin(self.name)
        try:
            self.request.wait()
        finally:
            self.watchdog.end(entry)


class Grid:
    """A (dp, pp, tp) grid of sub-communicators over comm's size = dp * pp * tp ranks.

    Rank = (d * pp + p) * tp + t: the tp ranks of one (d, p) are adjacent (tensor parallelism
    talks most, so it gets the nearest ranks). This rank's coordinates are (self.d, self.p,
    self.t); self.tp joins the ranks that differ only in t, self.pp those that differ only in
    p, self.dp those that differ only in d, each ordered by its own coordinate. A collective
    over comm: every rank builds the grid with the same sizes.
    """

    def __init__(self, comm: Communicator, tp: int = 1, pp: int = 1) -> None:
        if tp < 1 or pp < 1 or comm.size % (tp * pp):
            raise ValueError(f"Grid: {comm.size} ranks cannot be cut into tp={tp} x pp={pp} x dp groups; "
                             f"expected tp, pp >= 1 and tp * pp dividing {comm.size}")
        r = comm.rank
        self.dp_size, self.pp_size, self.tp_size = comm.size // (tp * pp), pp, tp
        self.d, self.p, self.t = r // (pp * tp), (r // tp) % pp, r % tp
        self.tp = comm.split(color=r // tp, key=self.t)
        self.pp = comm.split(color=self.d * tp + self.t, key=self.p)
        self.dp = comm.split(color=r % (pp * tp), key=self.d)
