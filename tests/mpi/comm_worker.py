"""Run under `mpiexec -n N` by tests/test_mpi.py: the Communicator's collectives against closed forms.

    python comm_worker.py cpu                 host (NumPy) buffers over host MPI
    python comm_worker.py cuda TRANSPORT      device (CuPy) buffers over TRANSPORT
                                              ("mpi-host", "mpi-cuda-aware" or "nccl")

Rank r contributes arrays that depend on r in a known way (e.g. (r + 1) * base), so every
result has a closed form: sum over r of (r + 1) = N (N + 1) / 2, and so on. Any mismatch
raises; the job is then aborted so no rank waits for ever. Rank 0 prints "OK" at the end.
"""
from __future__ import annotations

import sys
import traceback

import numpy as np

from nn.distributed import Communicator, Grid
from tensor import backend


def check(name: str, got: object, expected: object, tol: float = 0.0) -> None:
    got, expected = backend.to_numpy(got), backend.to_numpy(expected)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=tol, atol=tol):
        raise AssertionError(f"{name}: got {got!r}, expected {expected!r}")


def collectives(comm: Communicator, xp: object, label: str) -> None:
    r, N = comm.rank, comm.size
    tri = N * (N + 1) / 2  # sum over ranks of (r + 1)
    base = xp.asarray(np.random.default_rng(0).standard_normal(37).astype(np.float32))

    buf = base * (r + 1)
    comm.allreduce(buf)
    check(f"{label} allreduce sum", buf, base * tri, 1e-6)
    buf = base * (r + 1)
    comm.allreduce(buf, op="mean")
    check(f"{label} allreduce mean", buf, base * tri / N, 1e-6)
    buf = base * (r + 1)
    comm.allreduce(buf, op="mean", wire_dtype=np.float16)
    check(f"{label} allreduce mean in float16", buf, base * tri / N, 3e-3)
    b64 = xp.arange(5, dtype=np.float64) * (r + 1)
    comm.allreduce(b64)
    check(f"{label} allreduce float64", b64, np.arange(5) * tri)

    for root in range(N):
        buf = xp.arange(6, dtype=np.float32) + 100 * r
        comm.broadcast(buf, root=root)
        check(f"{label} broadcast from {root}", buf, np.arange(6) + 100 * root)

    n = 4
    send = xp.arange(N * n, dtype=np.float32) * (r + 1)
    recv = xp.zeros(n, dtype=np.float32)
    comm.reduce_scatter(send, recv)
    check(f"{label} reduce_scatter", recv, np.arange(r * n, (r + 1) * n) * tri)
    comm.reduce_scatter(send, recv, op="mean")
    check(f"{label} reduce_scatter mean", recv, np.arange(r * n, (r + 1) * n) * tri / N, 1e-6)

    send = xp.arange(n, dtype=np.float32) + 10 * r
    recv = xp.zeros(N * n, dtype=np.float32)
    comm.all_gather(send, recv)
    check(f"{label} all_gather", recv, np.concatenate([np.arange(n) + 10 * k for k in range(N)]))

    if N > 1:  # a ring: even ranks send first, odd ranks receive first
        out, got = xp.arange(5, dtype=np.float32) + 10 * r, xp.zeros(5, dtype=np.float32)
        for step in (("send", "recv") if r % 2 == 0 else ("recv", "send")):
            if step == "send":
                comm.send(out, dest=(r + 1) % N, tag=7)
            else:
                comm.recv(got, source=(r - 1) % N, tag=7)
        check(f"{label} send/recv", got, np.arange(5) + 10 * ((r - 1) % N))
        # non-blocking: every rank sends to both neighbours at once, then receives (blocking sends of
        # this size would wait for each other: MPI sends large messages only once they are received)
        big = 1 << 20
        reqs = [comm.isend(xp.full(big, float(10 * r + k), dtype=np.float32), dest=(r + d) % N, tag=20 + k)
                for k, d in enumerate((1, -1))]
        left, right = xp.zeros(big, dtype=np.float32), xp.zeros(big, dtype=np.float32)
        recvs = [comm.irecv(left, source=(r - 1) % N, tag=20), comm.irecv(right, source=(r + 1) % N, tag=21)]
        for q in recvs + reqs:
            q.wait()
        check(f"{label} isend/irecv from the left", left, np.full(big, 10.0 * ((r - 1) % N)))
        check(f"{label} isend/irecv from the right", right, np.full(big, 10.0 * ((r + 1) % N) + 1))

    comm.barrier()
    assert comm.any(r == N - 1) is True and comm.any(False) is False, f"{label} any"
    assert comm.all(True) is True and comm.all(r != N - 1) is False, f"{label} all"
    assert comm.allreduce_scalar(r + 1.0, "mean") == tri / N, f"{label} allreduce_scalar"

    for bad in (xp.zeros((2, 3), dtype=np.float32), xp.zeros(8, dtype=np.float32)[::2]):
        try:
            comm.allreduce(bad)
        except ValueError as e:
            assert "flat contiguous" in str(e), str(e)
        else:
            raise AssertionError(f"{label}: allreduce accepted a buffer of shape {bad.shape}")
    try:
        comm.reduce_scatter(xp.zeros(N * 3 + 1, dtype=np.float32), xp.zeros(3, dtype=np.float32))
    except ValueError as e:
        assert "send.size" in str(e), str(e)
    else:
        raise AssertionError(f"{label}: reduce_scatter accepted mismatched sizes")


