"""Model parallelism over MPI (issue 17): pipeline rows (`pp_rows`).

    python benchmarks/bench_parallel.py --pp 1,2                       # the 2-core machine
    python benchmarks/bench_parallel.py --pp 1,2,4 --models gpt-medium,12L-768 --micro 8 --steps 3

For each model, pp (1 = one process, the baseline) and schedule (gpipe, 1f1b), one job of pp
ranks, one BLAS thread per rank, the same global batch (batch_size x micro micro-batches):
  * per-rank memory: parameters, gradients and optimizer state (counted), activations
    (the most micro-batches a stage held at once x its layers' activations, the terms of
    tinygrad_lm/memory.py), and the peak RSS; against the 1/pp ideal of pp 1
  * bytes sent per step by each stage against the formula m B T C 4 x (stages it sends to:
    the next with activations, the previous with gradients)
  * tokens/s and scaling efficiency: tokens/s / (pp x tokens/s of pp 1)
  * the bubble: each stage's idle share of the step (1 - compute seconds / step seconds)
    against (p - 1) / (m + p - 1)
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {  # gpt-medium: bench_mpi.py's; 12L-768: GPT-2 small's shape
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt-medium": dict(n_layer=6, n_head=6, n_embd=384),
    "12L-768": dict(n_layer=12, n_head=12, n_embd=768),
}


def mpiexec() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else (shutil.which("mpiexec") or "mpiexec")


# ---------------------------------------------------------------- one job (every rank)
def pp_worker(args: argparse.Namespace) -> None:
    import numpy as np
    from nn.distributed import init
    from tinygrad_lm.train import Trainer, make_config
    world = init()
    cfg = make_config(None, None, data=args.data, tokenizer="char", block_size=args.block_size,
                      batch_size=args.batch_size, grad_accum=args.micro, pp=args.pp, pp_schedule=args.schedule,
                      max_iters=10 ** 6, eval_interval=10 ** 6, ckpt_interval=10 ** 6, log_interval=10 ** 6,
                      sample_tokens=0, progress=False, out=os.path.join(args.tmp, "run"),
                      cache_dir=os.path.join(args.tmp, "cache"), **MODELS[args.model])
    tr = Trainer(cfg, world=world, log=lambda s: None)
    for _ in range(args.warmup):
        tr.train_step()
    pipe = tr.pipeline
    if pipe is not None:
        pipe.timing, pipe.bytes_sent = {"busy": 0.0, "total": 0.0}, 0
    world.barrier()
    t0 = time.perf_counter()
    busy = 0.0
    for _ in range(args.steps):
        if pipe is None:  # one process: all of the step is compute but the optimizer
            t1 = time.perf_counter()
        tr.train_step()
        if pipe is None:
            busy += time.perf_counter() - t1
    world.barrier()
    dt = time.perf_counter() - t0
    mc, B, T, m = tr.model.config, cfg.batch_size, cfg.model.block_size, cfg.grad_accum
    stage = tr.model
    layers = len(stage.layers) if pipe is not None else mc.n_layer
    is_last = pipe is None or stage.is_last
    params = sum(p.data.nbytes for p in stage.parameters())
    tied = stage.tied_wte.data.nbytes if pipe is not None and stage.tied_wte is not None else 0
    opt = tr.optimizer
    opt_bytes = (opt.optimizer_state_bytes() if hasattr(opt, "optimizer_state_bytes") else
                 sum(v.nbytes for st in opt.state.values() for v in st.values() if hasattr(v, "nbytes")))
    per_layer = (2 * B * mc.n_head * T * T + 16 * B * T * mc.n_embd) * 4
    live = pipe.peak_live if pipe is not None else 1
    p, s = cfg.pp, (stage.stage if pipe is not None else 0)
    row = {"rank": world.rank, "stage": s, "layers": layers, "parameters_bytes": params + tied,
           "gradients_bytes": params + tied, "optimizer_bytes": opt_bytes, "peak_live_micro_batches": live,
           "activations_bytes": live * (layers * per_layer + (3 * B * T * mc.vocab_size * 4 if is_last else 0)),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "tokens_per_s": args.steps * B * m * T * tr.data_world.size / dt, "step_s": dt / args.steps}
    if pipe is not None:
        row["bytes_sent_per_step"] = pipe.bytes_sent / args.steps
        row["bytes_sent_formula"] = m * B * T * mc.n_embd * 4 * ((s < p - 1) + (s > 0))
        row["bubble"] = 1 - pipe.timing["busy"] / pipe.timing["total"]
    else:
        row["bubble"] = 1 - busy / dt
    with open(os.path.join(args.tmp, f"rank{world.rank}.json"), "w") as f:
        json.dump(row, f)


# ---------------------------------------------------------------- the rows
def run_job(args: argparse.Namespace, model: str, pp: int, schedule: str) -> list[dict]:
    """One job of pp ranks (pp 1: one process); each rank's row."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--pp-worker", "--model", model, "--pp", str(pp),
               "--schedule", schedule, "--micro", str(args.micro), "--batch-size", str(args.batch_size),
               "--block-size", str(args.block_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--data", args.data, "--tmp", tmp]
        if pp > 1:
            cmd = [mpiexec(), "-n", str(pp)] + cmd
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=ROOT)
        for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # they can force a slower OpenBLAS kernel
            env.pop(var, None)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
        return [json.load(open(os.path.join(tmp, f"rank{k}.json"))) for k in range(pp)]


