"""Model parallelism (issue 17): what tensor parallelism saves per rank, what it sends, how it scales.

    python benchmarks/bench_parallel.py                                  # here: tp 1, 2 (2 cores)
    python benchmarks/bench_parallel.py --tp 1,2,3,4,6,8 --mixes 2x2,4x2,2x4,2x3 --steps 10   # the 16-core host
    python benchmarks/bench_parallel.py --device cuda --tp 1,2 --batch 16 --steps 10           # ranks sharing one GPU

Sections (one function each; the pipeline-parallel rows live in their own functions):

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
  tp_throughput  tokens/s of real training steps under mpiexec, one BLAS thread per rank
                 (OMP_NUM_THREADS=1), for each layout dp x tp; speedup against one rank and
                 efficiency = speedup / ranks (tp keeps the global batch: strong scaling; dp x tp
                 multiplies it by dp: tokens/s is per job).

Configs: gpt-medium (6 layers, 6 heads, width 384, block 256) and 12L-768 (12 layers, 12 heads,
width 768, block 256), both on the shakespeare-char vocabulary. A tp that does not divide the
number of heads is skipped, and listed as skipped. Prints one JSON object.
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
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIGS = {"gpt-medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
           "12L-768": dict(n_layer=12, n_head=12, n_embd=768, block_size=256)}
VOCAB = 65  # shakespeare-char


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
    full = GPT(GPTConfig(vocab_size=VOCAB, **CONFIGS[name]), seed=0)
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
            T = CONFIGS[name]["block_size"]
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
        B, T, C, L = batch, c["block_size"], c["n_embd"], c["n_layer"]
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


# ---------------------------------------------------------------- throughput (mpiexec)
def worker(args: argparse.Namespace) -> None:
    from nn.distributed import init
    from tinygrad_lm.train import Trainer, make_config
    world = init()
    cfg = make_config("shakespeare-char", None, data=args.data, out=os.path.join(args.tmp, f"run{world.size}"),
                      progress=False, sample_tokens=0, cache_dir=os.path.join(args.tmp, "cache"),
                      max_iters=args.steps + args.warmup, eval_interval=10 ** 6, ckpt_interval=10 ** 6,
                      batch_size=args.batch, tp=args.tp_one, dp=args.dp_one, device=args.device, **CONFIGS[args.config])
    tr = Trainer(cfg, world=world, log=lambda s: None)
    for _ in range(args.warmup):
        tr.train_step()
    world.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        tr.train_step()
    if args.device == "cuda":
        from tensor import backend
        backend.cupy_module().cuda.Device().synchronize()
    world.barrier()
    dt = time.perf_counter() - t0
    if world.rank == 0:
        out = {"config": args.config, "device": args.device, "transport": getattr(world, "transport", None),
               "dp": args.dp_one, "tp": args.tp_one, "ranks": world.size,
               "batch_per_dp_rank": args.batch, "steps": args.steps,
               "tokens_per_s": args.steps * tr.global_batch_size * cfg.model.block_size / dt,
               "step_ms": 1000 * dt / args.steps}
        print("RESULT " + json.dumps(out), flush=True)


def mpiexec() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else (shutil.which("mpiexec") or "mpiexec")


def tp_throughput(args: argparse.Namespace, configs: list[str], layouts: list[tuple[int, int]]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=ROOT)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            base = None
            for dp, tp in layouts:
                if CONFIGS[name]["n_head"] % tp:
                    continue
                cmd = [mpiexec(), "-n", str(dp * tp), sys.executable, os.path.abspath(__file__), "--worker",
                       "--config", name, "--tp-one", str(tp), "--dp-one", str(dp), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch", str(args.batch), "--data", args.data, "--tmp", tmp,
                       "--device", args.device]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
                if r.returncode or not line:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
                row = json.loads(line[0][7:])
                base = base or (row if dp * tp == 1 else None)
                if base:
                    row["speedup_vs_1_rank"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
                    row["efficiency"] = round(row["speedup_vs_1_rank"] / (dp * tp), 3)
                rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="gpt-medium,12L-768")
    p.add_argument("--tp", default="1,2", help="tp sizes (one dp rank each)")
    p.add_argument("--mixes", default="", help="extra dp x tp layouts, e.g. 2x2,4x2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help="sequences per data-parallel rank")
    p.add_argument("--memory-batch", type=int, default=2)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: every rank on the GPU (ranks sharing one GPU go through host memory)")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"))
    p.add_argument("--worker", action="store_true")
    p.add_argument("--config", default="gpt-medium")
    p.add_argument("--tp-one", type=int, default=1)
    p.add_argument("--dp-one", type=int, default=1)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from benchmarks._common import machine_info
    configs = args.configs.split(",")
    tps = [int(x) for x in args.tp.split(",")]
    layouts = [(1, tp) for tp in tps] + [tuple(int(v) for v in m.split("x")) for m in args.mixes.split(",") if m]
    skipped = [f"{name}: tp {tp} does not divide {CONFIGS[name]['n_head']} heads" for name in configs
               for tp in sorted({t for _, t in layouts}) if CONFIGS[name]["n_head"] % tp]
    out = {"benchmark": "bench_parallel", "machine": machine_info(1), "load_average": os.getloadavg(),
           "skipped": skipped,
           "tp_memory": tp_memory(configs, sorted(set(tps) | {1}), args.memory_batch),
           "tp_bytes": tp_bytes(configs, tps, args.memory_batch)}
    if not args.skip_throughput:
        out["tp_throughput"] = tp_throughput(args, configs, layouts)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
