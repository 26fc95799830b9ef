"""Transports: how the bytes of one collective travel between the ranks.

Every transport implements the same small interface, `Transport`, over flat contiguous
buffers (1-D arrays) of one dtype; the `Communicator` (comm.py) checks the arguments, picks
the transport for a buffer and runs the watchdog around the call. Three implementations:

  MPIHost       "mpi-host"        mpi4py's upper-case (buffer) methods on host arrays; a
                                  device array is staged through a host copy, one copy
                                  each way (always works, e.g. two ranks sharing one GPU).
  MPICudaAware  "mpi-cuda-aware"  device pointers handed to MPI (`__cuda_array_interface__`),
                                  for an MPI library built CUDA-aware.
  NCCL          "nccl"            `cupy.cuda.nccl` on device buffers, queued on the current
                                  CuPy stream; the NCCL id is broadcast over MPI.

float16 payloads are summed by MPI with a custom op that adds in float32 (MPI has no
float16 type; they travel as uint16), so a CUDA-aware MPI stages float16 through the host.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tensor import backend


def on_device(buf: Any) -> bool:
    return type(buf) is not np.ndarray and backend.device_of(buf) == "cuda"


class Transport:
    """The interface. Buffers are flat and contiguous; every rank of the group calls the
    collectives in the same order with the same sizes and dtypes."""

    name = "?"

    def allreduce_sum(self, buf: Any) -> None:
        """buf (n,) <- sum over ranks of buf, in place."""
        raise NotImplementedError

    def broadcast(self, buf: Any, root: int) -> None:
        """buf (n,) <- root's buf."""
        raise NotImplementedError

    def reduce_scatter_sum(self, send: Any, recv: Any) -> None:
        """send (size*n,), recv (n,): rank r's recv <- sum over ranks of send[r*n:(r+1)*n]."""
        raise NotImplementedError

    def all_gather(self, send: Any, recv: Any) -> None:
        """send (n,), recv (size*n,): recv[r*n:(r+1)*n] <- rank r's send."""
        raise NotImplementedError

    def send(self, buf: Any, dest: int, tag: int) -> None:
        raise NotImplementedError

    def recv(self, buf: Any, source: int, tag: int) -> None:
        raise NotImplementedError

    def isend(self, buf: Any, dest: int, tag: int) -> "Request":
        """Start sending buf to dest; the returned Request's wait() finishes it (buf must stay
        unchanged until then)."""
        raise NotImplementedError

    def irecv(self, buf: Any, source: int, tag: int) -> "Request":
        """Start receiving into buf from source; buf holds the message after wait()."""
        raise NotImplementedError

    def completion(self) -> Any:
        """What marks the last call done: None (it returned finished) or a CUDA event."""
        return None

    def split(self, sub_mpi: Any) -> "Transport":
        """The same kind of transport over a sub-group (sub_mpi: its MPI communicator).
        A collective over the parent group's ranks that are in sub_mpi."""
        raise NotImplementedError


