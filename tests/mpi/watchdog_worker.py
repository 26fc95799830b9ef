"""Run under `mpiexec -n 2` by tests/test_mpi.py: the collective watchdog.

    python watchdog_worker.py hang   rank 1 sleeps for ever before an all-reduce that rank 0
                                     enters with a 2 s timeout: the job must be aborted
    python watchdog_worker.py ok     many collectives that finish, then both ranks idle past
                                     the timeout: nothing fires, one watchdog thread in all
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np

from nn.distributed import init


def main() -> int:
    mode = sys.argv[1]
    world = init(collective_timeout=2.0)
    assert world.size == 2 and world.collective_timeout == 2.0, (world.size, world.collective_timeout)
    comm = world.comm
    if mode == "hang":
        comm.barrier()
        if world.rank == 1:
            while True:  # a stalled rank: never reaches the all-reduce
                time.sleep(60)
        comm.allreduce(np.ones(16, dtype=np.float32))
        print("the all-reduce returned although rank 1 never joined", flush=True)
        return 3
    buf, part = np.ones(1000, dtype=np.float32), np.zeros(500, dtype=np.float32)
    for _ in range(200):
        comm.allreduce(buf, op="mean")
        comm.reduce_scatter(buf, part)
        comm.all_gather(part, buf)
        world.allreduce_mean(1.0)
    time.sleep(3.0)  # idle longer than the timeout, with no collective in flight
    world.barrier()
    watchdogs = [t for t in threading.enumerate() if t.name == "collective-watchdog"]
    if world.rank == 0:
        print(f"OK watchdog threads={len(watchdogs)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
