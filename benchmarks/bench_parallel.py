"""Model parallelism over MPI (issue 17): what tensor and pipeline parallelism save per rank,
what they send, how they scale, in one command and one JSON object.

The 16-core host (one BLAS thread per rank; the script sets OMP_NUM_THREADS=1 and friends for
every rank it launches, so only this process's shell matters for the one-process sections):

    OMP_NUM_THREADS=1 python benchmarks/bench_parallel.py --models gpt-medium,12L-768 --tp 1,2,3,4,6,8 --pp 1,2,4 --schedules gpipe,1f1b --mixes 2x2x1,1x2x2,2x2x2,4x2x1,1x4x2,2x4x2 --batch-size 4 --block-size 256 --micro 8 --steps 5 > parallel.json

(--mixes are dp x tp x pp; at most 16 ranks, one per core.)

The 2-core machine (small: a smoke run of every section):

    python benchmarks/bench_parallel.py --models gpt-medium --tp 1,2 --pp 1,2 --mixes 1x2x2 --steps 1

Ranks sharing one GPU: add --device cuda (host-staged transport). The launcher is the mpiexec
next to this Python (else the one on PATH); it is asked `mpiexec --version`: Open MPI gets
--oversubscribe --bind-to none (and --allow-run-as-root when run as root), MPICH (Hydra)
nothing extra. --mpiexec-args adds more.

Sections:

  tp_memory      per-rank bytes of parameters, gradients, AdamW state and the activations kept for
                 backward, for each tp, as a fraction of tp 1 (ideal: 1/tp). Measured in one
                 process on rank 0's share of the model (TensorParallelGPT over a stand-in group
                 whose collectives keep the shapes but not the values: memory depends on shapes
                 only). Activations: every array the autograd graph of one forward holds for
                 backward, counted once.
  tp_bytes       bytes handed to each collective in one forward + backward, counted by
                 CountingComm, against the formula (4-byte floats; B batch, T block, C width,
                 L layers): all-reduce 4 B T C (2 L + 1) forward + 4 B T C (2 L + 1) backward
                 (two per block each way, the embedding's g, the lm_head's f) + 8 B T (the loss's
                 sums); all-gather 4 B T (the loss's row maxima). A ring all-reduce puts
                 2 (tp - 1) / tp times those bytes on each rank's link.
  rows           one mpiexec job per layout, real training steps (the trainer's code path), the
                 same global batch per data-parallel rank (batch_size x micro micro-batches):
                 kind "tp" (tp = 1, 2, ...), "pp" (each pp > 1 under each schedule), "mix"
                 (dp x tp x pp from --mixes, the pipeline under 1f1b). Each: tokens/s of the job,
                 speedup against one rank and efficiency = speedup / ranks (tp and pp keep the
                 global batch: strong scaling; dp multiplies it: tokens/s is per job); per rank:
                 parameter, gradient and optimizer bytes (counted), the peak RSS, the construction's
                 peak (tracemalloc's traced peak while the Trainer is built, and the peak RSS right
                 after: a rank builds only its part, so both follow 1/(tp pp) plus one full
                 parameter and the interpreter's own; whole_model_bytes for scale), pipeline
                 activations (the most micro-batches a stage held x its layers' activations, the
                 terms of tinygrad_lm/memory.py; tp 1 only) against the 1/pp ideal, bytes each
                 stage sent against m B T C 4 x (stages it sends to), and the bubble (each stage's
                 idle share: 1 - compute seconds / step seconds) against (p - 1) / (m + p - 1).

Configs: gpt-medium (6 layers, 6 heads, width 384) and 12L-768 (12 layers, 12 heads, width 768),
both on the shakespeare-char vocabulary. A tp that does not divide the number of heads is
skipped, and listed as skipped.
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
for d in (ROOT, os.path.join(ROOT, "benchmarks")):
    if d not in sys.path:
        sys.path.insert(0, d)

CONFIGS = {"tiny": dict(n_layer=4, n_head=4, n_embd=128),
           "gpt-medium": dict(n_layer=6, n_head=6, n_embd=384),
           "12L-768": dict(n_layer=12, n_head=12, n_embd=768),
           # GPT-2 small's body with 16 heads of 48, so that tp 8 divides the heads (12 does not)
           "12L-768-16h": dict(n_layer=12, n_head=16, n_embd=768)}
VOCAB = 65  # shakespeare-char
BLOCK = 256  # the one-process sections' context (--block-size)


class StandInGroup:
    """Rank `rank` of a group of `size` whose collectives keep shapes, not values (all-reduce: this
    rank's values; all-gather: this rank's block in every slot). For counting memory and bytes in
    one process only: the numbers it computes are not the model's."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def allreduce(self, buf, op="sum", wire_dtype=None):
        return buf

    def all_gather(self, send, recv):
        recv.reshape(self.size, -1)[...] = send
        return recv

    def allreduce_scalar(self, value, op="sum"):
        return value


