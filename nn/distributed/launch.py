"""Starting and ending a job: is this process one of several MPI ranks, the world to train
with, and ending every rank when one fails."""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable

from nn.distributed.data_parallel import MPIWorld, World

LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")


def launched_under_mpi() -> bool:
    """True when an MPI launcher started this process with more than one rank (read from the
    launchers' environment variables, so mpi4py is not imported to find out)."""
    for var in LAUNCHER_SIZE_VARS:
        v = os.environ.get(var)
        if v is not None and v.isdigit() and int(v) > 1:
            return True
    return False


def init(bucket_mb: float = 25.0, reduce_dtype: str | None = None, collective_timeout: float = 0.0) -> World:
    """The MPI world when an MPI launcher started several ranks, else a single-process World
    (mpi4py is not even imported then). Under mpiexec without mpi4py: an error naming the extra.
    collective_timeout: seconds after which a collective that has not finished aborts the job (0: never)."""
    if not launched_under_mpi():
        world = World()
        world.collective_timeout = float(collective_timeout)
        return world
    return MPIWorld(bucket_mb=bucket_mb, reduce_dtype=reduce_dtype, collective_timeout=collective_timeout)


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
        # one write, the error first: the launcher may drop output once the job aborts
        sys.stderr.write(f"[rank {world.rank}] fatal error: {type(e).__name__}: {e}; aborting all {world.size} ranks\n"
                         + "".join(traceback.format_exception(e)))
        sys.stderr.flush()
        time.sleep(0.5)  # let mpiexec forward it
        world.abort(1)
        return 1