def splits(comm: Communicator, xp: object, label: str) -> None:
    r, N = comm.rank, comm.size
    alone = comm.split(color=r)  # one communicator per rank
    assert alone is not None and (alone.rank, alone.size) == (0, 1), f"{label} split alone"
    assert alone.transport == comm.transport
    collectives(alone, xp, f"{label} split(size 1)")
    everyone = comm.split(color=0, key=N - 1 - r)  # all ranks, in reverse order
    assert (everyone.rank, everyone.size) == (N - 1 - r, N), f"{label} split reversed"
    assert everyone.transport == comm.transport
    collectives(everyone, xp, f"{label} split(size {N}, reversed)")
    buf = xp.full(3, float(r), dtype=np.float32)
    everyone.broadcast(buf, root=0)  # everyone's rank 0 is world rank N - 1
    check(f"{label} split broadcast", buf, np.full(3, N - 1.0))
    none = comm.split(color=-1 if r == N - 1 else 0)
    if r == N - 1:
        assert none is None, f"{label} split(color=-1) should give None"
    else:
        assert none.size == N - 1 and none.rank == r


def grids(comm: Communicator, xp: object, label: str) -> None:
    """Every (tp, pp) that divides the world: sizes, coordinates, and a sum over each group."""
    r, N = comm.rank, comm.size
    for tp in range(1, N + 1):
        for pp in range(1, N // tp + 1):
            if N % (tp * pp):
                continue
            g = Grid(comm, tp=tp, pp=pp)
            dp = N // (tp * pp)
            assert (g.dp_size, g.pp_size, g.tp_size) == (dp, pp, tp)
            assert r == (g.d * pp + g.p) * tp + g.t, f"{label} grid coordinates"
            world_rank = lambda d, p, t: (d * pp + p) * tp + t  # noqa: E731
            groups = ((g.tp, tp, g.t, [world_rank(g.d, g.p, t) for t in range(tp)]),
                      (g.pp, pp, g.p, [world_rank(g.d, p, g.t) for p in range(pp)]),
                      (g.dp, dp, g.d, [world_rank(d, g.p, g.t) for d in range(dp)]))
            for group, size, own, members in groups:
                assert (group.size, group.rank) == (size, own), f"{label} grid tp={tp} pp={pp}"
                buf = xp.asarray([float(r)])
                group.allreduce(buf)  # the sum of the group's world ranks
                check(f"{label} grid tp={tp} pp={pp} sum", buf, np.array([float(sum(members))]))
    try:
        Grid(comm, tp=N + 1)
    except ValueError as e:
        assert "cannot be cut" in str(e)
    else:
        raise AssertionError("Grid accepted tp larger than the world")


def main() -> int:
    comm = Communicator(timeout=120)  # a bug that leaves one rank waiting aborts the job instead of hanging it
    try:
        if sys.argv[1] == "cpu":
            collectives(comm, np, "cpu")
            splits(comm, np, "cpu")
            grids(comm, np, "cpu")
        else:
            cp = backend.cupy_module()
            cp.cuda.Device(comm.local_rank_size()[0] % cp.cuda.runtime.getDeviceCount()).use()
            comm.use_transport(sys.argv[2])
            assert comm.transport == sys.argv[2] and comm._transport(cp.zeros(1)) is comm.device
            collectives(comm, cp, sys.argv[2])
            splits(comm, cp, sys.argv[2])
            grids(comm, cp, sys.argv[2])
            cp.cuda.get_current_stream().synchronize()
        comm.barrier()
    except BaseException:
        sys.stderr.write(f"[rank {comm.rank}] " + traceback.format_exc())
        sys.stderr.flush()
        comm.abort(1)
    if comm.rank == 0:
        print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