def _model(name: str, tp: int, comm=None):
    from tinygrad_lm.model import GPT, GPTConfig
    from tinygrad_lm.parallel_model import TensorParallelGPT
    full = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, **CONFIGS[name]), seed=0)
    return full if tp == 1 else TensorParallelGPT(full, comm or StandInGroup(0, tp))


def saved_bytes(loss) -> int:
    """Bytes of every array the graph behind `loss` keeps for backward (each array once)."""
    seen, total, stack, visited = set(), 0, [loss._ctx], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in visited:
            continue
        visited.add(id(fn))
        for a in fn.saved or ():
            if hasattr(a, "nbytes") and id(a) not in seen:
                seen.add(id(a))
                total += int(a.nbytes)
        stack.extend(i for i in fn.inputs if hasattr(i, "saved"))
    return total


def tp_memory(configs: list[str], tps: list[int], batch: int) -> list[dict]:
    import numpy as np
    rows = []
    for name in configs:
        base = None
        for tp in tps:
            if CONFIGS[name]["n_head"] % tp:
                continue
            model = _model(name, tp)
            T = BLOCK
            rng = np.random.default_rng(0)
            _, loss = model(rng.integers(0, VOCAB, (batch, T)), rng.integers(0, VOCAB, (batch, T)))
            params = sum(p.data.nbytes for p in model.parameters())
            row = {"config": name, "tp": tp, "batch": batch, "params_bytes": params, "grads_bytes": params,
                   "adamw_state_bytes": 2 * params, "activation_bytes": saved_bytes(loss)}
            del loss
            base = base or row
            for k in ("params_bytes", "activation_bytes"):
                row[k.replace("_bytes", "_vs_tp1")] = round(row[k] / base[k], 4)
            row["ideal_vs_tp1"] = round(1 / tp, 4)
            rows.append(row)
    return rows


def tp_bytes(configs: list[str], tps: list[int], batch: int) -> list[dict]:
    import numpy as np
    from nn.distributed.tensor_parallel import CountingComm
    rows = []
    for name in configs:
        c = CONFIGS[name]
        B, T, C, L = batch, BLOCK, c["n_embd"], c["n_layer"]
        for tp in tps:
            if tp == 1 or c["n_head"] % tp:
                continue
            comm = CountingComm(StandInGroup(0, tp))
            model = _model(name, tp, comm)
            rng = np.random.default_rng(0)
            _, loss = model(rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T)))
            fwd = dict(comm.nbytes), dict(comm.calls)
            comm.reset()
            loss.backward()
            bwd = dict(comm.nbytes), dict(comm.calls)
            act = 4 * B * T * C
            formula = {"forward_allreduce": act * (2 * L + 1) + 8 * B * T, "forward_all_gather": 4 * B * T,
                       "backward_allreduce": act * (2 * L + 1)}
            measured = {"forward_allreduce": fwd[0].get("allreduce", 0), "forward_all_gather": fwd[0].get("all_gather", 0),
                        "backward_allreduce": bwd[0].get("allreduce", 0)}
            rows.append({"config": name, "tp": tp, "batch": B, "measured_bytes": measured, "formula_bytes": formula,
                         "calls": {"forward": fwd[1], "backward": bwd[1]},
                         "match": measured == formula,
                         "ring_bytes_on_each_link_per_step": int(2 * (tp - 1) / tp * (measured["forward_allreduce"]
                                                                                      + measured["backward_allreduce"]))})
    return rows