def pp_rows(args: argparse.Namespace) -> list[dict]:
    """Per model: pp 1, then each pp > 1 under each schedule; memory, bytes, tokens/s, bubble."""
    from nn.distributed.pipeline import bubble_formula
    rows = []
    for model in args.models.split(","):
        base = None
        for pp in [int(x) for x in args.pp.split(",")]:
            for schedule in (["-"] if pp == 1 else args.schedules.split(",")):
                ranks = run_job(args, model, pp, schedule if pp > 1 else "1f1b")
                tps = ranks[0]["tokens_per_s"]
                if pp == 1:
                    base = ranks[0]
                row = {"kind": "pp", "model": model, "pp": pp, "schedule": schedule, "micro_batches": args.micro,
                       "batch_size": args.batch_size, "block_size": args.block_size, "tokens_per_s": tps,
                       "step_s": ranks[0]["step_s"], "ranks": ranks}
                if base is not None:
                    row["speedup"] = tps / base["tokens_per_s"]
                    row["scaling_efficiency"] = tps / (pp * base["tokens_per_s"])
                    mem = ("parameters_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes")
                    row["memory_max_rank_over_pp1"] = {k: max(r[k] for r in ranks) / base[k] for k in mem}
                    row["memory_ideal"] = 1 / pp
                if pp > 1:
                    row["bubble_formula"] = bubble_formula(pp, args.micro)
                    row["bubble_measured"] = [round(r["bubble"], 4) for r in ranks]
                    row["bubble_minus_formula_points"] = [round(100 * (r["bubble"] - row["bubble_formula"]), 2)
                                                          for r in ranks]
                    row["bytes_sent_measured_over_formula"] = [r["bytes_sent_per_step"] / r["bytes_sent_formula"]
                                                               for r in ranks]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt-medium,12L-768")
    p.add_argument("--pp", default="1,2")
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--micro", type=int, default=8, help="micro-batches per step (--grad-accum)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"))
    p.add_argument("--pp-worker", action="store_true")
    p.add_argument("--model", default="gpt-medium", choices=sorted(MODELS))
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    if args.pp_worker:
        args.pp = int(args.pp)
        return pp_worker(args)
    from _common import emit, git_rev, machine_info
    emit({"benchmark": "bench_parallel", "commit": git_rev(), "machine": machine_info(1),
          "load_average": os.getloadavg(), "args": vars(args), "pp_rows": pp_rows(args)})


if __name__ == "__main__":
    main()
