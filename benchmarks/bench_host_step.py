"""Host launch time and synchronised step time of a CUDA training step, two source trees interleaved.

A step (forward, backward, gradient clipping, AdamW) is launched right after a device synchronisation;
the script records how long Python takes to launch each phase and how long the step takes to the next
synchronisation. Where the step is bound by the host (bf16 eager at gpt-medium) this is the figure to
compare, and the machine's host speed drifts, so the trees run in turn, `--rounds` times each.

    python benchmarks/bench_host_step.py --trees OLD_TREE . --rounds 5 --precision bf16 --data tinyshakespeare.txt
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(a: argparse.Namespace) -> None:
    sys.path.insert(0, os.getcwd())
    sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
    import bench_train as B
    from nn.amp import autocast_
    from nn.optim import AdamW
    from nn.utils import clip_grad_norm_
    from tensor import backend
    from tinygrad_lm.model import GPT
    cp = backend.cupy_module()
    cfg = B.model_config(a.config)
    model = GPT(cfg, seed=0)
    model.to("cuda")
    autocast_(model, a.precision)
    params = model.parameters()
    opt = AdamW(params, lr=1e-4)
    data = B.batches(B.token_ids(a.data), a.steps + 3, a.batch_size, cfg.block_size)
    data = [(backend.to_device(x, "cuda"), backend.to_device(y, "cuda")) for x, y in data]
    model.train()
    sync = cp.cuda.Device().synchronize

    def step(x, y) -> list:
        t = [time.perf_counter()]
        _, loss = model(x, y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        clip_grad_norm_(params, 1.0, error_if_nonfinite=False, sync=False)
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad()
        t.append(time.perf_counter())
        return [t[i + 1] - t[i] for i in range(4)]

    launch, steps = [], []
    for i, (x, y) in enumerate(data):
        sync()
        t0 = time.perf_counter()
        parts = step(x, y)
        sync()
        if i >= 3:
            launch.append(parts)
            steps.append(time.perf_counter() - t0)
    med = [statistics.median(p[k] for p in launch) * 1e3 for k in range(4)]
    print("RESULT " + json.dumps({"launch_ms": dict(zip(("forward", "backward", "clip", "optimizer"), med)),
                                  "step_ms": statistics.median(steps) * 1e3}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", default=["."], help="source trees (the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--config", default="gpt-medium")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--data", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.data:
        a.data = os.path.abspath(a.data)
    if a.worker:
        worker(a)
        return
    runs: dict = {t: [] for t in a.trees}
    for _ in range(a.rounds):
        for tree in a.trees:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--precision", a.precision, "--config",
                   a.config, "--batch-size", str(a.batch_size), "--steps", str(a.steps)] + (["--data", a.data] if a.data else [])
            p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                sys.exit(f"{tree}: exit {p.returncode}: {p.stderr[-2000:]}")
            runs[tree].append(json.loads(lines[-1][7:]))
    out = {"benchmark": "host_step", "precision": a.precision, "config": a.config, "batch_size": a.batch_size,
           "loadavg": os.getloadavg(), "runs": runs,
           "median_step_ms": {t: round(statistics.median(r["step_ms"] for r in rs), 2) for t, rs in runs.items()}}
    base = out["median_step_ms"][a.trees[0]]
    out["step_speed_over_first"] = {t: round(base / v, 3) for t, v in out["median_step_ms"].items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