class MPIHost(Transport):
    """MPI on host buffers; device buffers are staged through the host."""

    name = "mpi-host"

    def __init__(self, mpi_comm: Any) -> None:
        from mpi4py import MPI
        self.MPI, self.mpi = MPI, mpi_comm
        self._fp16_sum: Any = None

    # ---------------------------------------------------------------- helpers
    def _direct(self, buf: Any) -> bool:
        """Can MPI read and write this buffer where it is?"""
        return not on_device(buf)

    def _call(self, fn: Callable[..., None], bufs: tuple, written: int) -> None:
        """fn(*bufs); buffers MPI cannot reach are copied to the host first, and bufs[written]
        is copied back afterwards."""
        if all(self._direct(b) for b in bufs):
            if any(on_device(b) for b in bufs):  # MPI reads device memory: the kernels writing it must be done
                backend.cupy_module().cuda.get_current_stream().synchronize()
            fn(*bufs)
            return
        host = [backend.device_to_host(b) if on_device(b) else b for b in bufs]
        fn(*host)
        if host[written] is not bufs[written]:
            bufs[written].set(host[written])

    def _spec(self, buf: Any) -> Any:
        """The MPI message of a buffer: float16 travels as uint16."""
        if buf.dtype == np.float16:
            return [buf.view(np.uint16), self.MPI.UNSIGNED_SHORT]
        return buf

    def _sum(self, buf: Any) -> Any:
        return self._float16_sum() if buf.dtype == np.float16 else self.MPI.SUM

    def _float16_sum(self) -> Any:
        """An MPI op that sums float16 payloads (sent as uint16) in float32."""
        if self._fp16_sum is None:
            def add(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
                a = np.frombuffer(inbuf, dtype=np.float16)
                b = np.frombuffer(inoutbuf, dtype=np.float16)
                b[...] = (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
            self._fp16_sum = self.MPI.Op.Create(add, commute=True)
        return self._fp16_sum

    # ---------------------------------------------------------------- the interface
    def allreduce_sum(self, buf: Any) -> None:
        self._call(lambda b: self.mpi.Allreduce(self.MPI.IN_PLACE, self._spec(b), op=self._sum(b)), (buf,), 0)

    def broadcast(self, buf: Any, root: int) -> None:
        self._call(lambda b: self.mpi.Bcast(self._spec(b), root=root), (buf,), 0)

    def reduce_scatter_sum(self, send: Any, recv: Any) -> None:
        self._call(lambda s, r: self.mpi.Reduce_scatter_block(self._spec(s), self._spec(r), op=self._sum(s)),
                   (send, recv), 1)

    def all_gather(self, send: Any, recv: Any) -> None:
        self._call(lambda s, r: self.mpi.Allgather(self._spec(s), self._spec(r)), (send, recv), 1)

    def send(self, buf: Any, dest: int, tag: int) -> None:
        self._call(lambda b: self.mpi.Send(self._spec(b), dest=dest, tag=tag), (buf,), 0)

    def recv(self, buf: Any, source: int, tag: int) -> None:
        self._call(lambda b: self.mpi.Recv(self._spec(b), source=source, tag=tag), (buf,), 0)

    def isend(self, buf: Any, dest: int, tag: int) -> "Request":
        if self._direct(buf):
            if on_device(buf):  # MPI reads device memory: the kernels writing it must be done
                backend.cupy_module().cuda.get_current_stream().synchronize()
            return Request(self.mpi.Isend(self._spec(buf), dest=dest, tag=tag), buf)
        host = backend.device_to_host(buf)  # staged: the host copy is what travels
        return Request(self.mpi.Isend(self._spec(host), dest=dest, tag=tag), host)

    def irecv(self, buf: Any, source: int, tag: int) -> "Request":
        if self._direct(buf):
            return Request(self.mpi.Irecv(self._spec(buf), source=source, tag=tag), buf)
        host = np.empty(buf.shape, dtype=buf.dtype)
        return Request(self.mpi.Irecv(self._spec(host), source=source, tag=tag), host, lambda: buf.set(host))

    def split(self, sub_mpi: Any) -> "MPIHost":
        return type(self)(sub_mpi)


class Request:
    """A non-blocking send or receive in flight: `wait()` blocks until it is done (then a staged
    device receive is copied to the device). Holds the buffer MPI reads or writes until then."""

    def __init__(self, mpi_request: Any, buf: Any, on_done: Callable[[], None] | None = None) -> None:
        self.mpi_request, self.buf, self.on_done = mpi_request, buf, on_done

    def wait(self) -> None:
        if self.mpi_request is None:
            return
        self.mpi_request.Wait()
        self.mpi_request = None
        if self.on_done is not None:
            self.on_done()
        self.buf = None


class MPICudaAware(MPIHost):
    """MPI reading and writing device memory directly (an MPI library built CUDA-aware).
    float16 (summed by a Python op on the host) is still staged."""

    name = "mpi-cuda-aware"

    def _direct(self, buf: Any) -> bool:
        return not (on_device(buf) and buf.dtype == np.float16)


class NCCL(Transport):
    """NCCL over device buffers, queued on the current CuPy stream (asynchronous: completion()
    is an event recorded after the last call). Host buffers are never given to it.

    Creating one is a collective over mpi_comm: rank 0 makes the NCCL id, MPI broadcasts it
    (128 bytes, as a buffer), every rank joins. NCCL refuses two ranks on one GPU."""

    name = "nccl"

    def __init__(self, mpi_comm: Any) -> None:
        from cupy.cuda import nccl
        self.nccl, self.mpi = nccl, mpi_comm
        uid = np.zeros(nccl.NCCL_UNIQUE_ID_BYTES if hasattr(nccl, "NCCL_UNIQUE_ID_BYTES") else 128, dtype=np.int64)
        if mpi_comm.Get_rank() == 0:
            uid[:] = nccl.get_unique_id()
        mpi_comm.Bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(mpi_comm.Get_size(), tuple(int(v) for v in uid), mpi_comm.Get_rank())
        self.device_id = backend.cupy_module().cuda.Device().id
        self._types = {"float32": nccl.NCCL_FLOAT32, "float16": nccl.NCCL_FLOAT16, "float64": nccl.NCCL_FLOAT64,
                       "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64, "int8": nccl.NCCL_INT8,
                       "uint8": nccl.NCCL_UINT8}
        if hasattr(nccl, "NCCL_BFLOAT16"):
            self._types["bfloat16"] = nccl.NCCL_BFLOAT16

    def _type(self, buf: Any) -> int:
        name = backend.dtype_name(buf.dtype)
        if name not in self._types:
            raise TypeError(f"NCCL transport: no NCCL type for dtype {name}; expected one of {sorted(self._types)}")
        return self._types[name]

    @staticmethod
    def _stream() -> int:
        return backend.cupy_module().cuda.get_current_stream().ptr

    def _check(self, *bufs: Any) -> None:
        for b in bufs:
            if not on_device(b):
                raise TypeError(f"NCCL transport: got a host buffer {type(b).__name__} {b.shape}; "
                                "expected a CuPy array (host buffers go by MPI)")

    def allreduce_sum(self, buf: Any) -> None:
        self._check(buf)
        p = buf.data.ptr
        self.comm.allReduce(p, p, buf.size, self._type(buf), self.nccl.NCCL_SUM, self._stream())

    def broadcast(self, buf: Any, root: int) -> None:
        self._check(buf)
        self.comm.bcast(buf.data.ptr, buf.size, self._type(buf), root, self._stream())

    def reduce_scatter_sum(self, send: Any, recv: Any) -> None:
        self._check(send, recv)
        self.comm.reduceScatter(send.data.ptr, recv.data.ptr, recv.size, self._type(recv), self.nccl.NCCL_SUM,
                                self._stream())

    def all_gather(self, send: Any, recv: Any) -> None:
        self._check(send, recv)
        self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, self._type(send), self._stream())

    def send(self, buf: Any, dest: int, tag: int) -> None:  # NCCL has no tags: messages to a peer stay in order
        self._check(buf)
        self.comm.send(buf.data.ptr, buf.size, self._type(buf), dest, self._stream())

    def recv(self, buf: Any, source: int, tag: int) -> None:
        self._check(buf)
        self.comm.recv(buf.data.ptr, buf.size, self._type(buf), source, self._stream())

    # Non-blocking point-to-point goes by MPI through host copies: NCCL's send and recv are
    # kernels that wait for their peer in stream order, so two stages sending to each other at
    # once (1F1B's steady state) would deadlock without grouping every pair of calls.
    def isend(self, buf: Any, dest: int, tag: int) -> Request:
        self._check(buf)
        return self._host_p2p().isend(buf, dest, tag)

    def irecv(self, buf: Any, source: int, tag: int) -> Request:
        self._check(buf)
        return self._host_p2p().irecv(buf, source, tag)

    def _host_p2p(self) -> MPIHost:
        if getattr(self, "_host", None) is None:
            self._host = MPIHost(self.mpi)
        return self._host

    def completion(self) -> Any:
        return DeviceEvent(backend.cupy_module().cuda.get_current_stream().record(), self.device_id)

    def split(self, sub_mpi: Any) -> "NCCL":
        return NCCL(sub_mpi)


class DeviceEvent:
    """A CUDA event with the device it belongs to, so that another thread (the watchdog's)
    can ask whether it has completed without touching any other GPU."""

    def __init__(self, event: Any, device_id: int) -> None:
        self.event, self.device_id = event, device_id

    @property
    def done(self) -> bool:
        with backend.cupy_module().cuda.Device(self.device_id):
            return bool(self.event.done)


TRANSPORTS = {"mpi-host": MPIHost, "mpi-cuda-aware": MPICudaAware, "nccl": NCCL}