# ---------------------------------------------------------------- one job (every rank)
def worker(args: argparse.Namespace) -> None:
    from nn.distributed import init
    from tinygrad_lm.train import Trainer, make_config
    world = init()
    cfg = make_config(None, None, data=args.data, tokenizer="char", block_size=args.block_size,
                      batch_size=args.batch_size, grad_accum=args.micro, tp=args.tp_one, pp=args.pp_one,
                      dp=args.dp_one, pp_schedule=args.schedule, device=args.device,
                      max_iters=10 ** 6, eval_interval=10 ** 6, ckpt_interval=10 ** 6, log_interval=10 ** 6,
                      sample_tokens=0, progress=False, out=os.path.join(args.tmp, "run"),
                      cache_dir=os.path.join(args.tmp, "cache"), **CONFIGS[args.config])
    import tracemalloc
    tracemalloc.start()  # the construction only (tracing slows every allocation)
    tr = Trainer(cfg, world=world, log=lambda s: None)
    built_traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.warmup):
        tr.train_step()
    pipe = tr.pipeline
    if pipe is not None:
        pipe.timing, pipe.bytes_sent = {"busy": 0.0, "total": 0.0}, 0
    world.barrier()
    t0, busy = time.perf_counter(), 0.0
    for _ in range(args.steps):
        t1 = time.perf_counter()
        tr.train_step()
        busy += time.perf_counter() - t1
    if args.device == "cuda":
        from tensor import backend
        backend.cupy_module().cuda.Device().synchronize()
    world.barrier()
    dt = time.perf_counter() - t0
    mc, B, T, m = cfg.model, cfg.batch_size, cfg.model.block_size, cfg.grad_accum
    stage = tr.model
    layers = len(stage.layers) if pipe is not None else mc.n_layer
    is_last = pipe is None or stage.is_last
    params = sum(p.data.nbytes for p in stage.parameters())
    tied = stage.tied_wte.data.nbytes if pipe is not None and stage.tied_wte is not None else 0
    opt = tr.optimizer
    opt_bytes = (opt.optimizer_state_bytes() if hasattr(opt, "optimizer_state_bytes") else
                 sum(v.nbytes for st in opt.state.values() for v in st.values() if hasattr(v, "nbytes")))
    grid = tr.layout.grid
    p, s = cfg.pp, (stage.stage if pipe is not None else 0)
    row = {"rank": world.rank, "coords_dpt": [grid.d, grid.p, grid.t] if grid is not None else [0, 0, 0],
           "stage": s, "layers": layers, "parameters_bytes": params + tied, "gradients_bytes": params + tied,
           "optimizer_bytes": opt_bytes, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "construction_traced_peak_bytes": built_traced, "construction_peak_rss_bytes": built_rss,
           "whole_model_bytes": 4 * tr.n_params,
           "tokens_per_s": args.steps * tr.global_batch_size * T / dt, "step_s": dt / args.steps}
    if cfg.tp == 1:
        live = pipe.peak_live if pipe is not None else 1
        per_layer = (2 * B * mc.n_head * T * T + 16 * B * T * mc.n_embd) * 4
        row["peak_live_micro_batches"] = live
        row["activations_bytes"] = live * (layers * per_layer + (3 * B * T * mc.vocab_size * 4 if is_last else 0))
    if pipe is not None:
        row["bytes_sent_per_step"] = pipe.bytes_sent / args.steps
        row["bytes_sent_formula"] = m * B * T * mc.n_embd * 4 * ((s < p - 1) + (s > 0))
        row["bubble"] = 1 - pipe.timing["busy"] / pipe.timing["total"]
    with open(os.path.join(args.tmp, f"rank{world.rank}.json"), "w") as f:
        json.dump(row, f)


# ---------------------------------------------------------------- launching jobs
def mpiexec() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else (shutil.which("mpiexec") or "mpiexec")


def mpiexec_flags(exe: str) -> list[str]:
    """What this MPI's launcher needs to start more ranks than it thinks it should, unpinned:
    Open MPI (`mpiexec --version` says "Open MPI" or "OpenRTE") --oversubscribe --bind-to none,
    and --allow-run-as-root as root; MPICH's Hydra nothing."""
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if "Open MPI" in version or "OpenRTE" in version:
        return ["--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return []


def run_job(args: argparse.Namespace, config: str, dp: int, tp: int, pp: int, schedule: str) -> list[dict]:
    """One job of dp x tp x pp ranks (one rank: no mpiexec), one BLAS thread each; every rank's row."""
    n = dp * tp * pp
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", config, "--tp-one", str(tp),
               "--pp-one", str(pp), "--dp-one", str(dp), "--schedule", schedule, "--micro", str(args.micro),
               "--batch-size", str(args.batch_size), "--block-size", str(args.block_size), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--data", args.data, "--tmp", tmp,
               "--device", args.device]
        if n > 1:
            exe = mpiexec()
            cmd = [exe] + mpiexec_flags(exe) + args.mpiexec_args.split() + ["-n", str(n)] + cmd
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=ROOT)
        for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # they can force a slower OpenBLAS kernel
            env.pop(var, None)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
        return [json.load(open(os.path.join(tmp, f"rank{k}.json"))) for k in range(n)]


