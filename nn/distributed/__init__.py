"""Distributed training over MPI (mpi4py): a Communicator, data parallelism, ZeRO-1.

    mpiexec -n N python -m tinygrad_lm train ...

Layers, each built on the one below:

  transports.py     how bytes move: MPI on host buffers, CUDA-aware MPI on device buffers,
                    NCCL (cupy.cuda.nccl) on device buffers; one small interface
  watchdog.py       ends the job when a collective does not finish in time
  comm.py           Communicator: allreduce / broadcast / reduce_scatter / all_gather /
                    send / recv / barrier / any / all over flat contiguous buffers, and
                    split(color, key) into sub-communicators (MPI Comm.Split; for NCCL a new
                    NCCL communicator over the sub-group); Grid(comm, tp, pp): the
                    (dp, pp, tp) grid of sub-communicators, tp ranks adjacent
  data_parallel.py  World (one process, every collective a no-op) and MPIWorld: gradients
                    averaged in flat buckets (optionally float16 on the wire), parameters
                    broadcast from rank 0
  zero.py           ZeRO1: optimizer state sharded over the ranks (reduce-scatter, update
                    the own shard, all-gather)
  tensor_parallel.py  Megatron-LM tensor parallelism: f and g, column-, row- and
                    vocabulary-parallel layers and cross-entropy, shard/unshard,
                    CountingComm (tinygrad_lm/parallel_model.py builds the GPT)
  pipeline.py       pipeline parallelism: PipelineStage (a GPT's blocks for one stage),
                    Pipeline (GPipe / 1F1B schedules over isend/irecv), checkpoint helpers
  model_parallel.py ModelParallel: what a gradient step adds with tp and/or pp (the norm with
                    each parameter counted once, the tied wte, one fp16 verdict)
  launch.py         launched_under_mpi(), init(), run_or_abort()

Without mpi4py, or as a single process, `init()` returns a `World` of size 1 whose methods do
nothing, so the same training code runs unchanged.

GPU training (one rank per GPU, `world.use_cuda()` picks GPU local_rank % count) moves device
buffers by the first transport that applies:
  * "nccl": NCCL through `cupy.cuda.nccl`, when every local rank has a GPU of its own (NCCL
    refuses two ranks on one GPU) and TINYGRAD_LM_NCCL is not 0. NCCL_NVLS_ENABLE=0 is set.
  * "mpi-cuda-aware": device buffers handed to MPI, when TINYGRAD_LM_CUDA_AWARE_MPI=1 says
    the MPI library is CUDA-aware (there is no portable way to ask it).
  * "mpi-host": staged through host memory (always works, e.g. two ranks sharing one GPU).
`world.transport` says which one is in use.

Collective timeout (`init(collective_timeout=S)`, `MPIWorld(collective_timeout=S)` or
`world.collective_timeout = S`; seconds, 0 = off, the default): when a rank dies or stalls,
the others would wait in their next collective for ever. With S > 0 a watchdog thread ends
the whole job (MPI Abort, non-zero exit) once any collective has run S seconds, after
printing `[rank R] error: collective <name> did not finish within S s (another rank may have
died or stalled); aborting the job`. Choose S well above the slowest legitimate collective
(the first one includes start-up skew between ranks; a checkpoint save on rank 0 delays the
others' next collective). It costs a lock per collective and no thread per collective.
"""
from __future__ import annotations

from nn.distributed.comm import MPI_EXTRA_HELP, Communicator, Grid, mpi_module
from nn.distributed.data_parallel import MPIWorld, World
from nn.distributed.launch import init, launched_under_mpi, run_or_abort
from nn.distributed.transports import MPICudaAware, MPIHost, NCCL, Transport
from nn.distributed.watchdog import Watchdog
from nn.distributed.zero import ZeRO1

__all__ = ["MPI_EXTRA_HELP", "Communicator", "Grid", "MPICudaAware", "MPIHost", "MPIWorld", "NCCL", "Transport",
           "Watchdog", "World", "ZeRO1", "init", "launched_under_mpi", "mpi_module", "run_or_abort"]
