"""Data-parallel scaling over MPI (issue 8): weak scaling, all-reduce bandwidth, ZeRO-1 memory.

    python benchmarks/bench_mpi.py --ranks 1,2                  # the 2-core machine
    python benchmarks/bench_mpi.py --ranks 1,2,4,8 --steps 30   # the 16-core device machine
    python benchmarks/bench_mpi.py --ranks 2 --threads 2         # 2 ranks x 2 BLAS threads on 2 cores (oversubscribed)

Weak scaling: every rank keeps the per-rank batch (shakespeare-char: 12 x 64 tokens), one
BLAS thread per rank; efficiency(N) = tokens/s with N ranks / (N x tokens/s with 1 rank).
Inside training we time every gradient Allreduce (nn.distributed.MPIWorld counts bytes and
seconds) and compare with a raw mpi4py Allreduce of the same bytes. The fraction of the step
spent in the all-reduce bounds what overlapping it with backward could gain.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, ROOT)
    import numpy as np
    from nn.distributed import init
    from tinygrad_lm.train import Trainer, make_config
    world = init()
    medium = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=args.batch_size or 16)
    cfg = make_config("shakespeare-char", None, data=args.data, out=os.path.join(args.tmp, "run"), progress=False,
                      sample_tokens=0, cache_dir=os.path.join(args.tmp, "cache"), zero=args.zero, device=args.device,
                      max_iters=args.steps + args.warmup, eval_interval=10 ** 6, ckpt_interval=10 ** 6,
                      **(medium if args.config == "gpt-medium" else {}))
    tr = Trainer(cfg, world=world, log=lambda s: None)
    for _ in range(args.warmup):
        tr.train_step()
    world.barrier()
    if world.size > 1:
        world.bytes_reduced, world.seconds_reducing = 0, 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        tr.train_step()
    if args.device == "cuda":
        from tensor import backend
        backend.cupy_module().cuda.Device().synchronize()
    world.barrier()
    dt = time.perf_counter() - t0
    out = {"ranks": world.size, "zero": args.zero, "steps": args.steps, "device": args.device,
           "config": args.config, "transport": getattr(world, "transport", None),
           "tokens_per_s": args.steps * cfg.batch_size * cfg.model.block_size * world.size / dt,
           "step_ms": 1000 * dt / args.steps}
    # the same forward + backward without any communication: is the compute itself slower with N ranks?
    x, y = tr.micro_batches(0)[0]
    if args.device == "cuda":
        x, y = backend.to_numpy(x), backend.to_numpy(y)
    t0 = time.perf_counter()
    for _ in range(10):
        _, loss = tr.model(x, y)
        loss.backward()
        tr.model.zero_grad()
    if args.device == "cuda":
        backend.cupy_module().cuda.Device().synchronize()
    out["compute_only_ms"] = 100 * (time.perf_counter() - t0)
    try:
        import threadpoolctl
        out["blas_threads"] = [d.get("num_threads") for d in threadpoolctl.threadpool_info()]
    except ImportError:
        pass
    out["affinity"] = sorted(os.sched_getaffinity(0))[:8]
    opt = tr.optimizer
    out["optimizer_state_bytes_per_rank"] = (opt.optimizer_state_bytes() if hasattr(opt, "optimizer_state_bytes")
                                             else sum(v.nbytes for st in opt.state.values() for v in st.values()
                                                      if hasattr(v, "nbytes")))
    if world.size > 1 and not args.zero:
        nbytes = world.bytes_reduced / args.steps
        out["allreduce_ms_per_step"] = 1000 * world.seconds_reducing / args.steps
        out["allreduce_fraction_of_step"] = world.seconds_reducing / dt
        out["allreduce_bytes_per_step"] = nbytes
        out["allreduce_GBps_in_training"] = nbytes / (world.seconds_reducing / args.steps) / 1e9
        buf = np.ones(int(nbytes // 4), dtype=np.float32)  # a raw (host) Allreduce of the same bytes
        MPI = world.MPI
        world.comm.mpi.Allreduce(MPI.IN_PLACE, buf)
        world.barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            world.comm.mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        out["raw_allreduce_GBps"] = nbytes * 20 / (time.perf_counter() - t0) / 1e9
    if world.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def mpiexec() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else (shutil.which("mpiexec") or "mpiexec")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"))
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--config", default="shakespeare-char", choices=("shakespeare-char", "gpt-medium"))
    p.add_argument("--batch-size", type=int, default=0, help="per rank (gpt-medium default 16)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--tmp", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS/OpenMP threads per rank (OMP_NUM_THREADS); 1 = one rank per core")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    t = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t,
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=ROOT)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for zero in ([0, 1] if args.zero else [0]):
            for n in [int(x) for x in args.ranks.split(",")]:
                if zero and n == 1:
                    continue
                cmd = [mpiexec(), "-n", str(n), sys.executable, os.path.abspath(__file__), "--worker",
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--data", args.data,
                       "--zero", str(zero), "--tmp", tmp, "--device", args.device, "--config", args.config,
                       "--batch-size", str(args.batch_size)]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
                if r.returncode or not line:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
                results.append(json.loads(line[0][7:]))
    base = next((r["tokens_per_s"] for r in results if r["ranks"] == 1), None)
    for r in results:
        r["weak_scaling_efficiency"] = r["tokens_per_s"] / (r["ranks"] * base) if base else None
    print(json.dumps({"cpu_count": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
                      "config": f"{args.config} on {args.device}, per-rank batch kept, {args.threads} BLAS thread(s) per rank",
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