def rows(args: argparse.Namespace, configs: list[str], layouts: list[tuple[str, int, int, int, str]]) -> list[dict]:
    """Per config, each (kind, dp, tp, pp, schedule) layout as one job; the first layout is one rank."""
    from nn.distributed.pipeline import bubble_formula
    out = []
    for config in configs:
        base = None
        for kind, dp, tp, pp, schedule in layouts:
            if CONFIGS[config]["n_head"] % tp or CONFIGS[config]["n_layer"] < pp:
                continue
            ranks = run_job(args, config, dp, tp, pp, schedule)
            n = dp * tp * pp
            tps = ranks[0]["tokens_per_s"]
            if n == 1:
                base = ranks[0]
            row = {"kind": kind, "config": config, "dp": dp, "tp": tp, "pp": pp, "ranks": n,
                   "schedule": schedule if pp > 1 else "-", "micro_batches": args.micro,
                   "batch_size": args.batch_size, "block_size": args.block_size, "tokens_per_s": tps,
                   "step_s": ranks[0]["step_s"]}
            if base is not None:
                row["speedup_vs_1_rank"] = round(tps / base["tokens_per_s"], 3)
                row["efficiency"] = round(row["speedup_vs_1_rank"] / n, 3)
                mem = [k for k in ("parameters_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
                                   "peak_rss_bytes", "construction_traced_peak_bytes", "construction_peak_rss_bytes")
                       if all(k in r for r in ranks + [base])]
                row["memory_max_rank_over_1_rank"] = {k: round(max(r[k] for r in ranks) / base[k], 4) for k in mem}
                row["memory_ideal"] = round(1 / (tp * pp), 4)
            if pp > 1:
                row["bubble_formula"] = round(bubble_formula(pp, args.micro), 4)
                row["bubble_measured"] = [round(r["bubble"], 4) for r in ranks]
                row["bubble_minus_formula_points"] = [round(100 * (r["bubble"] - row["bubble_formula"]), 2)
                                                      for r in ranks]
                row["bytes_sent_measured_over_formula"] = [r["bytes_sent_per_step"] / r["bytes_sent_formula"]
                                                           for r in ranks]
            row["per_rank"] = ranks
            out.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_rank"}), file=sys.stderr, flush=True)
    return out


def layouts_of(args: argparse.Namespace) -> list[tuple[str, int, int, int, str]]:
    """(kind, dp, tp, pp, schedule): one rank first, then tp, pp under each schedule, the mixes."""
    out = [("one", 1, 1, 1, "1f1b")]
    out += [("tp", 1, tp, 1, "1f1b") for tp in _ints(args.tp) if tp > 1]
    out += [("pp", 1, 1, pp, s) for pp in _ints(args.pp) if pp > 1 for s in args.schedules.split(",")]
    for m in filter(None, args.mixes.split(",")):
        dp, tp, pp = (int(v) for v in m.split("x"))
        out.append(("mix", dp, tp, pp, "1f1b"))
    return out


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", "--configs", dest="models", default="gpt-medium,12L-768",
                   help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--tp", default="1,2", help="tp sizes (one rank per tp rank, dp = pp = 1)")
    p.add_argument("--pp", default="1,2", help="pp sizes (dp = tp = 1), each under every --schedules")
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--mixes", default="1x2x2", help="extra dp x tp x pp layouts, e.g. 2x2x1,1x2x2,2x2x2")
    p.add_argument("--micro", type=int, default=8, help="micro-batches per step (--grad-accum)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch and data-parallel rank")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory-batch", type=int, default=2, help="batch of the one-process tp_memory / tp_bytes")
    p.add_argument("--skip-jobs", action="store_true", help="only the one-process sections")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: every rank on the GPU (ranks sharing one GPU go through host memory)")
    p.add_argument("--mpiexec-args", default="", help="extra launcher arguments, e.g. '--host a,b'")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="gpt-medium", help=argparse.SUPPRESS)
    p.add_argument("--tp-one", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--pp-one", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--dp-one", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--schedule", default="1f1b", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    global BLOCK
    BLOCK = args.block_size
    from _common import git_rev, machine_info
    configs = args.models.split(",")
    tps = sorted(set(_ints(args.tp)) | {1})
    layouts = layouts_of(args)
    skipped = [f"{name}: tp {tp} does not divide {CONFIGS[name]['n_head']} heads" for name in configs
               for tp in sorted({t for _, _, t, _, _ in layouts}) if CONFIGS[name]["n_head"] % tp]
    out = {"benchmark": "bench_parallel", "commit": git_rev(), "machine": machine_info(1),
           "load_average": os.getloadavg(), "args": vars(args), "skipped": skipped,
           "tp_memory": tp_memory(configs, tps, args.memory_batch),
           "tp_bytes": tp_bytes(configs, tps, args.memory_batch)}
    if not args.skip_jobs:
        out["rows"] = rows(args, configs, layouts)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
