"""Old commit against new, side by side in one run: a benchmark script of this directory run
from two source trees in turn (baseline, candidate, baseline, candidate, ...), and the ratios
candidate / baseline of what it measured.

    git worktree add /tmp/base <old-commit>        # or: mkdir /tmp/base && git archive <old> | tar -x -C /tmp/base
    python benchmarks/bench_compare.py --baseline /tmp/base --rounds 2 -- \
        bench_train.py --config gpt-medium --device cuda --precisions fp32,bf16 --impls ours,ours-graph,torch

Each run is its own process started from its own tree (`python TREE/benchmarks/SCRIPT ARGS`),
so each imports its own `tensor`, `nn` and `tinygrad_lm`. Metrics are read from the script's
JSON: for bench_train.py the tokens/s, peak memory and ours/PyTorch ratio of every
implementation and precision; for bench_sample.py the tokens/s of each batch and the
ours/PyTorch ratio. Ratios of ratios (ours/PyTorch, new against old) are the robust figure on
a shared machine: PyTorch runs beside ours in every round and cancels the machine's drift.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _common as C

HERE = os.path.dirname(os.path.abspath(__file__))


def metrics(script: str, out: dict) -> dict[str, float]:
    """The figures to compare, flattened to name -> number."""
    m: dict[str, float] = {}
    if script == "bench_train.py":
        for prec, row in out["summary"].items():
            for impl, r in row.items():
                if isinstance(r, dict):
                    m[f"{prec}.{impl}.tokens_per_s"] = r["tokens_per_s"]
                    m[f"{prec}.{impl}.tokens_per_s_best_step"] = r["tokens_per_s_best_step"]
                    m[f"{prec}.{impl}.peak_rss_mib"] = r["peak_rss_mib"]
                    if "gpu_pool_total_mib" in r:
                        m[f"{prec}.{impl}.gpu_pool_total_mib"] = r["gpu_pool_total_mib"]
                    for key, v in (r.get("decode") or {}).items():
                        if key.startswith("batch_") and key.endswith("_tok_s"):  # the KV-cached sampler
                            m[f"{prec}.{impl}.decode_{key}"] = v
            for key in ("ratio_ours_over_torch_tokens_per_s", "ratio_best_step",
                        "ratio_ours_graph_over_torch_tokens_per_s"):
                if key in row:
                    m[f"{prec}.{key}"] = row[key]
    elif script == "bench_sample.py":
        for B, row in out["batches"].items():
            for key in ("ours_cached_greedy_tok_s", "ours_cached_sampled_tok_s", "torch_cached_greedy_tok_s",
                        "ours_vs_torch"):
                if key in row:
                    m[f"b{B}.{key}"] = row[key]
    else:
        raise SystemExit(f"bench_compare: no metrics defined for {script}")
    return m


def run(tree: str, script: str, args: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(tree, "benchmarks", script), *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_compare: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    start = p.stdout.index("{")  # the script's one JSON object
    return json.loads(p.stdout[start:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="source tree of the old commit")
    ap.add_argument("--candidate", default=os.path.dirname(HERE), help="source tree of the new commit (this one)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("script", help="bench_train.py or bench_sample.py")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    a = ap.parse_args()
    args = [x for x in a.args if x != "--"]
    t0, load = time.perf_counter(), os.getloadavg()
    seen: dict[str, dict[str, list[float]]] = {"baseline": {}, "candidate": {}}
    for r in range(a.rounds):
        for side, tree in (("baseline", a.baseline), ("candidate", a.candidate)):
            for k, v in metrics(a.script, run(tree, a.script, args)).items():
                seen[side].setdefault(k, []).append(v)
            print(f"[{r}] {side} done", file=sys.stderr, flush=True)
    med = {side: {k: statistics.median(v) for k, v in d.items()} for side, d in seen.items()}
    ratios = {k: round(med["candidate"][k] / med["baseline"][k], 3)
              for k in med["baseline"] if k in med["candidate"] and med["baseline"][k]}
    C.emit({"benchmark": "bench_compare", "script": a.script, "args": args, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "baseline": a.baseline, "candidate": a.candidate, "candidate_git": C.git_rev(),
            "machine": C.machine_info(None), "loadavg_at_start": [round(v, 2) for v in load],
            "loadavg_at_end": [round(v, 2) for v in os.getloadavg()], "rounds": a.rounds,
            "median": med, "runs": seen, "candidate_over_baseline": ratios,
            "wall_s": round(time.perf_counter() - t0, 1)}, a.out)


if __name__ == "__main__":
    main()
